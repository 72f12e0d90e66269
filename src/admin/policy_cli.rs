//! `mailwarden policy replay|test`: tune a policy file before deploying it. Replay runs
//! the decision log's inputs through a new policy offline; test runs a file of cases.
//! Both end in the proxy's own decision function (`crate::policy::inputs`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Subcommand;

use crate::config::{Config, Purpose};
use crate::decision_log::replay;
use crate::decision_log::store::FileStore;
use crate::policy::cases;
use crate::policy::rules::Policy;

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Re-run logged transactions through another policy file, offline (no DNS, no
    /// network): a matrix old action × new action, the rules responsible, examples.
    Replay {
        /// The policy file to try.
        #[arg(long, value_name = "NEW.toml")]
        policy: PathBuf,
        /// Only the last DURATION of the log (e.g. 24h, 7d). Default: all of it.
        #[arg(long, value_name = "DURATION", conflicts_with_all = ["from", "to"])]
        since: Option<String>,
        /// Start of the window: YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ (UTC) or Unix seconds.
        #[arg(long, value_name = "T")]
        from: Option<String>,
        /// End of the window (excluded), same forms as --from. Default: now.
        #[arg(long, value_name = "T")]
        to: Option<String>,
        /// List every transaction whose action changes.
        #[arg(long)]
        changed: bool,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run policy test cases: exit 1 with a diff when a case is not decided as expected.
    Test {
        /// The policy file.
        policy: PathBuf,
        /// The cases (see config/policy.example.tests.toml).
        cases: PathBuf,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("policy: {e}");
    ExitCode::from(1)
}

pub fn run(config_path: &Path, cmd: &PolicyCommand) -> ExitCode {
    match cmd {
        PolicyCommand::Replay {
            policy,
            since,
            from,
            to,
            changed,
            json,
        } => {
            let config = match Config::load_for(config_path, Purpose::Offline) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            let window = match window(since.as_deref(), from.as_deref(), to.as_deref()) {
                Ok(w) => w,
                Err(e) => return fail(e),
            };
            replay_command(&config, policy, window, *changed, *json)
        }
        PolicyCommand::Test {
            policy,
            cases,
            json,
        } => test_command(policy, cases, *json),
    }
}

/// `[from, to)` in Unix milliseconds.
pub fn window(
    since: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
) -> Result<(u64, u64), String> {
    let now = crate::decision_log::now_ms();
    if let Some(s) = since {
        let d = crate::config::parse_duration(s).map_err(|e| format!("--since: {e}"))?;
        return Ok((now.saturating_sub(d.as_millis() as u64), u64::MAX));
    }
    let from = from.map(replay::parse_time).transpose()?.unwrap_or(0);
    let to = to.map(replay::parse_time).transpose()?.unwrap_or(u64::MAX);
    if from >= to {
        return Err("--from must be before --to".into());
    }
    Ok((from, to))
}

fn replay_command(
    config: &Config,
    policy: &Path,
    (from, to): (u64, u64),
    changed: bool,
    json: bool,
) -> ExitCode {
    let policy = match Policy::load(policy) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let dir = &config.decision_log.dir;
    if !dir.exists() {
        return fail(format!(
            "{}: no decision log yet ([decision_log] dir)",
            dir.display()
        ));
    }
    let mut bar = Progress::new(std::io::stderr().is_terminal());
    let started = Instant::now();
    let result = replay::run(
        &FileStore::reader(dir),
        &policy,
        from,
        to,
        if changed { usize::MAX } else { 0 },
        &mut |done, total| bar.show(done, total),
    );
    bar.finish();
    let r = match result {
        Ok(r) => r,
        Err(e) => return fail(format!("{}: {e}", dir.display())),
    };
    if json {
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
    } else {
        print!("{}", replay::render_text(&r));
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "({:.2} s, {:.0} transactions/s)",
            secs,
            r.total as f64 / secs.max(1e-9)
        );
    }
    ExitCode::SUCCESS
}

fn test_command(policy_path: &Path, cases_path: &Path, json: bool) -> ExitCode {
    let policy = match Policy::load(policy_path) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let results = match cases::run(&policy, cases_path) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let failed = results.iter().filter(|r| !r.ok).count();
    if json {
        let out = serde_json::json!({
            "policy": policy.version,
            "cases": results.len(),
            "passed": results.len() - failed,
            "failed": failed,
            "results": results,
        });
        println!("{out}");
    } else {
        for r in results.iter().filter(|r| !r.ok) {
            print!("{}", cases::render_failure(r));
        }
        println!(
            "{}: {} cases, {} passed, {failed} failed",
            cases_path.display(),
            results.len(),
            results.len() - failed
        );
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The test files a policy names (`tests = [...]`), run for `check-config`: `Err` lists
/// the failures (diffs) or the file that could not be read.
pub fn check_policy_tests(config: &Config) -> Result<usize, String> {
    let Some(path) = config.policy_file() else {
        return Ok(0);
    };
    let policy = Policy::load(path).map_err(|e| e.to_string())?;
    let mut count = 0;
    let mut failures = String::new();
    for file in &policy.tests {
        let results = cases::run(&policy, file).map_err(|e| e.to_string())?;
        count += results.len();
        for r in results.iter().filter(|r| !r.ok) {
            failures.push_str(&cases::render_failure(r));
        }
    }
    if failures.is_empty() {
        Ok(count)
    } else {
        Err(format!("policy tests failed:\n{failures}"))
    }
}

/// A one-line progress bar on stderr, when it is a terminal, redrawn at most 10×/s.
struct Progress {
    on: bool,
    last: Option<Instant>,
}

impl Progress {
    fn new(on: bool) -> Progress {
        Progress { on, last: None }
    }

    fn show(&mut self, done: u64, total: u64) {
        if !self.on || total == 0 {
            return;
        }
        if self
            .last
            .is_some_and(|l| l.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(Instant::now());
        const WIDTH: u64 = 40;
        let filled = (done * WIDTH / total) as usize;
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r[{}{}] {:>3}% of {} MB",
            "#".repeat(filled),
            " ".repeat(WIDTH as usize - filled),
            done * 100 / total,
            total / 1_000_000
        );
        let _ = err.flush();
    }

    fn finish(&mut self) {
        if self.on && self.last.is_some() {
            let _ = write!(std::io::stderr(), "\r{}\r", " ".repeat(60));
        }
    }
}
