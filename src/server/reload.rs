//! Reload of the running configuration (SIGHUP, `mailwarden reload`).
//!
//! Everything a session uses is one [`Generation`]: the configuration, the verdict engine
//! (policy, DNS settings, local domains), the next hops, each listener's certificate and
//! limits, the outbound detector. A reload builds a whole new generation from the file
//! and swaps it in with one pointer write; nothing in a generation is changed in place
//! (the one exception, below, is the policy file re-read by the running engine when
//! nothing else of it changed). A session takes the generation current when it is
//! accepted and keeps it to its end, so a session in the middle of DATA finishes under
//! the settings it started with, and a new session gets the new ones.
//!
//! Every step that can fail (reading and validating the file, the certificates, the
//! policy, the next hops, the outbound state) runs before the swap: a broken file
//! changes nothing, and the error names the file, line and key.
//!
//! What a reload cannot change is reported as needing a restart and left as it was:
//! the listening sockets (an address added or removed), the quarantine store, the admin
//! API, DMARC report recording and sending, logging and the pid file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::limits::ConnectionLimits;
use crate::config::{Config, ListenerConfig, Role};
use crate::policy::engine::Enforcer;
use crate::policy::{AcceptAll, Inspector};
use crate::relay::NextHops;
use crate::smtp::SessionShared;
use crate::smtp::session::ListenerShared;

/// What the sessions accepted from now on use.
pub struct Generation {
    pub shared: Arc<SessionShared>,
    /// One per bound listener, in the order the sockets were bound.
    pub listeners: Vec<Arc<ListenerShared>>,
    pub limits: Vec<Arc<ConnectionLimits>>,
    /// Every next hop (releases from the admin API go through these).
    pub next_hops: Arc<NextHops>,
}

/// What a successful reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Policy version now running.
    pub policy: String,
    /// Changes read from the file that a reload cannot apply (they wait for a restart).
    pub restart_needed: Vec<String>,
}

/// The running generation and what a reload needs to build the next one.
pub struct Live {
    current: RwLock<Arc<Generation>>,
    /// The configuration file, when the proxy was started from one.
    path: std::sync::OnceLock<PathBuf>,
    /// The listener configurations the sockets were bound with (addresses never change).
    bound: Vec<ListenerConfig>,
    /// One reload at a time (SIGHUPs arriving during one are merged by the signal stream).
    reloading: tokio::sync::Mutex<()>,
    /// The outbound detector's housekeeping task, stopped when the detector is replaced.
    outbound_task: Mutex<Option<(CancellationToken, JoinHandle<()>)>>,
    /// Where reload outcomes are written for `mailwarden reload` (`[process] pid_file`).
    status: Option<StatusFile>,
}

impl Live {
    pub(super) fn new(first: Generation, bound: Vec<ListenerConfig>) -> Live {
        let status = first
            .shared
            .config
            .process
            .reload_status_file()
            .map(StatusFile::new);
        Live {
            current: RwLock::new(Arc::new(first)),
            path: std::sync::OnceLock::new(),
            bound,
            reloading: tokio::sync::Mutex::new(()),
            outbound_task: Mutex::new(None),
            status,
        }
    }

    pub(super) fn set_path(&self, path: PathBuf) {
        let _ = self.path.set(path);
    }

    /// Writes `[process] pid_file` (once the listeners are bound: a pid file means a
    /// proxy that can be signalled).
    pub(super) fn write_pid_file(&self) -> Result<(), String> {
        let Some(pid_file) = &self.current().shared.config.process.pid_file else {
            return Ok(());
        };
        std::fs::write(pid_file, format!("{}\n", std::process::id()))
            .map_err(|e| format!("[process] pid_file {}: {e}", pid_file.display()))
    }

