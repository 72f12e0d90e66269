//! `mailwarden config show`: the configuration in effect, as TOML.
//!
//! Every key is shown, defaults included: the [`Config`] is serialised through JSON,
//! which (unlike TOML) keeps unset optional keys (as `null`); those are printed as a
//! comment, `# key = (not set)`, so that the output still parses back to the same
//! configuration. Paths are absolute (as the proxy uses them), durations in the largest
//! exact unit.
//!
//! `--non-default` (Postfix's `postconf -n`) prints only what differs from the built-in
//! defaults: defaults resolved against the same directory, so a default path is not shown
//! as changed; each `[[listener]]` is compared with a listener that sets only its address,
//! each `[next_hop.NAME]` with an empty `[next_hop]` section.
//!
//! Passwords in URLs (`redis://:PASSWORD@host`) are replaced by `********`: this output
//! is meant to be pasted into tickets.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Map, Value};

use super::{Config, ListenerConfig, NextHopConfig};

/// The whole effective configuration.
pub fn effective(config: &Config) -> Result<String, String> {
    let value = to_json(config)?;
    let mut out = String::new();
    render_table(&mut out, &[], as_map(&value));
    Ok(out)
}

/// Only what differs from the defaults (`base`: the config file's directory, against
/// which the default paths are resolved).
pub fn non_default(config: &Config, base: &Path) -> Result<String, String> {
    let mut defaults: Config = toml::from_str("").map_err(|e| e.to_string())?;
    defaults.resolve_paths(base);
    let value = to_json(config)?;
    let default = to_json(&defaults)?;
    let mut diff = diff_maps(as_map(&value), as_map(&default));
    if let Some(Value::Array(listeners)) = as_map(&value).get("listener") {
        let changed: Vec<Value> = listeners
            .iter()
            .map(|l| Value::Object(listener_diff(l)))
            .collect();
        diff.remove("listener");
        if !changed.is_empty() {
            diff.insert("listener".into(), Value::Array(changed));
        }
    }
    if let Some(Value::Object(hops)) = diff.get_mut("next_hop") {
        let empty = serde_json::to_value(NextHopConfig::default()).map_err(|e| e.to_string())?;
        let default_keys = as_map(&empty);
        for (name, hop) in hops.iter_mut() {
            if let (false, Value::Object(section)) = (default_keys.contains_key(name), &*hop) {
                *hop = Value::Object(diff_maps(section, default_keys));
            }
        }
    }
    let mut out = String::new();
    render_table(&mut out, &[], &diff);
    Ok(out)
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, String> {
    let mut value = serde_json::to_value(v).map_err(|e| e.to_string())?;
    mask_passwords(&mut value);
    Ok(value)
}

fn as_map(v: &Value) -> &Map<String, Value> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    match v {
        Value::Object(m) => m,
        _ => EMPTY.get_or_init(Map::new),
    }
}

