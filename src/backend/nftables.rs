//! nftables backend: one table owned by the plugin, built and sent in one netlink batch.

use super::Backend;
use crate::cni::error::{Error, Result};
use crate::plan::InterceptPlan;

/// Programs the plugin's own nftables table over netlink (no `nft` binary needed).
pub struct Nftables;

impl Backend for Nftables {
    fn name(&self) -> &'static str {
        "nftables"
    }

    // Scaffolding until the backend lands (issue 2); never reported done in this state.
    fn apply(&self, _plan: &InterceptPlan) -> Result<()> {
        Err(Error::backend("nftables backend not implemented yet"))
    }

    fn check(&self, _plan: &InterceptPlan) -> Result<()> {
        Err(Error::backend("nftables backend not implemented yet"))
    }

    fn remove(&self) -> Result<()> {
        Err(Error::backend("nftables backend not implemented yet"))
    }
}