    /// Removes the pid file and the reload status file at exit.
    pub fn remove_pid_file(&self) {
        let process = &self.current().shared.config.process;
        for f in [process.pid_file.clone(), process.reload_status_file()]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(f);
        }
    }

    /// The generation new sessions get.
    pub fn current(&self) -> Arc<Generation> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts the outbound detector's housekeeping (counters snapshot, freeze expiry,
    /// Redis retry) and its metrics export, each under a token of its own so that a
    /// reload that replaces the detector can stop them.
    pub(super) fn start_outbound_tasks(&self, shutdown: &CancellationToken) {
        let Some(detector) = self.current().shared.outbound.clone() else {
            return;
        };
        let token = shutdown.child_token();
        tokio::spawn(super::export_outbound_metrics(
            detector.clone(),
            token.clone(),
        ));
        let task = tokio::spawn(detector.maintain(token.clone()));
        *lock(&self.outbound_task) = Some((token, task));
    }

    /// Stops the outbound housekeeping and waits for its last snapshot.
    pub(super) async fn stop_outbound_tasks(&self) {
        let running = lock(&self.outbound_task).take();
        if let Some((token, task)) = running {
            token.cancel();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
        }
    }

    /// Re-reads the configuration file and swaps in a new generation; on any error the
    /// running one stays and the error says why (`file:line: key: reason`). The outcome
    /// goes to the log and to the reload status file.
    pub async fn reload(&self) -> Result<Reloaded, String> {
        let _one = self.reloading.lock().await;
        // systemd (Type=notify): RELOADING=1 ... READY=1 around each reload, READY
        // whether the new configuration was applied or refused (the old one runs).
        crate::service::sd_notify::reloading();
        let result = self.rebuild().await;
        crate::service::sd_notify::ready();
        match &result {
            Ok(o) => {
                tracing::info!(policy = %o.policy, "configuration reloaded");
                for what in &o.restart_needed {
                    tracing::warn!(change = %what, "configuration reloaded: this change needs a restart");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "reload failed: keeping the running configuration")
            }
        }
        if let Some(status) = &self.status {
            status.write(&result);
        }
        result
    }

    async fn rebuild(&self) -> Result<Reloaded, String> {
        let path = self
            .path
            .get()
            .ok_or("the proxy was not started from a configuration file")?;
        let new = Config::load(path).map_err(|e| e.to_string())?;
        super::preflight(&new)?;
        let old = self.current();
        let before = &old.shared.config;
        let mut restart_needed = restart_only_changes(before, &new);
        let next_hops = Arc::new(NextHops::from_config(&new)?);
        // Signing keys are re-read (a rotated key file applies to new sessions); an
        // unreadable or weak key refuses the whole reload like any other config error.
        let signer = crate::signing::Signer::from_config(&new.dkim)?;

        // Listeners: the bound sockets stay; each takes the settings of the new
        // `[[listener]]` with its address.
        let mut listeners = Vec::with_capacity(self.bound.len());
        let mut limits = Vec::with_capacity(self.bound.len());
        for (i, bound) in self.bound.iter().enumerate() {
            let Some(lc) = new.listeners.iter().find(|l| l.address == bound.address) else {
                restart_needed.push(format!(
                    "listener {} is no longer in the file: it keeps listening, with its old settings, until a restart",
                    bound.address
                ));
                listeners.push(old.listeners[i].clone());
                limits.push(old.limits[i].clone());
                continue;
            };
            let tls = match (&lc.tls_cert, &lc.tls_key) {
                (Some(cert), Some(key)) => Some(
                    crate::tls::acceptor(cert, key)
                        .map_err(|e| format!("listener {}: tls: {e}", lc.address))?,
                ),
                _ => None,
            };
            let was = &old.listeners[i].config;
            limits.push(
                if (was.max_sessions, was.max_sessions_per_client)
                    == (lc.max_sessions, lc.max_sessions_per_client)
                {
                    old.limits[i].clone()
                } else {
                    // Sessions already running keep their slots in the old counters: for
                    // a while both counts apply, each bounded by its own limit.
                    Arc::new(ConnectionLimits::new(
                        lc.max_sessions,
                        lc.max_sessions_per_client,
                    ))
                },
            );
            listeners.push(Arc::new(ListenerShared {
                next_hop: next_hops.for_listener(lc),
                config: lc.clone(),
                tls,
            }));
        }
        for l in &new.listeners {
            if !self.bound.iter().any(|b| b.address == l.address) {
                restart_needed.push(format!(
                    "listener {} is new: it is not listening until a restart",
                    l.address
                ));
            }
        }

        let has_submission = listeners.iter().any(|l| l.config.role == Role::Submission);
        let wants_quarantine = new.auth.enabled || (new.outbound.enabled && has_submission);
        if wants_quarantine && old.shared.quarantine.is_none() {
            restart_needed.push(
                "the quarantine is needed now (checks or outbound turned on): held mail is deferred until a restart".into(),
            );
        }

        // The outbound detector: kept while `[outbound]` is unchanged (its counters are
        // its state); otherwise the running one saves its counters and the new one starts
        // from them.
        let outbound_same = format!("{:?}", before.outbound) == format!("{:?}", new.outbound);
        let outbound = match (&old.shared.outbound, new.outbound.enabled && has_submission) {
            (_, false) => None,
            (Some(d), true) if outbound_same => Some(d.clone()),
            (running, true) => {
                if let Some(d) = running {
                    d.snapshot().await;
                }
                Some(Arc::new(
                    crate::outbound::Detector::new(&new.outbound).await?,
                ))
            }
        };

        // The verdict engine. Its settings unchanged: the running engine re-reads the
        // policy file (its DNS caches stay warm, and the admin API, which holds it,
        // reports the new version). Otherwise a new engine: new resolver, local domains,
        // spoof settings.
        // Zone files are re-read on every reload: their content may have changed while
        // the configuration did not.
        let engine_same =
            engine_settings(before) == engine_settings(&new) && new.dns.zone_files.is_empty();
        let replacement: Option<Arc<dyn Inspector>> = match (new.auth.enabled, engine_same) {
            (false, _) if !before.auth.enabled => None,
            (false, _) => Some(Arc::new(AcceptAll)),
            (true, true) => None,
            (true, false) => Some(Arc::new(Enforcer::from_config(&new)?)),
        };
        // The last fallible step, and the only change made in place: after it, nothing
        // can fail, so a failed reload has changed nothing.
        let policy = match &replacement {
            Some(engine) => engine.policy_status().version,
            None => old.shared.inspector.reload()?,
        };
        let inspector = replacement.unwrap_or_else(|| old.shared.inspector.clone());

        let memory = if before.limits.message_memory == new.limits.message_memory {
            old.shared.memory.clone()
        } else {
            crate::wire::memory::MessageMemory::new(
                new.limits.message_memory,
                crate::metrics::global().message_memory.clone(),
            )
        };
        let shutdown = old.shared.shutdown.clone();
        let replaced_detector = match (&old.shared.outbound, &outbound) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (a, b) => a.is_some() != b.is_some(),
        };
        let next = Generation {
            shared: Arc::new(SessionShared {
                config: Arc::new(new),
                inspector,
                quarantine: old.shared.quarantine.clone(),
                outbound,
                shutdown: shutdown.clone(),
                memory,
                // The recorder and its sending timer run for the process.
                dmarc_reports: old.shared.dmarc_reports.clone(),
                // Likewise the decision log's writer.
                decision_log: old.shared.decision_log.clone(),
                signer,
            }),
            listeners,
            limits,
            next_hops,
        };
        let replaced = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(next),
        );
        // The replaced next hops' idle connections end with QUIT now; connections its
        // sessions still hold end with them.
        tokio::spawn(async move { replaced.next_hops.close_idle().await });
        if replaced_detector {
            self.stop_outbound_tasks().await;
            self.start_outbound_tasks(&shutdown);
        }
        Ok(Reloaded {
            policy,
            restart_needed,
        })
    }
}

