//! The module layers, checked: no module imports one above it, and no two top-level
//! modules import each other (directly or round a circle).
//!
//! The graph is built from the source text: every `crate::…` path (also inside
//! `use crate::{a, b}` groups), every `super::…` path that leaves its top-level module,
//! and `mailwarden::…` in `main.rs`. Comments, string literals and `#[cfg(test)]` items
//! are left out: tests may reach anywhere. The table below is the one the README's
//! "Architecture" section draws.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top to bottom. A module may import from its own layer or any layer below, never from
/// one above; within a layer, no two modules may import each other (or round a circle).
const LAYERS: &[&[&str]] = &[
    // Entry points: the binary's CLI, the admin CLI/API (and quarantine release),
    // `check`, the fuzzing harness and the in-process session harness (`testing`).
    &["main", "admin", "check", "fuzzing", "testing"],
    // The listener: accept loop, connection limits, reload, background tasks.
    &["server"],
    // The SMTP session: state machine and one handler per verb.
    &["smtp"],
    // The decision pipeline at the end of DATA.
    &["pipeline"],
    // What the pipeline asks: authentication, rules, outbound accounting, reports, signing.
    &[
        "auth",
        "policy",
        "outbound",
        "dmarc_reports",
        "decision_log",
        "signing",
    ],
    // Where mail goes or waits: the next hop, the quarantine, shared storage.
    &["relay", "quarantine", "store"],
    // Process-wide services.
    &["metrics", "telemetry"],
    // The bottom: leaves that import nothing above them. `tls` (rustls setup) and
    // `dkim_key` (key files) sit here because the configuration checks the CA and key
    // files it names when it loads; `service` is systemd/CLI glue with no imports.
    // `batch_writer` is the writer thread the decision log and the DMARC records share.
    &[
        "wire",
        "config",
        "tls",
        "dkim_key",
        "service",
        "batch_writer",
    ],
];

/// Ties that break the rules today only because the importing file belongs to another
/// helper's rework. `(file under src/, imported module, why)`. Each must still exist:
/// once it is gone, delete its line here so it cannot come back.
/// (Empty now: `config → outbound` went with `src/config/outbound.rs`.)
const PENDING: &[(&str, &str, &str)] = &[];

/// Ties left for later (see the README's "Architecture"), kept to the files that make them.
const UNFINISHED: &[(&str, &str, &str)] = &[];

fn main_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file: `src/a/b.rs` and `src/a/b/mod.rs` are `[a, b]`;
/// `lib.rs` is `[]`, `main.rs` is `[main]`.
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    match parts.last().map(String::as_str) {
        Some("mod") | Some("lib") => {
            parts.pop();
        }
        _ => {}
    }
    parts
}

/// Blanks comments, string and char literals (keeping line structure), so that a path
/// in a doc comment or a message is not read as an import.
fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    while i < c.len() {
        if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (c.get(i + 1) == Some(&'"') || c.get(i + 1) == Some(&'#'))
            && !(i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_'))
        {
            // Raw string r"…" / r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= c.len() {
                    break;
                }
                if c[j] == '"' && (0..hashes).all(|k| c.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                out.push(blank(c[j]));
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                if i < c.len() {
                    out.push(blank(c[i]));
                }
                i += 1;
            }
            out.push_str("\"\"");
            i += 1;
        } else if c[i] == '\'' {
            // A char literal ('x', '\n', '\u{..}'), or a lifetime ('a) left as it is.
            if c.get(i + 1) == Some(&'\\') {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                out.push_str("' '");
                i += 1;
            } else if c.get(i + 2) == Some(&'\'') {
                out.push_str("' '");
                i += 3;
            } else {
                out.push(c[i]);
                i += 1;
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// Removes every item marked `#[cfg(test)]` (a `mod tests { … }`, a `use`, a function);
/// returns the names of `#[cfg(test)] mod x;` declarations (files that are tests).
fn without_tests(code: &str) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut test_mods = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at + "#[cfg(test)]".len()..];
        let b = item.as_bytes();
        let (mut i, mut depth) = (0, 0i32);
        // Skip further attributes, then the item up to its `;` or its closing brace.
        let end = loop {
            if i >= b.len() {
                break b.len();
            }
            match b[i] {
                b'{' | b'[' | b'(' => depth += 1,
                b'}' | b']' | b')' => {
                    depth -= 1;
                    if depth == 0 && b[i] == b'}' {
                        break i + 1;
                    }
                }
                b';' if depth == 0 => break i + 1,
                _ => {}
            }
            i += 1;
        };
        let text = item[..end].trim();
        let words: Vec<&str> = text
            .split(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
            .filter(|w| !w.is_empty())
            .collect();
        if text.ends_with(';')
            && let Some(pos) = words.iter().position(|w| *w == "mod")
            && let Some(name) = words.get(pos + 1)
        {
            test_mods.push(name.to_string());
        }
        rest = &item[end..];
    }
    out.push_str(rest);
    (out, test_mods)
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first segment(s) of the path that starts `after`: `a::B` gives `a`, `{a::B, b}`
/// gives `a` and `b`.
fn heads_at(after: &str) -> Vec<&str> {
    let mut heads = Vec::new();
    if let Some(group) = after.strip_prefix('{') {
        let (mut depth, mut item_start, mut end) = (0, 0, group.len());
        for (k, ch) in group.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    end = k;
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    heads.push(ident_at(group[item_start..].trim_start()));
                    item_start = k + 1;
                }
                _ => {}
            }
        }
        heads.push(ident_at(group[item_start..end].trim_start()));
    } else {
        heads.push(ident_at(after));
    }
    heads.retain(|h| !h.is_empty() && *h != "self");
    heads
}

