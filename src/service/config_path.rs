//! Which configuration file a command uses when `-c/--config` is not given.
//!
//! Order: the packaged `/etc/mailwarden/mailwarden.toml` when it exists, else the
//! checkout's `config/mailwarden.toml` (relative to the working directory, the old default
//! of `quarantine` and `accounts`). The installed file comes first so that an administrator
//! who runs `mailwarden quarantine release` from whatever directory they are in acts on the
//! running service's configuration, not on a `config/` directory that happens to be there.
//!
//! The working-directory fallback is refused when the file (or its directory) is writable
//! by group or others: such a file may have been planted (a shared `/tmp`), and the
//! configuration decides where released mail is sent. `-c` is never second-guessed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The packaged configuration.
pub const SYSTEM: &str = "/etc/mailwarden/mailwarden.toml";
/// The checkout's configuration, relative to the working directory.
pub const CHECKOUT: &str = "config/mailwarden.toml";

/// The configuration file to use: `given` (from `-c`) if any, else the first default that
/// exists. An error says what was looked for.
pub fn resolve(given: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return Ok(p);
    }
    choose(Path::new(SYSTEM), Path::new(CHECKOUT))
}

/// [`resolve`]'s default order with the two candidates as parameters (tests).
pub fn choose(system: &Path, checkout: &Path) -> Result<PathBuf, String> {
    if system.exists() {
        return Ok(system.to_path_buf());
    }
    if checkout.exists() {
        refuse_if_writable_by_others(checkout)?;
        return Ok(checkout.to_path_buf());
    }
    Err(format!(
        "no configuration file: give -c FILE (neither {} nor {} exists)",
        system.display(),
        checkout.display()
    ))
}

fn refuse_if_writable_by_others(file: &Path) -> Result<(), String> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    for p in [file, dir] {
        let mode = std::fs::metadata(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .permissions()
            .mode();
        // The sticky bit on a directory does not help: a planted file is still there.
        if mode & 0o022 != 0 {
            return Err(format!(
                "{} is writable by group or others (mode {:o}): not using it as the default \
                 configuration; give -c FILE",
                p.display(),
                mode & 0o7777
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let system = d.path().join("etc/mailwarden.toml");
        let checkout = d.path().join("config/mailwarden.toml");
        fs::create_dir_all(checkout.parent().unwrap()).unwrap();
        fs::set_permissions(
            checkout.parent().unwrap(),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        (d, system, checkout)
    }

    #[test]
    fn given_path_wins_even_if_absent() {
        let p = resolve(Some("/nonexistent/x.toml".into())).unwrap();
        assert_eq!(p, PathBuf::from("/nonexistent/x.toml"));
    }

    #[test]
    fn system_file_comes_before_the_checkout() {
        let (_d, system, checkout) = setup();
        fs::write(&checkout, "").unwrap();
        fs::set_permissions(&checkout, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(choose(&system, &checkout).unwrap(), checkout);
        fs::create_dir_all(system.parent().unwrap()).unwrap();
        fs::write(&system, "").unwrap();
        assert_eq!(choose(&system, &checkout).unwrap(), system);
    }

    #[test]
    fn neither_file_names_both_in_the_error() {
        let (_d, system, checkout) = setup();
        let e = choose(&system, &checkout).unwrap_err();
        assert!(e.contains("-c FILE"), "{e}");
        assert!(e.contains(&system.display().to_string()), "{e}");
        assert!(e.contains(&checkout.display().to_string()), "{e}");
    }

    #[test]
    fn a_planted_checkout_file_is_refused() {
        let (_d, system, checkout) = setup();
        fs::write(&checkout, "").unwrap();
        fs::set_permissions(&checkout, fs::Permissions::from_mode(0o666)).unwrap();
        let e = choose(&system, &checkout).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        // The file is fine but its directory is world-writable (sticky or not): refused.
        fs::set_permissions(&checkout, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(
            checkout.parent().unwrap(),
            fs::Permissions::from_mode(0o1777),
        )
        .unwrap();
        let e = choose(&system, &checkout).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
    }
}
