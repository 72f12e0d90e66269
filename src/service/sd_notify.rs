//! The systemd notification protocol (sd_notify(3)), client side: one datagram of
//! `KEY=VALUE` lines to the unix socket named by `$NOTIFY_SOCKET`.
//!
//! Written here rather than taken from a crate: it is one `sendto` on a socket std already
//! has, and `unsafe_code` is forbidden in this crate. Without `$NOTIFY_SOCKET` (not started
//! by systemd, or `Type=` other than notify) every call is a no-op, so callers never need to
//! know how the process was started.
//!
//! The unit (`packaging/mailwarden.service`) is `Type=notify`: systemd counts the service as
//! started at `READY=1`, sent once every listener is bound, so units ordered after it
//! (`After=mailwarden.service`) start when port 25 really answers. `run` (src/main.rs)
//! calls [`reloading`] before and [`ready`] after each SIGHUP reload, and [`stopping`]
//! when shutdown starts.

use std::io;
use std::os::unix::net::UnixDatagram;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Where notifications go: a filesystem path or a Linux abstract socket name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Path(std::path::PathBuf),
    /// `@name` in `$NOTIFY_SOCKET`: the name without the `@`.
    Abstract(Vec<u8>),
}

impl Target {
    /// Parses a `$NOTIFY_SOCKET` value. systemd also defines `vsock:` addresses (a VM's
    /// manager); those are refused with a reason rather than silently ignored.
    pub fn parse(value: &str) -> Result<Target, String> {
        if let Some(name) = value.strip_prefix('@') {
            if name.is_empty() {
                return Err("empty abstract socket name".into());
            }
            return Ok(Target::Abstract(name.as_bytes().to_vec()));
        }
        if value.starts_with('/') {
            return Ok(Target::Path(value.into()));
        }
        Err(format!(
            "{NOTIFY_SOCKET}={value:?}: only absolute paths and @abstract names are supported"
        ))
    }

    /// The target named by `$NOTIFY_SOCKET`, or None when it is unset or empty.
    pub fn from_env() -> Option<Result<Target, String>> {
        let value = std::env::var_os(NOTIFY_SOCKET)?;
        let value = value.to_str().map(str::to_owned);
        match value {
            Some(v) if v.is_empty() => None,
            Some(v) => Some(Target::parse(&v)),
            None => Some(Err(format!("{NOTIFY_SOCKET} is not UTF-8"))),
        }
    }

    /// Sends `state` (newline-separated `KEY=VALUE` assignments) as one datagram.
    pub fn send(&self, state: &str) -> io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let sent = match self {
            Target::Path(p) => socket.send_to(state.as_bytes(), p)?,
            Target::Abstract(name) => send_abstract(&socket, name, state.as_bytes())?,
        };
        if sent != state.len() {
            // A datagram is sent whole or not at all; a short count means a broken peer.
            return Err(io::Error::other("notification datagram truncated"));
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &[u8], data: &[u8]) -> io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(data, &addr)
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &[u8]) -> io::Result<usize> {
    Err(io::Error::other(
        "abstract unix sockets exist only on Linux",
    ))
}

/// Sends `state` to the service manager if there is one. Returns whether a notification
/// was sent. A failure is logged, never fatal: the proxy serves mail either way, and
/// systemd's start timeout reports a READY that never arrived.
pub fn notify(state: &str) -> bool {
    let target = match Target::from_env() {
        None => return false,
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            tracing::warn!(error = %e, "cannot notify the service manager");
            return false;
        }
    };
    match target.send(state) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, socket = ?target, "cannot notify the service manager");
            false
        }
    }
}

/// Every listener is bound and serving (also: a reload finished).
pub fn ready() -> bool {
    notify(&format!(
        "READY=1\nSTATUS=serving\nMAINPID={}",
        std::process::id()
    ))
}

/// Shutdown started: systemd shows "deactivating" and waits up to `TimeoutStopSec=`.
pub fn stopping() -> bool {
    notify("STOPPING=1\nSTATUS=draining sessions")
}

/// A reload started; call [`ready`] when it is finished (whether it was applied or refused).
/// With `Type=notify` systemd shows the unit as "reloading" until then.
pub fn reloading() -> bool {
    notify("RELOADING=1\nSTATUS=reloading")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_abstract_names_and_refuses_the_rest() {
        assert_eq!(
            Target::parse("/run/systemd/notify"),
            Ok(Target::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            Target::parse("@sd-notify"),
            Ok(Target::Abstract(b"sd-notify".to_vec()))
        );
        assert!(Target::parse("@").is_err());
        // A relative path would be resolved against the working directory: refused.
        assert!(Target::parse("run/notify").is_err());
        assert!(Target::parse("vsock:2:1234").is_err());
    }

    #[test]
    fn sends_one_datagram_to_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        Target::Path(path).send("READY=1\nSTATUS=x").unwrap();
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_one_datagram_to_an_abstract_name() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("mailwarden-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        Target::parse(&format!("@{name}"))
            .unwrap()
            .send("STOPPING=1")
            .unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let r = Target::Path(dir.path().join("absent")).send("READY=1");
        assert!(r.is_err());
    }
}
