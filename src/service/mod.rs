//! Running as a system service: the service manager's notifications, where the
//! configuration is when no `-c` is given, the version string, and the man pages and
//! shell completions generated from the command line definition.

pub mod cli_assets;
pub mod config_path;
pub mod sd_notify;

/// `mailwarden --version`: the crate version and the git revision it was built from
/// (`unknown` for a build outside a git checkout; see build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("MAILWARDEN_GIT_REV"),
    ")"
);