/// The first segments named after `prefix::` in `code`: `crate::a::B` gives `a`,
/// `crate::{a::B, b}` gives `a` and `b`.
fn heads_after<'a>(code: &'a str, prefix: &str) -> Vec<&'a str> {
    let mut heads = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find(prefix) {
        let start = from + at;
        from = start + prefix.len();
        let before = code[..start].chars().next_back();
        if before.is_some_and(|ch| ch.is_alphanumeric() || ch == '_' || ch == '$') {
            continue;
        }
        heads.extend(heads_at(&code[from..]));
    }
    heads.retain(|h| !h.is_empty() && *h != "self");
    heads
}

/// The items a `super::` chain names at the crate root, from a module `depth` levels
/// below it (`src/a.rs` and `src/a/mod.rs` are depth 1, `src/a/b.rs` depth 2).
fn super_roots(code: &str, depth: usize) -> Vec<&str> {
    let mut heads = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("super::") {
        let start = from + at;
        from = start + "super::".len();
        if code[..start].ends_with("::")
            || code[..start]
                .chars()
                .next_back()
                .is_some_and(|ch| ch.is_alphanumeric() || ch == '_')
        {
            continue; // the inner link of a chain, counted from its first link
        }
        let mut n = 1;
        while code[from..].starts_with("super::") {
            n += 1;
            from += "super::".len();
        }
        if n >= depth {
            heads.extend(heads_at(&code[from..]));
        }
    }
    heads
}

