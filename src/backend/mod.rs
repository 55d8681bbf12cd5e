//! The backend boundary: one trait named by its verbs, one implementation per file, and the
//! choice of backend. Backends run inside the pod netns (see `netns::run_in`); they never choose
//! the namespace themselves.

use crate::cni::error::Result;
use crate::plan::InterceptPlan;

pub mod iptables;
pub mod nftables;

/// Installs, verifies and removes one pod's interception rules in the current network namespace.
pub trait Backend {
    /// Short name for logs and errors.
    fn name(&self) -> &'static str;
    /// Install the plan atomically, replacing whatever this plugin installed before.
    fn apply(&self, plan: &InterceptPlan) -> Result<()>;
    /// Compare the installed rules with what `apply(plan)` would install; describe any drift.
    fn check(&self, plan: &InterceptPlan) -> Result<()>;
    /// Remove everything this plugin installed; absent rules are success.
    fn remove(&self) -> Result<()>;
}

/// Which iptables binaries to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesMode {
    Legacy,
    Nft,
}

/// The backend a config asks for, before `Auto` is resolved on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Nftables,
    /// `None` mode means `iptablesMode: auto`.
    Iptables(Option<IptablesMode>),
}

/// A backend resolved to something concrete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Nftables,
    Iptables(IptablesMode),
}

/// Options that only some backends use; validated in `cni::config`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendOptions {
    /// Directory holding the `iptables-*-restore`/`-save` binaries, when not in the usual places.
    pub iptables_path: Option<std::path::PathBuf>,
}

/// The concrete backend for a resolved kind.
pub fn build(kind: BackendKind, options: &BackendOptions) -> Box<dyn Backend + Send + Sync> {
    match kind {
        BackendKind::Nftables => Box::new(nftables::Nftables),
        BackendKind::Iptables(mode) => Box::new(iptables::Iptables::new(mode, options)),
    }
}

/// Resolves a config's choice on this host (call it in the host netns): an explicit backend
/// wins; `auto` probes.
pub fn resolve(choice: BackendChoice, options: &BackendOptions) -> Result<BackendKind> {
    Ok(match choice {
        // nftables is the preferred backend; probing it for `auto` comes with the host checks.
        BackendChoice::Auto | BackendChoice::Nftables => BackendKind::Nftables,
        BackendChoice::Iptables(Some(mode)) => BackendKind::Iptables(mode),
        // Until the host prerequisite checks land, no variant is assumed supported by the
        // kernel: the choice rests on what the host's tables show.
        BackendChoice::Iptables(None) => {
            BackendKind::Iptables(iptables::detect_mode(options, |_| false).0)
        }
    })
}
