//! Host prerequisites: the kernel modules each backend needs, how to detect them, the
//! once-per-boot verdict cache, and the `doctor` command that shows it all.
//!
//! # Module states and which source decides
//! Each module gets one state; the first source in this list that gives positive evidence
//! decides it (and is named in the report's `source`):
//! 1. `loaded`: listed in `/proc/modules` (and not unloading), or `/sys/module/NAME/initstate`
//!    says `live` (or `coming`).
//! 2. `builtin`: listed in `/lib/modules/RELEASE/modules.builtin`; or `CONFIG_X=y` in the kernel
//!    config (`/proc/config.gz`, else `/boot/config-RELEASE`); or `/sys/module/NAME` exists without
//!    an `initstate` (only built-in code has no init state).
//! 3. `loadable`: a module file for this kernel in `modules.dep`; or `CONFIG_X=m` when
//!    `modules.dep` cannot be read. The kernel loads it on first use.
//! 4. `missing`, otherwise, with the evidence: the config says it was not built (`is not set`, or
//!    the symbol is absent); `=m` but `modules.dep` has no file for it (the modules package is not
//!    installed); or neither index lists it. When no config and no complete module index can be
//!    read, "missing" is unverified: the functional probe (rules programmed and removed in a
//!    throwaway netns) decides instead, unless the host root is not the running system.
//!
//! Positive evidence beats negative: a loaded out-of-tree module counts even if the config says
//! "not set". Modules that newer kernels merged into another one (see `modules`) take their
//! successor's state from the merge on; before it, they do too when the config does not know
//! their symbol at all (distributions that backported the merge).

mod cache;
mod detect;
mod doctor;
mod modules;

pub use cache::{first_run, Policy};
pub use detect::HostRoot;
pub use doctor::doctor_main;

use crate::backend::{BackendKind, BackendOptions, IptablesMode};
use crate::cni::error::{Code, Error, Result};
use crate::plan::{Families, InterceptPlan};
use detect::{Evidence, Finding, Sources, Tristate};
use modules::{KernelVersion, Requirement};
use serde::{Deserialize, Serialize};

/// How usable a module is on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModuleState {
    Loaded,
    Builtin,
    Loadable,
    Missing,
}

impl ModuleState {
    pub fn usable(self) -> bool {
        self != ModuleState::Missing
    }

    fn as_str(self) -> &'static str {
        match self {
            ModuleState::Loaded => "loaded",
            ModuleState::Builtin => "builtin",
            ModuleState::Loadable => "loadable",
            ModuleState::Missing => "missing",
        }
    }
}

/// One module of the backend's table, as found on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleReport {
    pub name: String,
    pub required: bool,
    pub state: ModuleState,
    pub needed_for: String,
    pub source: String,
    /// What to do about it; empty when nothing needs doing.
    #[serde(skip)]
    pub remedy: String,
    #[serde(skip)]
    evidence: Evidence,
}

/// What the functional probe said, when it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Probe {
    NotRun,
    Passed,
    Failed(String),
}

/// The verdict for one backend on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub kernel_release: String,
    pub backend: String,
    /// Every required module is usable and the kernel is new enough.
    pub ok: bool,
    pub modules: Vec<ModuleReport>,
    /// Sentences for the operator, each with its remedy.
    pub problems: Vec<String>,
    #[serde(skip)]
    kernel_problem: Option<String>,
    #[serde(skip)]
    probe: Probe,
}

/// The name a backend goes by in reports, logs and cache files.
pub fn backend_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Nftables => "nftables",
        BackendKind::Iptables(IptablesMode::Legacy) => "iptables-legacy",
        BackendKind::Iptables(IptablesMode::Nft) => "iptables-nft",
    }
}