/// Every `(file, importing top-level module, imported top-level module)`.
fn imports() -> Vec<(String, String, String)> {
    let src = main_src();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut test_dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut edges = Vec::new();
    let mut parsed = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let (code, test_mods) = without_tests(&code_only(&text));
        let dir = if file
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs")
        {
            file.parent().unwrap().to_path_buf()
        } else {
            file.with_extension("")
        };
        for m in test_mods {
            test_dirs.insert(dir.join(&m));
            test_dirs.insert(dir.join(format!("{m}.rs")));
        }
        parsed.push((file.clone(), code));
    }
    for (file, code) in parsed {
        if test_dirs.iter().any(|t| file == *t || file.starts_with(t)) {
            continue;
        }
        let rel = file.strip_prefix(&src).unwrap();
        let path = module_path(rel);
        let Some(top) = path.first().cloned() else {
            continue; // lib.rs: only the module list
        };
        let mut targets: Vec<String> = heads_after(&code, "crate::")
            .into_iter()
            .map(str::to_string)
            .collect();
        if top == "main" {
            targets.extend(
                heads_after(&code, "mailwarden::")
                    .into_iter()
                    .map(str::to_string),
            );
        }
        // `super::…` chains long enough to leave the top-level module reach the root.
        targets.extend(
            super_roots(&code, path.len())
                .into_iter()
                .map(str::to_string),
        );
        let rel_name = rel.to_string_lossy().into_owned();
        for t in targets {
            if t != top {
                edges.push((rel_name.clone(), top.clone(), t));
            }
        }
    }
    edges
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Everything wrong with `edges` (`(file, from, to)`) under `LAYERS`, leaving out the
/// `allowed` ties: modules missing from the table, upward imports, circles.
fn violations(edges: &[(String, String, String)], allowed: &[(&str, &str, &str)]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (file, from, to) in edges {
        if allowed.iter().any(|(f, t, _)| f == file && t == to) {
            continue;
        }
        let (Some(lf), Some(lt)) = (layer_of(from), layer_of(to)) else {
            problems.push(format!(
                "{file}: `{from}` -> `{to}`: put every top-level module in LAYERS"
            ));
            continue;
        };
        if lt < lf {
            problems.push(format!(
                "{file}: `{from}` (layer {lf}) imports `{to}` (layer {lt}, above it)"
            ));
        }
        graph.entry(from).or_default().insert(to);
    }
    let reach = |start: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![start];
        while let Some(m) = todo.pop() {
            for next in graph.get(m).into_iter().flatten() {
                if seen.insert(*next) {
                    todo.push(next);
                }
            }
        }
        seen
    };
    let modules: BTreeSet<&str> = graph.keys().copied().collect();
    let mut reported = BTreeSet::new();
    for m in &modules {
        let forward = reach(m);
        if !forward.contains(m) {
            continue;
        }
        let circle: BTreeSet<&str> = forward
            .into_iter()
            .filter(|o| reach(o).contains(m))
            .collect();
        if reported.insert(circle.clone()) {
            let names: Vec<&str> = circle.into_iter().collect();
            problems.push(format!("circle between {}", names.join(", ")));
        }
    }
    problems
}

#[test]
fn no_upward_import_and_no_circle() {
    let edges = imports();
    assert!(
        edges.len() > 50,
        "the scan found almost no imports: {edges:?}"
    );
    let allowed: Vec<_> = PENDING.iter().chain(UNFINISHED).copied().collect();
    let problems = violations(&edges, &allowed);
    assert!(
        problems.is_empty(),
        "module layering:\n  {}",
        problems.join("\n  ")
    );
    // Every allowance is still needed: a tie that is gone must leave the list.
    for (file, to, why) in &allowed {
        assert!(
            edges.iter().any(|(f, _, t)| f == file && t == to),
            "{file} no longer imports `{to}` ({why}): remove it from the allowances"
        );
    }
}

#[test]
fn the_checker_sees_upward_imports_and_circles() {
    let e = |f: &str, a: &str, b: &str| (f.to_string(), a.to_string(), b.to_string());
    let edges = vec![
        e("wire/x.rs", "wire", "smtp"),
        e("auth/a.rs", "auth", "policy"),
        e("policy/p.rs", "policy", "auth"),
        e("smtp/s.rs", "smtp", "wire"),
        e("nowhere.rs", "nowhere", "wire"),
    ];
    let problems = violations(&edges, &[]);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("`wire` (layer 7) imports `smtp`")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p == "circle between auth, policy"),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("circle between") && p.contains("smtp")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("put every top-level module")),
        "{problems:?}"
    );
    assert!(violations(&edges[1..2], &[]).is_empty());
    assert!(violations(&edges[..1], &[("wire/x.rs", "smtp", "")]).is_empty());
}

#[test]
fn the_scanner_reads_paths_not_prose() {
    let src = r##"
use crate::{wire::reply::Reply, config};
// crate::admin in a comment
/* crate::server in a block */
let s = "crate::smtp in a string"; let r = r#"crate::smtp"#; let c = '"';
fn f<'a>(x: &'a str) { crate::relay::go(x) }
#[cfg(test)]
mod tests { use crate::server::X; }
#[cfg(test)]
use crate::admin::Y;
#[cfg(test)]
mod fixtures;
"##;
    let (code, test_mods) = without_tests(&code_only(src));
    assert_eq!(heads_after(&code, "crate::"), ["wire", "config", "relay"]);
    assert_eq!(test_mods, ["fixtures"]);
    // From `src/a/b.rs` (depth 2) `super::super::x` is the root's `x`; `super::y` is not.
    assert_eq!(
        super_roots("super::super::x::f(); super::y::g();", 2),
        ["x"]
    );
    assert_eq!(super_roots("use super::{p, q::r};", 1), ["p", "q"]);
}
