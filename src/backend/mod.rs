//! The backend boundary: one trait named by its verbs, one implementation per file, and the
//! choice of backend. Backends run inside the pod netns (see `netns::PodNetns::run`); they never choose
//! the namespace themselves.

use crate::cni::error::Result;
use crate::plan::InterceptPlan;
use std::path::Path;

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
    /// Whether anything this plugin installs is present (`intercept-cni audit` reports pods
    /// intercepted against the policy).
    fn installed(&self) -> Result<bool>;
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
pub fn build(kind: BackendKind, options: &BackendOptions) -> Box<dyn Backend> {
    match kind {
        BackendKind::Nftables => Box::new(nftables::Nftables),
        BackendKind::Iptables(mode) => Box::new(iptables::Iptables::new(mode, options)),
    }
}

/// Resolves a config's choice on this host (call it in the host netns): an explicit backend
/// wins; `auto` probes.
/// An explicit choice always wins. `auto` takes nftables when this host's kernel supports it,
/// else iptables; `iptablesMode: auto` asks `iptables::detect_mode`, with the kernel's support
/// for each variant from the once-per-boot host check cached in `state_dir`.
pub fn resolve(
    choice: BackendChoice,
    options: &BackendOptions,
    state_dir: &Path,
) -> Result<BackendKind> {
    let iptables_auto = || {
        let (mode, why) = iptables::detect_mode(options, |mode| {
            crate::host::usable(BackendKind::Iptables(mode), false, state_dir)
        });
        log::debug!("iptablesMode auto: {why}");
        BackendKind::Iptables(mode)
    };
    Ok(match choice {
        BackendChoice::Nftables => BackendKind::Nftables,
        BackendChoice::Iptables(Some(mode)) => BackendKind::Iptables(mode),
        BackendChoice::Iptables(None) => iptables_auto(),
        BackendChoice::Auto if crate::host::usable(BackendKind::Nftables, false, state_dir) => {
            BackendKind::Nftables
        }
        BackendChoice::Auto => {
            log::info!("backend auto: the kernel cannot serve nftables; using iptables");
            iptables_auto()
        }
    })
}
