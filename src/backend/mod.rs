//! The backend boundary: one trait named by its verbs, one implementation per file, and the
//! choice of backend. Backends run inside the pod netns (see `netns::PodNetns::run`); they never choose
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

/// Resolves a config's choice on this host (call it in the host netns). An explicit choice
/// always wins. `auto` takes nftables when `kernel_supports` it, else iptables;
/// `iptablesMode: auto` asks `iptables::detect_mode`. `kernel_supports` is the caller's host
/// check (the driver choice stays above the drivers); its error fails the resolution.
pub fn resolve(
    choice: BackendChoice,
    options: &BackendOptions,
    kernel_supports: impl Fn(BackendKind) -> Result<bool>,
) -> Result<BackendKind> {
    let iptables_auto = || {
        let failure = std::cell::RefCell::new(None);
        let (mode, why) = iptables::detect_mode(options, |mode| {
            kernel_supports(BackendKind::Iptables(mode)).unwrap_or_else(|e| {
                failure.borrow_mut().get_or_insert(e);
                false
            })
        });
        if let Some(e) = failure.into_inner() {
            return Err(e);
        }
        log::debug!("iptablesMode auto: {why}");
        Ok(BackendKind::Iptables(mode))
    };
    match choice {
        BackendChoice::Nftables => Ok(BackendKind::Nftables),
        BackendChoice::Iptables(Some(mode)) => Ok(BackendKind::Iptables(mode)),
        BackendChoice::Iptables(None) => iptables_auto(),
        BackendChoice::Auto if kernel_supports(BackendKind::Nftables)? => Ok(BackendKind::Nftables),
        BackendChoice::Auto => {
            log::info!("backend auto: the kernel cannot serve nftables; using iptables");
            iptables_auto()
        }
    }
}
