//! `mailwarden config show [--non-default]` and `config check` (issue 17), through the
//! binary.
//!
//! * `show` prints every key: each key the annotated `config/mailwarden.toml` sets is in
//!   the output, in its table, and unset optional keys are there as comments.
//! * `--non-default` prints exactly what a file sets to something else than the default
//!   (a key set to its default value is not shown), and the defaults plus those keys
//!   give back the whole effective configuration.
//! * `config check` and its old name `check-config` answer alike, naming file, line and
//!   key on error.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::{bin, repo_path};

fn mailwarden(args: &[&str], config: &Path) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .arg("-c")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn show(config: &Path, non_default: bool) -> String {
    let mut args = vec!["config", "show"];
    if non_default {
        args.push("--non-default");
    }
    let (code, out, err) = mailwarden(&args, config);
    assert_eq!(code, 0, "config show: {err}");
    out
}

/// Every `table.key` path of a TOML document (leaves; arrays of tables by table name).
fn leaf_keys(prefix: &str, t: &toml::Table, out: &mut BTreeSet<String>) {
    for (k, v) in t {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(sub) => leaf_keys(&path, sub, out),
            toml::Value::Array(items)
                if items.iter().all(toml::Value::is_table) && !items.is_empty() =>
            {
                for item in items {
                    leaf_keys(&path, item.as_table().unwrap(), out);
                }
            }
            _ => {
                out.insert(path);
            }
        }
    }
}

fn keys_of(text: &str) -> BTreeSet<String> {
    let t: toml::Table = toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let mut out = BTreeSet::new();
    leaf_keys("", &t, &mut out);
    out
}

#[test]
fn show_prints_every_key_of_the_annotated_config_and_the_unset_ones() {
    let shipped = repo_path("config/mailwarden.toml");
    let shown = show(&shipped, false);
    let written = keys_of(&std::fs::read_to_string(&shipped).unwrap());
    let effective = keys_of(&shown);
    let missing: Vec<_> = written.difference(&effective).collect();
    assert!(missing.is_empty(), "keys not shown: {missing:?}\n{shown}");
    // The defaults too: the shipped file is the complete reference (it writes almost
    // every key, tests/config_reference.rs), so a small file shows it: far more keys
    // are printed than it writes.
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.toml");
    let small_text =
        "local_domains = [\"example.org\"]\n[[listener]]\naddress = \"127.0.0.1:2525\"\n";
    std::fs::write(&small, small_text).unwrap();
    let small_shown = show(&small, false);
    assert!(
        keys_of(&small_shown).len() > keys_of(small_text).len() + 20,
        "{small_shown}"
    );
    // Unset optional keys are shown as comments, in their table.
    let process = &shown[shown.find("\n[process]\n").expect("[process] shown")..];
    assert!(process.contains("# pid_file = (not set)"), "{shown}");
    // Paths as the proxy uses them: absolute.
    let dir = shipped.parent().unwrap().display().to_string();
    assert!(
        shown.contains(&format!("zone_files = [\"{dir}/demo.zone\"]")),
        "{shown}"
    );
}

#[test]
fn non_default_is_exactly_what_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("small.toml");
    std::fs::write(
        &file,
        r#"
local_domains = ["example.org"]
[[listener]]
address = "127.0.0.1:2525"
max_sessions = 1000               # the default: not shown
max_sessions_per_client = 5
[limits]
max_recipients = 1000             # the default: not shown
message_size_limit = 5000000
[dns]
timeout_ms = 900
[quarantine]
dir = "var/quarantine"            # the default path: not shown
"#,
    )
    .unwrap();
    let shown = show(&file, true);
    let keys: Vec<String> = keys_of(&shown).into_iter().collect();
    assert_eq!(
        keys,
        [
            "dns.timeout_ms",
            "limits.message_size_limit",
            "listener.address",
            "listener.max_sessions_per_client",
            "local_domains"
        ],
        "{shown}"
    );
}

#[test]
fn defaults_plus_non_default_keys_give_the_effective_configuration() {
    // Next to the shipped file, so that relative paths resolve alike.
    let shipped = repo_path("config/mailwarden.toml");
    let non_default = show(&shipped, true);
    let copy = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile_in(shipped.parent().unwrap())
        .unwrap();
    std::fs::write(copy.path(), &non_default).unwrap();
    assert_eq!(
        show(copy.path(), false),
        show(&shipped, false),
        "non-default keys:\n{non_default}"
    );
    // And the full output is itself a valid configuration file.
    std::fs::write(copy.path(), show(&shipped, false)).unwrap();
    let (code, out, err) = mailwarden(&["config", "check"], copy.path());
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn config_check_and_check_config_agree() {
    let dir = tempfile::tempdir().unwrap();
    let good = repo_path("config/mailwarden.toml");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "local_domains = [\"example.org\"]\n[[listener]]\naddress = \"127.0.0.1:2525\"\n[dns]\ntimeout_ms = \"soon\"\n",
    )
    .unwrap();
    for file in [&good, &bad] {
        let new = mailwarden(&["config", "check"], file);
        let old = mailwarden(&["check-config"], file);
        assert_eq!(new, old, "{}", file.display());
    }
    let (code, _, err) = mailwarden(&["config", "check"], &bad);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!("{}:5: ", bad.display())) && err.contains("timeout_ms"),
        "{err}"
    );
    let (code, out, _) = mailwarden(&["config", "show"], &bad);
    assert_eq!(
        (code, out.as_str()),
        (1, ""),
        "nothing shown for a broken file"
    );
}
