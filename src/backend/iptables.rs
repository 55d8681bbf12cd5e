//! iptables backend: nat-table chains applied with `iptables-{legacy,nft}-restore --noflush`.

use super::{Backend, BackendOptions, IptablesMode};
use crate::cni::error::{Error, Result};
use crate::plan::InterceptPlan;

/// Drives `iptables-{legacy,nft}-restore`/`-save` (and the ip6tables pair) inside the pod netns.
pub struct Iptables {
    mode: IptablesMode,
    options: BackendOptions,
}

impl Iptables {
    pub fn new(mode: IptablesMode, options: &BackendOptions) -> Self {
        Iptables {
            mode,
            options: options.clone(),
        }
    }
}

impl Backend for Iptables {
    fn name(&self) -> &'static str {
        match self.mode {
            IptablesMode::Legacy => "iptables-legacy",
            IptablesMode::Nft => "iptables-nft",
        }
    }

    // Scaffolding until the backend lands (issue 4); never reported done in this state.
    fn apply(&self, _plan: &InterceptPlan) -> Result<()> {
        let _ = &self.options;
        Err(Error::backend("iptables backend not implemented yet"))
    }

    fn check(&self, _plan: &InterceptPlan) -> Result<()> {
        Err(Error::backend("iptables backend not implemented yet"))
    }

    fn remove(&self) -> Result<()> {
        Err(Error::backend("iptables backend not implemented yet"))
    }
}
