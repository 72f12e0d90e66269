//! Signals: SIGTERM and SIGINT start a graceful shutdown (the grace period bounds the
//! drain); SIGHUP reloads the configuration file.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT.
pub fn on_signals(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
        token.cancel();
    });
    Ok(())
}

/// Reloads the configuration on every SIGHUP (see [`super::reload`]); a failed reload
/// keeps what is running and says why in the log.
pub fn on_reload(live: std::sync::Arc<super::reload::Live>) -> std::io::Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let _ = live.reload().await;
        }
    });
    Ok(())
}
