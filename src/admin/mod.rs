//! Administration: the command-line tools that work on the local stores, and the state
//! the admin HTTP API shares with the running proxy.

pub mod accounts_cli;
pub mod dmarc_reports_cli;
pub mod http;
pub mod policy_cli;
pub mod quarantine_cli;

use std::sync::Arc;

use crate::config::Config;
use crate::policy::Inspector;
use crate::quarantine::Quarantine;
use crate::relay::NextHops;

/// What the admin API acts on: the running proxy's own objects.
#[derive(Clone)]
pub struct AdminState {
    pub config: Arc<Config>,
    /// `None` when checks (and so the quarantine) are off.
    pub quarantine: Option<Arc<Quarantine>>,
    /// The verdict engine: policy version and last reload result.
    pub inspector: Arc<dyn Inspector>,
    /// Every next hop; a release goes through the one of the entry's listener role.
    pub next_hops: Arc<NextHops>,
    /// The outbound burst detector (accounts, freezes); `None` when `[outbound]` is off.
    pub detector: Option<Arc<crate::outbound::Detector>>,
}
