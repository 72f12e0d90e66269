//! Build script: records the git revision for `mailwarden --version`.
//!
//! A build from a source tarball (no `.git`, or no `git` binary) must still work, so every
//! failure here means "unknown", never a build error. `MAILWARDEN_GIT_REV` in the
//! environment wins (a packager building outside the repository can pass it).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=MAILWARDEN_GIT_REV");
    let rev = std::env::var("MAILWARDEN_GIT_REV")
        .ok()
        .filter(|r| !r.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=MAILWARDEN_GIT_REV={}", rev.trim());
    // Rebuild when HEAD moves: HEAD itself (a branch switch) and the ref it names (a commit).
    // In a worktree `.git` is a file, so ask git where these live instead of guessing.
    for path in [
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])),
        git(&["rev-parse", "--git-path", "packed-refs"]),
    ]
    .into_iter()
    .flatten()
    {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

/// One line of git's output, or None when git is missing, fails, or prints nothing.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.trim();
    (out.status.success() && !line.is_empty()).then(|| line.to_string())
}
