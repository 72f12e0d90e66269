//! `mailwarden config check|show`: the configuration as the proxy would run it.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

/// `config check` (and its old name `check-config`): the same checks `run` makes before
/// serving (certificates, policy file, admin token file and mode), so `ok` here means
/// `run` starts. Errors name the file, line and key.
pub fn check(path: &Path) -> ExitCode {
    let checked = Config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|c| {
            let warnings = crate::server::preflight(&c)?;
            crate::admin::http::preflight(&c)?;
            // The policy's own tests (`tests = [...]` in the policy file).
            crate::admin::policy_cli::check_policy_tests(&c)?;
            Ok(warnings)
        })
        .map(|warnings| {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
        });
    match checked {
        Ok(()) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// `config show [--non-default]`: every key in effect (defaults included), or only those
/// the file sets to something else than the default (Postfix's `postconf -n`).
pub fn show(path: &Path, non_default: bool) -> ExitCode {
    let shown = Config::load(path).map_err(|e| e.to_string()).and_then(|c| {
        if non_default {
            let base = std::path::absolute(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| "/".into());
            crate::config::show::non_default(&c, &base)
        } else {
            crate::config::show::effective(&c)
        }
    });
    match shown {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}
