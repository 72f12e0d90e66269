//! Administration: the command-line tools that work on the local stores, and the state
//! the admin HTTP API shares with the running proxy.

pub mod accounts_cli;
pub mod config_cli;
pub mod dmarc_reports_cli;
pub mod http;
pub mod policy_cli;
pub mod preview;
pub mod quarantine_cli;
pub mod quarantine_migrate;
pub mod release;
pub mod reload_cli;

use std::sync::Arc;

use crate::config::Config;
use crate::policy::Inspector;
use crate::quarantine::QuarantineStore;
use crate::relay::NextHops;

/// What the admin API acts on: the running proxy's own objects.
#[derive(Clone)]
pub struct AdminState {
    pub config: Arc<Config>,
    /// `None` when checks (and so the quarantine) are off.
    pub quarantine: Option<Arc<dyn QuarantineStore>>,
    /// The verdict engine: policy version and last reload result.
    pub inspector: Arc<dyn Inspector>,
    /// Every next hop; a release goes through the one of the entry's listener role.
    pub next_hops: Arc<NextHops>,
    /// The outbound burst detector (accounts, freezes); `None` when `[outbound]` is off.
    pub detector: Option<Arc<crate::outbound::Detector>>,
    /// Outbound DKIM signing, for releases of submission entries (`[[dkim.sign]]`).
    pub signer: Option<Arc<crate::signing::Signer>>,
    /// The proxy's running configuration once it is serving: a reload replaces the
    /// engine, the next hops and the detector, and the API must act on the ones in use
    /// (a freeze made on a replaced detector would never apply). Empty: the fields above.
    pub live: Arc<std::sync::OnceLock<Arc<crate::server::reload::Live>>>,
}

impl AdminState {
    /// The running proxy's objects, following its reloads.
    pub fn of(live: Arc<crate::server::reload::Live>) -> AdminState {
        let now = live.current();
        let shared = &now.shared;
        let state = AdminState {
            config: shared.config.clone(),
            quarantine: shared.quarantine.clone(),
            inspector: shared.inspector.clone(),
            next_hops: now.next_hops.clone(),
            detector: shared.outbound.clone(),
            signer: shared.signer.clone(),
            live: Arc::new(std::sync::OnceLock::new()),
        };
        let _ = state.live.set(live.clone());
        state
    }

    /// The configuration running now.
    pub fn config(&self) -> Arc<Config> {
        match self.live.get() {
            Some(l) => l.current().shared.config.clone(),
            None => self.config.clone(),
        }
    }

    /// The verdict engine running now.
    pub fn inspector(&self) -> Arc<dyn Inspector> {
        match self.live.get() {
            Some(l) => l.current().shared.inspector.clone(),
            None => self.inspector.clone(),
        }
    }

    /// The next hops in use now (releases go through them).
    pub fn next_hops(&self) -> Arc<NextHops> {
        match self.live.get() {
            Some(l) => l.current().next_hops.clone(),
            None => self.next_hops.clone(),
        }
    }

    /// The DKIM signer in use now (keys re-read by a reload).
    pub fn signer(&self) -> Option<Arc<crate::signing::Signer>> {
        match self.live.get() {
            Some(l) => l.current().shared.signer.clone(),
            None => self.signer.clone(),
        }
    }

    /// The outbound detector in use now.
    pub fn detector(&self) -> Option<Arc<crate::outbound::Detector>> {
        match self.live.get() {
            Some(l) => l.current().shared.outbound.clone(),
            None => self.detector.clone(),
        }
    }
}

/// Terminal-safe, width-bounded text for the admin tables: control characters (terminal
/// escapes) become spaces, and text longer than `width` ends in `…`.
pub(crate) fn clip(s: &str, width: usize) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() <= width {
        clean
    } else {
        let mut t: String = clean.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}