/// What the verdict engine is built from, apart from the policy file's content.
fn engine_settings(c: &Config) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}",
        c.hostname, c.local_domains, c.dns, c.auth, c.spoof
    )
}

/// Sections read once at start: a change is reported, not applied.
fn restart_only_changes(before: &Config, after: &Config) -> Vec<String> {
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let (b, a) = (before, after);
    [
        ("quarantine", differs(&b.quarantine, &a.quarantine)),
        ("admin", differs(&b.admin, &a.admin)),
        ("log", differs(&b.log, &a.log)),
        ("dmarc_reports", differs(&b.dmarc_reports, &a.dmarc_reports)),
        ("decision_log", differs(&b.decision_log, &a.decision_log)),
        ("postgres", differs(&b.postgres, &a.postgres)),
        ("process", differs(&b.process, &a.process)),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(name, _)| format!("[{name}] changed: needs a restart"))
    .collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The reload status file: one JSON object, replaced whole (write, then rename) after
/// every reload, with a generation number `mailwarden reload` waits to see go up.
pub struct StatusFile {
    path: PathBuf,
    generation: Mutex<u64>,
}

/// What the status file holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Status {
    pub pid: u32,
    pub generation: u64,
    /// `started`, `ok` or `error`.
    pub result: String,
    /// The error (`file:line: key: reason`), or the running policy's version.
    pub message: String,
    pub restart_needed: Vec<String>,
}

impl StatusFile {
    fn new(path: PathBuf) -> StatusFile {
        let file = StatusFile {
            path,
            generation: Mutex::new(0),
        };
        file.store(&Status {
            pid: std::process::id(),
            generation: 0,
            result: "started".into(),
            message: String::new(),
            restart_needed: Vec::new(),
        });
        file
    }

    fn write(&self, result: &Result<Reloaded, String>) {
        let generation = {
            let mut g = lock(&self.generation);
            *g += 1;
            *g
        };
        let (word, message, restart_needed) = match result {
            Ok(o) => ("ok", o.policy.clone(), o.restart_needed.clone()),
            Err(e) => ("error", e.clone(), Vec::new()),
        };
        self.store(&Status {
            pid: std::process::id(),
            generation,
            result: word.into(),
            message,
            restart_needed,
        });
    }

    fn store(&self, status: &Status) {
        let tmp = self.path.with_extension("reload.tmp");
        let text = serde_json::to_string(status).unwrap_or_default();
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot write the reload status file");
        }
    }
}

/// Reads a reload status file (`mailwarden reload`).
pub fn read_status(path: &Path) -> Option<Status> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}
