//! `mailwarden reload`: asks the running proxy to re-read its configuration and reports
//! what it did.
//!
//! The proxy is found through `[process] pid_file` and signalled with SIGHUP (the same
//! reload as `kill -HUP` or systemd's `ExecReload`). A signal carries no answer, so the
//! proxy writes the outcome of every reload to `PID_FILE.reload` (see
//! [`crate::server::reload::StatusFile`]) with a generation number; this command waits
//! for the number to go up and prints what it says.
//!
//! Exit codes: 0 reloaded; 1 the reload failed and the running configuration stays (the
//! error names file, line and key), or no proxy to signal; 2 reloaded, but some changes
//! wait for a restart (listed); 3 no answer within the timeout.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use crate::config::{Config, Purpose};
use crate::server::reload::{Status, read_status};

/// How long to wait for the proxy's answer (a reload rebuilds the DNS resolver and may
/// snapshot the outbound counters: well under a second in practice).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

pub fn run(config: &Path) -> ExitCode {
    match reload(config) {
        Ok(status) => report(&status),
        Err((code, e)) => {
            eprintln!("reload: {e}");
            ExitCode::from(code)
        }
    }
}

fn reload(config: &Path) -> Result<Status, (u8, String)> {
    // Read for the pid file only: the proxy validates the whole file itself (with the
    // checks of `run`) and reports; a file too broken to name the pid file is reported
    // here, and nothing is signalled.
    let cfg = Config::load_for(config, Purpose::Offline).map_err(|e| (1, e.to_string()))?;
    let pid_file = cfg.process.pid_file.as_deref().ok_or((
        1,
        format!(
            "{}: [process] pid_file is not set: cannot find the running proxy (or send it SIGHUP yourself)",
            config.display()
        ),
    ))?;
    let pid = read_pid(pid_file).map_err(|e| (1, e))?;
    let status_file = cfg
        .process
        .reload_status_file()
        .ok_or((1, "no status file".to_string()))?;
    let before = read_status(&status_file)
        .filter(|s| s.pid == pid)
        .map_or(0, |s| s.generation);
    signal_hup(pid).map_err(|e| (1, e))?;
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        if let Some(s) = read_status(&status_file).filter(|s| s.pid == pid && s.generation > before)
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err((
                3,
                format!(
                    "proxy {pid} signalled, no answer in {} within {}s: see its log",
                    status_file.display(),
                    ANSWER_TIMEOUT.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn report(status: &Status) -> ExitCode {
    if status.result != "ok" {
        eprintln!(
            "reload failed, the running configuration stays: {}",
            status.message
        );
        return ExitCode::from(1);
    }
    println!("reloaded (policy {})", status.message);
    for what in &status.restart_needed {
        eprintln!("needs a restart: {what}");
    }
    if status.restart_needed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

fn read_pid(pid_file: &Path) -> Result<u32, String> {
    let text = std::fs::read_to_string(pid_file).map_err(|e| {
        format!(
            "{}: {e} (is the proxy running with this configuration?)",
            pid_file.display()
        )
    })?;
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| format!("{}: not a process id: {text:?}", pid_file.display()))
}

/// SIGHUP through `kill(1)`: the crate forbids `unsafe`, and a signal is not worth a
/// dependency.
fn signal_hup(pid: u32) -> Result<(), String> {
    let out = Command::new("kill")
        .arg("-HUP")
        .arg(pid.to_string())
        .output()
        .map_err(|e| format!("cannot run kill: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "kill -HUP {pid}: {} (stale pid file?)",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_file_must_hold_a_process_id() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.pid");
        std::fs::write(&f, "1234\n").unwrap();
        assert_eq!(read_pid(&f), Ok(1234));
        for bad in ["", "abc", "1", "0", "-5", "12 34"] {
            std::fs::write(&f, bad).unwrap();
            assert!(read_pid(&f).is_err(), "{bad:?} accepted");
        }
    }
}