/// Checks the backend's modules and kernel release from the files under `root` alone.
pub fn check(kind: BackendKind, ipv6: bool, root: &HostRoot) -> Report {
    let sources = Sources::read(root);
    let kernel = sources
        .release
        .as_deref()
        .and_then(KernelVersion::from_release);
    let kernel_problem = match (&sources.release, kernel, modules::minimum_kernel(kind)) {
        (None, _, _) => Some(
            "cannot read the kernel release from /proc/sys/kernel/osrelease; module names \
             are checked as on a current kernel"
                .to_string(),
        ),
        (Some(release), None, _) => Some(format!(
            "cannot parse kernel release {release:?}; module names are checked as on a current kernel"
        )),
        (Some(release), Some(version), Some(min)) if version < min => Some(format!(
            "Linux {release} is older than {min}, the oldest kernel the {} backend supports: \
             upgrade the kernel or use \"backend\": \"iptables\"",
            backend_name(kind)
        )),
        _ => None,
    };
    let modules = modules::table(kind, kernel)
        .into_iter()
        .map(|req| module_report(req, ipv6, kernel, &sources))
        .collect();
    let mut report = Report {
        kernel_release: sources.release.clone().unwrap_or_default(),
        backend: backend_name(kind).to_string(),
        ok: false,
        modules,
        problems: Vec::new(),
        kernel_problem,
        probe: Probe::NotRun,
    };
    report.summarize();
    report
}

/// `check` on the running system, plus the functional probe when the files cannot decide.
pub fn assess(kind: BackendKind, ipv6: bool) -> Report {
    assess_at(&HostRoot::real(), kind, ipv6, true)
}

pub(crate) fn assess_at(root: &HostRoot, kind: BackendKind, ipv6: bool, probe: bool) -> Report {
    let report = check(kind, ipv6, root);
    if !probe || !report.needs_probe() {
        return report;
    }
    match functional_probe(kind, ipv6) {
        Ok(()) => {
            // The probe may have loaded modules on demand: read the files again.
            let mut after = check(kind, ipv6, root);
            after.confirm_by_probe();
            after
        }
        Err(e) => {
            let mut report = report;
            report.probe = Probe::Failed(e.to_string());
            report.summarize();
            report
        }
    }
}

/// Programs the backend's default rules in a throwaway netns and removes them again: the
/// kernel itself answers whether every module the rules need is there (or loads on demand).
pub fn functional_probe(kind: BackendKind, ipv6: bool) -> Result<()> {
    crate::netns::run_in_new(|| {
        let backend = crate::backend::build(kind, &BackendOptions::default());
        let families = Families { ipv4: true, ipv6 };
        backend.apply(&InterceptPlan::with_defaults(families))?;
        backend.remove()
    })
}

/// CNI STATUS: code 50 with the problems when the backend cannot work on this host.
pub fn status(kind: BackendKind, ipv6: bool) -> Result<()> {
    let report = assess(kind, ipv6);
    if report.ok {
        return Ok(());
    }
    Err(Error::new(
        Code::PluginNotAvailable,
        format!(
            "the {} backend cannot work on this host: {}",
            report.backend,
            report.problems.join(" ")
        ),
    ))
}

fn module_report(
    req: &Requirement,
    ipv6: bool,
    kernel: Option<KernelVersion>,
    sources: &Sources,
) -> ModuleReport {
    let own = sources.find(req.name, req.config);
    let (finding, target) = match req.merged {
        Some(merge) => {
            let successor = Requirement::find(merge.into).map_or(req.config, |s| s.config);
            let merged_here = kernel.is_none_or(|k| k >= merge.since);
            // A backport: the config never heard of the old symbol, yet the successor is here.
            let backported = !merged_here
                && !own.state.usable()
                && sources.config_says(req.config) != Some(Some(Tristate::NotSet));
            let by_successor = sources.find(merge.into, successor);
            if merged_here || (backported && by_successor.state.usable()) {
                let how = if merged_here {
                    format!("in {} since Linux {}", merge.into, merge.since)
                } else {
                    format!("in {} (merge backported)", merge.into)
                };
                let source = format!("{how}: {}", by_successor.source);
                let finding = Finding {
                    source,
                    ..by_successor
                };
                (finding, (merge.into, successor))
            } else {
                (own, (req.name, req.config))
            }
        }
        None => (own, (req.name, req.config)),
    };
    ModuleReport {
        name: req.name.to_string(),
        required: req.required(ipv6),
        state: finding.state,
        needed_for: req.needed_for.to_string(),
        remedy: remedy(&finding, target, sources.release.as_deref()),
        source: finding.source,
        evidence: finding.evidence,
    }
}

