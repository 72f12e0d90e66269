//! `config/mailwarden.toml` is the complete annotated reference: every key of every
//! section the configuration has shows there, as `key = …` or commented `# key = …`
//! under its `[section]` (or a commented `# [section]` header). A key added to a config
//! struct without a line in the reference file fails here, named.
//!
//! The keys come from the configuration itself: the defaults serialised (as `mailwarden
//! config show` does, through JSON, which keeps unset optional keys as `null`), with one
//! entry in each array of tables (`[[listener]]`, `[[dkim.sign]]`, …), so nothing can be
//! forgotten by hand.

use std::collections::BTreeSet;
use std::path::Path;

use mailwarden::config::Config;
use serde_json::Value;

/// The smallest configuration with one entry in each array of tables (whose keys only
/// exist per entry) and in each table of named sections. Every other key is a default.
const ONE_OF_EACH: &str = r#"
[[listener]]
address = "127.0.0.1:2525"

[[dkim.sign]]
domain = "example.org"
selector = "s1"
key_file = "dkim.key"

[[outbound.account]]
name = "alice@example.org"
"#;

fn reference() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mailwarden.toml");
    std::fs::read_to_string(path).expect("config/mailwarden.toml")
}

/// `(section, key)` for every key line of the reference file, commented or not. A line
/// `[a.b]`, `[[a.b]]`, `# [a.b]` or `# [[a.b]]` opens section `a.b`.
fn shown(text: &str) -> BTreeSet<(String, String)> {
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim_start_matches('#').trim();
        if let Some(head) = line.strip_prefix('[') {
            let name: String = head
                .trim_start_matches('[')
                .chars()
                .take_while(|c| *c != ']')
                .collect();
            if !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                section = name;
            }
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert((section.clone(), key.to_string()));
        }
    }
    out
}

/// Sections the reference file writes as arrays of tables (`[[name]]`).
fn arrays_of_tables(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start_matches('#').trim();
            let name = l.strip_prefix("[[")?.split("]]").next()?;
            Some(name.to_string())
        })
        .collect()
}

/// Every `(section, key)` of `value`: tables recurse; an array of tables (as the
/// reference file writes it) recurses into its first entry; anything else is a key.
fn keys(
    section: &str,
    value: &serde_json::Map<String, Value>,
    tables: &BTreeSet<String>,
    out: &mut BTreeSet<(String, String)>,
) {
    for (key, v) in value {
        let path = if section.is_empty() {
            key.clone()
        } else {
            format!("{section}.{key}")
        };
        match v {
            Value::Object(m) => keys(&path, m, tables, out),
            Value::Array(items) if tables.contains(&path) => match items.first() {
                Some(Value::Object(m)) => keys(&path, m, tables, out),
                _ => panic!("[[{path}]]: ONE_OF_EACH must give it an entry"),
            },
            _ => {
                out.insert((section.to_string(), key.clone()));
            }
        }
    }
}

fn configured_keys(text: &str) -> BTreeSet<(String, String)> {
    let config: Config = toml::from_str(ONE_OF_EACH).expect("ONE_OF_EACH parses");
    let value = serde_json::to_value(&config).expect("Config serialises");
    let Value::Object(root) = value else {
        panic!("Config is not a table")
    };
    let mut out = BTreeSet::new();
    keys("", &root, &arrays_of_tables(text), &mut out);
    out
}

#[test]
fn every_config_key_is_in_the_reference_file() {
    let text = reference();
    let shown = shown(&text);
    let missing: Vec<String> = configured_keys(&text)
        .into_iter()
        .filter(|k| !shown.contains(k))
        .map(|(section, key)| {
            if section.is_empty() {
                format!("{key} (top level, before any [section])")
            } else {
                format!("[{section}] {key}")
            }
        })
        .collect();
    assert!(
        missing.is_empty(),
        "config/mailwarden.toml does not show these keys (add `key = default`, or \
         `# key = …` where the default is off or unset):\n  {}",
        missing.join("\n  ")
    );
}

/// The other way round: a commented key line is a key the configuration has (a typo in
/// the reference would send operators to a key that does not exist).
#[test]
fn every_key_the_reference_file_shows_exists() {
    let text = reference();
    let known = configured_keys(&text);
    // Named next hops ([next_hop.NAME]) take the keys of [next_hop].
    let hop_keys: BTreeSet<String> = known
        .iter()
        .filter(|(s, _)| s == "next_hop")
        .map(|(_, k)| k.clone())
        .collect();
    let unknown: Vec<String> = shown(&text)
        .into_iter()
        .filter(|(section, key)| {
            let named_hop = section.starts_with("next_hop.") && hop_keys.contains(key);
            !named_hop && !known.contains(&(section.clone(), key.clone()))
        })
        .map(|(section, key)| format!("[{section}] {key}"))
        .collect();
    assert!(
        unknown.is_empty(),
        "config/mailwarden.toml shows keys the configuration does not have:\n  {}",
        unknown.join("\n  ")
    );
}

/// The checks above can fail: a key missing from a reference is found and named.
#[test]
fn a_missing_key_is_named() {
    let text = reference();
    let without: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("max_recipients"))
        .collect::<Vec<_>>()
        .join("\n");
    let shown = shown(&without);
    assert!(!shown.contains(&("limits".to_string(), "max_recipients".to_string())));
    assert!(
        configured_keys(&without).contains(&("limits".to_string(), "max_recipients".to_string()))
    );
}

/// The reference is also the shipped example: it parses and validates as a config to
/// run with (the README's run command and tests/demo.rs use it).
#[test]
fn the_reference_file_is_a_valid_configuration() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mailwarden.toml");
    if let Err(e) = Config::parse(&reference(), &path) {
        panic!("{e}");
    }
}
