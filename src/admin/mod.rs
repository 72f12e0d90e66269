//! Administration: the command-line tools that work on the local stores.

pub mod quarantine_cli;