/// The keys of `value` that differ from `default`, recursing into tables.
fn diff_maps(value: &Map<String, Value>, default: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in value {
        match (v, default.get(k)) {
            (a, Some(b)) if a == b => {}
            (Value::Object(a), Some(Value::Object(b))) => {
                let d = diff_maps(a, b);
                if !d.is_empty() {
                    out.insert(k.clone(), Value::Object(d));
                }
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// A listener's keys that differ from those of a listener that sets only its address
/// (always shown: it names the listener).
fn listener_diff(listener: &Value) -> Map<String, Value> {
    let l = as_map(listener);
    let address = l.get("address").and_then(Value::as_str).unwrap_or_default();
    let default = toml::from_str::<ListenerConfig>(&format!("address = {:?}", address))
        .ok()
        .and_then(|d| to_json(&d).ok())
        .unwrap_or(Value::Null);
    let mut out = Map::new();
    out.insert("address".into(), Value::String(address.into()));
    out.extend(diff_maps(l, as_map(&default)));
    out
}

/// `scheme://user:PASSWORD@host` → `scheme://user:********@host`, in every string.
fn mask_passwords(v: &mut Value) {
    match v {
        Value::String(s) => {
            if let Some(masked) = masked_url(s) {
                *s = masked;
            }
        }
        Value::Array(a) => a.iter_mut().for_each(mask_passwords),
        Value::Object(m) => m.values_mut().for_each(mask_passwords),
        _ => {}
    }
}

fn masked_url(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let (userinfo, host) = authority.rsplit_once('@')?;
    let (user, _password) = userinfo.split_once(':')?;
    Some(format!(
        "{scheme}://{user}:********@{host}{}",
        &rest[authority_end..]
    ))
}

fn is_table_array(v: &Value) -> bool {
    matches!(v, Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_object))
}

/// One table: its plain keys, then its sub-tables, then its arrays of tables.
fn render_table(out: &mut String, path: &[String], map: &Map<String, Value>) {
    for (k, v) in map {
        match v {
            Value::Object(_) => {}
            v if is_table_array(v) => {}
            Value::Null => {
                let _ = writeln!(out, "# {} = (not set)", key(k));
            }
            v => {
                let _ = writeln!(out, "{} = {}", key(k), literal(v));
            }
        }
    }
    for (k, v) in map {
        if let Value::Object(m) = v {
            let p = [path, std::slice::from_ref(k)].concat();
            let _ = writeln!(out, "\n[{}]", dotted(&p));
            render_table(out, &p, m);
        }
    }
    for (k, v) in map {
        if let (true, Value::Array(items)) = (is_table_array(v), v) {
            let p = [path, std::slice::from_ref(k)].concat();
            for item in items {
                let _ = writeln!(out, "\n[[{}]]", dotted(&p));
                render_table(out, &p, as_map(item));
            }
        }
    }
}

fn literal(v: &Value) -> String {
    toml::Value::try_from(v)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| format!("{v}"))
}

/// A bare key when TOML allows one, else a quoted key.
fn key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}

fn dotted(path: &[String]) -> String {
    path.iter().map(|k| key(k)).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
hostname = "mx.example.org"
local_domains = ["example.org"]

[[listener]]
address = "127.0.0.1:2525"

[[listener]]
address = "127.0.0.1:2587"
role = "submission"
max_sessions = 50

[next_hop]
address = "smtp:127.0.0.1:10025"

[next_hop.outgoing]
address = "smtp:127.0.0.1:10587"

[dns]
timeout_ms = 900

[outbound]
redis_url = "redis://:hunter2@127.0.0.1:6379/0"
"#;

    fn config() -> Config {
        let mut c: Config = toml::from_str(FILE).unwrap();
        c.resolve_paths(Path::new("/etc/mailwarden"));
        c
    }

    fn reparse(text: &str) -> Config {
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    #[test]
    fn show_parses_back_to_the_same_configuration() {
        let c = config();
        let shown = effective(&c).unwrap();
        let mut again = reparse(&shown);
        // The only thing not shown as it is: the masked password.
        again.outbound.redis_url = c.outbound.redis_url.clone();
        assert_eq!(format!("{again:?}"), format!("{c:?}"), "{shown}");
        assert!(shown.contains("# pid_file = (not set)"), "{shown}");
        assert!(shown.contains("[outbound.adaptive]"), "{shown}");
        assert!(shown.contains("grace_period = "), "{shown}");
    }

    #[test]
    fn show_masks_passwords_in_urls() {
        let shown = effective(&config()).unwrap();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("redis_url = \"redis://:********@127.0.0.1:6379/0\""),
            "{shown}"
        );
        assert_eq!(masked_url("redis://127.0.0.1:6379/"), None);
        assert_eq!(
            masked_url("http://u:p@h/x").as_deref(),
            Some("http://u:********@h/x")
        );
    }

    #[test]
    fn non_default_shows_exactly_what_the_file_changes() {
        let shown = non_default(&config(), Path::new("/etc/mailwarden")).unwrap();
        let v: toml::Table = toml::from_str(&shown).unwrap();
        let mut top: Vec<&str> = v.keys().map(String::as_str).collect();
        top.sort();
        assert_eq!(
            top,
            [
                "dns",
                "hostname",
                "listener",
                "local_domains",
                "next_hop",
                "outbound"
            ],
            "{shown}"
        );
        assert_eq!(v["dns"].as_table().unwrap().len(), 1, "{shown}");
        assert_eq!(v["dns"]["timeout_ms"].as_integer(), Some(900));
        let listeners = v["listener"].as_array().unwrap();
        assert_eq!(listeners[0].as_table().unwrap().len(), 1, "{shown}");
        let second = listeners[1].as_table().unwrap();
        let mut keys: Vec<&str> = second.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["address", "max_sessions", "role"], "{shown}");
        let hops = v["next_hop"].as_table().unwrap();
        assert_eq!(hops["outgoing"].as_table().unwrap().len(), 1, "{shown}");
        assert_eq!(v["outbound"].as_table().unwrap().len(), 1, "{shown}");
        // Applying the non-default keys to the defaults gives the same configuration.
        let mut again = reparse(&shown);
        again.resolve_paths(Path::new("/etc/mailwarden"));
        again.outbound.redis_url = config().outbound.redis_url;
        assert_eq!(format!("{again:?}"), format!("{:?}", config()), "{shown}");
    }

    #[test]
    fn an_unchanged_file_has_no_non_default_keys() {
        let mut c: Config = toml::from_str("").unwrap();
        c.resolve_paths(Path::new("/srv"));
        assert_eq!(non_default(&c, Path::new("/srv")).unwrap(), "");
    }
}