/// What an operator can do about a missing module (`module`, built by `CONFIG_<symbol>`).
fn remedy(finding: &Finding, (module, symbol): (&str, &str), release: Option<&str>) -> String {
    let release = release.unwrap_or("$(uname -r)");
    match (finding.state, finding.evidence) {
        (ModuleState::Loadable, _) => {
            format!("none: loads on first use (`modprobe {module}` to load it now)")
        }
        (ModuleState::Loaded | ModuleState::Builtin, _) => String::new(),
        (ModuleState::Missing, Evidence::NotBuilt) => {
            format!("the kernel was built without it: use a kernel with CONFIG_{symbol}=y or =m")
        }
        (ModuleState::Missing, Evidence::NoModuleFile | Evidence::NotInIndex) => format!(
            "install the kernel modules package for {release} that ships {module}.ko \
             (e.g. linux-modules-extra-{release}, kernel-modules-extra), then `modprobe {module}`"
        ),
        (ModuleState::Missing, Evidence::Unverified | Evidence::Present) => {
            format!("`modprobe {module}`")
        }
    }
}

impl Report {
    /// Only unverified modules stand between this report and a pass: the probe can decide.
    fn needs_probe(&self) -> bool {
        let failing = self.required_missing();
        self.kernel_problem.is_none()
            && failing.clone().next().is_some()
            && failing
                .into_iter()
                .all(|m| m.evidence == Evidence::Unverified)
    }

    fn required_missing(&self) -> impl Iterator<Item = &ModuleReport> + Clone {
        self.modules
            .iter()
            .filter(|m| m.required && !m.state.usable())
    }

    /// The probe programmed the rules: every module they need is in the running kernel.
    fn confirm_by_probe(&mut self) {
        for m in self.modules.iter_mut() {
            if m.required && !m.state.usable() && m.evidence == Evidence::Unverified {
                m.state = ModuleState::Builtin;
                m.evidence = Evidence::Present;
                m.remedy.clear();
                m.source =
                    "functional probe: the backend's rules were programmed in a throwaway netns"
                        .into();
            }
        }
        self.probe = Probe::Passed;
        self.summarize();
    }

    /// Derives `problems` and `ok` from the module states, the kernel and the probe.
    fn summarize(&mut self) {
        let mut problems: Vec<String> = self.kernel_problem.iter().cloned().collect();
        let mut modprobe = false;
        let mut unverified = false;
        for m in self.required_missing() {
            modprobe |= m.remedy.contains("modprobe");
            unverified |= m.evidence == Evidence::Unverified;
            problems.push(format!(
                "{} is missing ({}), needed for {}: {}.",
                m.name, m.source, m.needed_for, m.remedy
            ));
        }
        match &self.probe {
            Probe::Failed(e) => problems.push(format!(
                "the functional probe could not program the {} rules in a throwaway netns: {e}",
                self.backend
            )),
            Probe::NotRun if unverified => problems.push(
                "no kernel config or module index could confirm the unverified modules: run \
                 `intercept-cni doctor` on the node itself (without --host-root) to probe the kernel"
                    .into(),
            ),
            Probe::NotRun | Probe::Passed => {}
        }
        if modprobe {
            problems.push(
                "Make loaded modules stick across reboots by listing them in \
                 /etc/modules-load.d/intercept-cni.conf. If they exist but do not load on \
                 demand, SELinux policy may be blocking automatic module loading (seen on some \
                 RHEL releases: https://www.suse.com/support/kb/doc/?id=000020241); loading them \
                 explicitly at boot works around it."
                    .into(),
            );
        }
        self.ok = problems.is_empty();
        self.problems = problems;
    }
}
