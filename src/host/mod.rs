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
//! successor's state from the merge on; before it, they do too when they are absent, their
//! successor is usable and no config says they were left out (distributions that backported
//! the merge, such as RHEL 8).

mod cache;
mod choice;
mod detect;
mod doctor;
mod modules;

pub use cache::{first_run, is_our_entry, usable, Policy};
pub use choice::{choose, Chosen};
pub use detect::HostRoot;
pub use doctor::doctor_main;

use crate::backend::{BackendKind, BackendOptions, IptablesMode};
use crate::cni::error::{Code, Error, Result};
use crate::plan::{Families, InterceptPlan};
use detect::{Evidence, Finding, Sources, Tristate};
pub use modules::Modes;
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
    /// What stands in the way, one sentence each with its remedy; empty when `ok`.
    pub problems: Vec<String>,
    /// Advice that is no problem in itself (e.g. making a `modprobe` stick across reboots).
    pub tips: Vec<String>,
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
        tips: Vec::new(),
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

/// CNI STATUS: code 50 with the problems when the backend cannot work on this host (from the
/// once-per-boot verdict, so STATUS stays cheap).
pub fn status(kind: BackendKind, ipv6: bool, state_dir: &std::path::Path) -> Result<()> {
    let verdict = cache::cached_verdict(kind, ipv6, state_dir)?;
    status_of(verdict.ok, &verdict.backend, &verdict.problems)
}

fn status_of(ok: bool, backend: &str, problems: &[String]) -> Result<()> {
    if ok {
        return Ok(());
    }
    Err(Error::new(
        Code::PluginNotAvailable,
        format!(
            "the {backend} backend cannot work on this host: {}",
            problems.join(" ")
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
            // A backport (RHEL 8's 4.18): the old module is absent and no config says it was
            // left out, yet its successor is here.
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
        (ModuleState::Loadable, _) => "none: loads on demand".into(),
        (ModuleState::Loaded | ModuleState::Builtin, _) => String::new(),
        (ModuleState::Missing, Evidence::NotBuilt) => {
            format!("use a kernel built with CONFIG_{symbol}=y or =m")
        }
        (ModuleState::Missing, Evidence::NoModuleFile | Evidence::NotInIndex) => format!(
            "install {module}.ko (linux-modules-extra-{release} or kernel-modules-extra), \
             then `modprobe {module}`"
        ),
        (ModuleState::Missing, Evidence::Unverified | Evidence::Present) => {
            format!("`modprobe {module}`")
        }
    }
}

impl Report {
    /// Marks the modules the rules of `modes` need as required (for a config that asks for
    /// them) and sums the report up again.
    pub fn require_modes(&mut self, ipv6: bool, modes: Modes) {
        if !modes.any() {
            return;
        }
        for m in &mut self.modules {
            if Requirement::find(&m.name).is_some_and(|r| r.required_by(ipv6, modes)) {
                m.required = true;
            }
        }
        self.summarize();
    }

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
                "{} is missing ({}); it is needed for {}. Remedy: {}.",
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
        self.tips.clear();
        if modprobe {
            self.tips.push(
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs;

    const NFT: BackendKind = BackendKind::Nftables;
    const LEGACY: BackendKind = BackendKind::Iptables(IptablesMode::Legacy);
    const IPT_NFT: BackendKind = BackendKind::Iptables(IptablesMode::Nft);

    /// A temp dir usable as a state dir as it is: private (tempfile makes them 0755 here).
    pub(crate) fn private_tempdir() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        tempfile::Builder::new()
            .permissions(fs::Permissions::from_mode(0o700))
            .tempdir()
            .unwrap()
    }

    pub(crate) fn fixture(name: &str) -> HostRoot {
        HostRoot::new(format!(
            "{}/testdata/hosts/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
    }

    fn module<'r>(report: &'r Report, name: &str) -> &'r ModuleReport {
        report
            .modules
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} not in the {} table", report.backend))
    }

    fn state(report: &Report, name: &str) -> (ModuleState, String) {
        let m = module(report, name);
        (m.state, m.source.clone())
    }

    fn problems(report: &Report) -> String {
        report.problems.join("\n")
    }

    #[test]
    fn rhel9_like_host_serves_nftables_and_iptables_nft_but_not_legacy() {
        let root = fixture("rhel9-nft");
        let r = check(NFT, true, &root);
        assert!(r.ok, "{}", problems(&r));
        assert_eq!(r.kernel_release, "5.14.0-362.8.1.el9_3.x86_64");
        assert_eq!(
            state(&r, "nft_ct"),
            (ModuleState::Loaded, "/proc/modules".into())
        );
        let lib = "/lib/modules/5.14.0-362.8.1.el9_3.x86_64";
        assert_eq!(
            state(&r, "nft_nat"),
            (ModuleState::Loadable, format!("{lib}/modules.dep"))
        );
        assert_eq!(module(&r, "nft_nat").remedy, "none: loads on demand");
        // Not required, and its file is not installed: reported, but no problem.
        let tproxy = module(&r, "nft_tproxy");
        assert!(!tproxy.required);
        assert_eq!(tproxy.state, ModuleState::Missing);
        assert!(
            tproxy.source.contains("CONFIG_NFT_TPROXY=m, but"),
            "{}",
            tproxy.source
        );

        let r = check(IPT_NFT, true, &root);
        assert!(r.ok, "{}", problems(&r));
        assert_eq!(
            state(&r, "xt_tcpudp"),
            (ModuleState::Builtin, format!("{lib}/modules.builtin"))
        );
        assert_eq!(state(&r, "nft_compat").0, ModuleState::Loaded);

        let r = check(LEGACY, false, &root);
        assert!(!r.ok);
        let text = problems(&r);
        assert!(text.contains("ip_tables is missing"), "{text}");
        assert!(text.contains("iptable_nat is missing"), "{text}");
        assert!(
            text.contains("use a kernel built with CONFIG_IP_NF_IPTABLES=y or =m"),
            "{text}"
        );
        assert!(
            !text.contains("ip6_tables"),
            "IPv6 modules are not required: {text}"
        );
        // Nothing a modprobe could fix: no modprobe/SELinux advice.
        assert!(!text.contains("SELinux"), "{text}");
        assert!(check(LEGACY, true, &root)
            .problems
            .iter()
            .any(|p| p.starts_with("ip6_tables")));
    }

    #[test]
    fn old_kernel_is_too_old_for_nftables_and_keeps_its_split_modules() {
        let root = fixture("old-4.14");
        let r = check(NFT, false, &root);
        assert!(!r.ok);
        assert_eq!(r.problems.len(), 1, "{}", problems(&r));
        assert!(
            r.problems[0].contains("older than 5.13"),
            "{}",
            problems(&r)
        );
        // Before 5.1 the nat chain type is per family; the merged module is not in the table.
        assert!(r.modules.iter().all(|m| m.name != "nft_chain_nat"));
        assert_eq!(state(&r, "nft_chain_nat_ipv4").0, ModuleState::Loadable);

        let r = check(LEGACY, true, &root);
        assert!(r.ok, "{}", problems(&r));
        assert_eq!(
            state(&r, "nf_conntrack_ipv4"),
            (ModuleState::Loaded, "/proc/modules".into())
        );
        assert_eq!(state(&r, "nf_nat_redirect").0, ModuleState::Loaded);
        assert_eq!(state(&r, "nf_conntrack_ipv6").0, ModuleState::Loadable);
        assert!(check(IPT_NFT, true, &root).ok);
    }

    #[test]
    fn host_without_nf_tables_only_serves_iptables_legacy() {
        let root = fixture("no-nftables");
        let r = check(NFT, false, &root);
        assert!(!r.ok);
        let text = problems(&r);
        assert!(
            text.contains(
                "nf_tables is missing (/boot/config-5.10.162+: CONFIG_NF_TABLES is not set)"
            ),
            "{text}"
        );
        assert!(
            text.contains("nft_redir is missing (/boot/config-5.10.162+ has no CONFIG_NFT_REDIR)"),
            "{text}"
        );
        assert!(!check(IPT_NFT, false, &root).ok);
        let r = check(LEGACY, true, &root);
        assert!(r.ok, "{}", problems(&r));
        assert_eq!(
            state(&r, "xt_owner"),
            (
                ModuleState::Loadable,
                "/boot/config-5.10.162+: CONFIG_NETFILTER_XT_MATCH_OWNER=m".into()
            )
        );
        assert_eq!(state(&r, "xt_REDIRECT").0, ModuleState::Loaded);
        assert_eq!(state(&r, "iptable_nat").0, ModuleState::Builtin);
        // Merged in 5.1, and nf_nat is built in here.
        let (s, source) = state(&r, "nf_nat_ipv4");
        assert_eq!(s, ModuleState::Builtin);
        assert_eq!(
            source,
            "in nf_nat since Linux 5.1: /boot/config-5.10.162+: CONFIG_NF_NAT=y"
        );
    }

    #[test]
    fn module_files_alone_decide_and_family_matters() {
        let root = fixture("files-only");
        for kind in [NFT, IPT_NFT] {
            let r = check(kind, true, &root);
            assert!(r.ok, "{}", problems(&r));
        }
        let r = check(NFT, true, &root);
        assert!(r
            .modules
            .iter()
            .filter(|m| m.required)
            .all(|m| m.state == ModuleState::Loadable));
        assert!(check(LEGACY, false, &root).ok);
        let r = check(LEGACY, true, &root);
        assert!(!r.ok);
        let text = problems(&r);
        assert!(
            text.contains("ip6table_nat is missing (neither modules.dep nor modules.builtin"),
            "{text}"
        );
        assert!(text.contains("then `modprobe ip6table_nat`"), "{text}");
        assert!(
            !text.contains("SELinux"),
            "a tip among the problems: {text}"
        );
        assert!(r.tips.iter().any(|t| t.contains("SELinux")), "{:?}", r.tips);
        assert_eq!(state(&r, "bridge").0, ModuleState::Builtin);
    }

    #[test]
    fn built_in_only_host_like_this_machine_serves_every_backend() {
        let root = fixture("builtin-only");
        for kind in [NFT, LEGACY, IPT_NFT] {
            let r = check(kind, true, &root);
            assert!(r.ok, "{}: {}", r.backend, problems(&r));
            assert!(r
                .modules
                .iter()
                .filter(|m| m.required)
                .all(|m| m.state == ModuleState::Builtin));
        }
        let r = check(LEGACY, true, &root);
        assert_eq!(
            state(&r, "nf_nat"),
            (
                ModuleState::Builtin,
                "/proc/config.gz: CONFIG_NF_NAT=y".into()
            )
        );
        // The config omits CONFIG_IP_SET; the sysfs entry is positive evidence and wins.
        assert_eq!(
            state(&r, "ip_set"),
            (
                ModuleState::Builtin,
                "/sys/module/ip_set without initstate".into()
            )
        );
    }

    #[test]
    fn module_built_as_m_without_its_file_names_the_package() {
        let root = fixture("missing-extra");
        assert!(check(NFT, true, &root).ok);
        let r = check(LEGACY, false, &root);
        assert!(!r.ok);
        let text = problems(&r);
        for m in ["xt_owner", "xt_REDIRECT"] {
            assert!(text.contains(&format!("{m} is missing")), "{text}");
            assert!(text.contains(&format!("`modprobe {m}`")), "{text}");
        }
        assert!(
            text.contains("linux-modules-extra-6.8.0-31-generic"),
            "{text}"
        );
    }

    #[test]
    fn unverifiable_host_needs_the_probe_and_says_so() {
        let root = fixture("unverified");
        let r = check(NFT, false, &root);
        assert!(!r.ok);
        assert!(r.needs_probe());
        assert_eq!(
            state(&r, "nf_tables"),
            (
                ModuleState::Loaded,
                "/sys/module/nf_tables/initstate".into()
            )
        );
        assert_eq!(state(&r, "nf_conntrack").0, ModuleState::Builtin);
        assert_eq!(module(&r, "nft_redir").evidence, Evidence::Unverified);
        assert!(
            problems(&r).contains("without --host-root"),
            "{}",
            problems(&r)
        );

        // What the probe's outcome does to the report.
        let mut passed = r.clone();
        passed.confirm_by_probe();
        assert!(passed.ok, "{}", problems(&passed));
        assert!(module(&passed, "nft_redir")
            .source
            .starts_with("functional probe"));
        assert_eq!(module(&passed, "nft_redir").state, ModuleState::Builtin);
        // Optional modules are not the probe's business.
        assert_eq!(module(&passed, "nft_socket").state, ModuleState::Missing);

        let mut failed = r;
        failed.probe = Probe::Failed("Operation not supported".into());
        failed.summarize();
        assert!(!failed.ok);
        let text = problems(&failed);
        assert!(
            text.contains("functional probe could not program the nftables rules"),
            "{text}"
        );
        assert!(!text.contains("without --host-root"), "{text}");
    }

    #[test]
    fn no_probe_when_files_already_decided() {
        assert!(!check(NFT, false, &fixture("no-nftables")).needs_probe());
        assert!(!check(NFT, false, &fixture("old-4.14")).needs_probe());
        assert!(!check(NFT, false, &fixture("builtin-only")).needs_probe());
        // A host root is never probed: the probe would test the wrong kernel.
        let r = assess_at(&fixture("unverified"), NFT, false, false);
        assert_eq!(r.probe, Probe::NotRun);
    }

    #[test]
    fn backported_merge_counts_unless_the_config_says_not_set() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path());
        let write = |path: &str, text: &str| {
            let p = root.join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        };
        // RHEL 8: Linux 4.18 with the 4.19 conntrack merge backported.
        write("/proc/sys/kernel/osrelease", "4.18.0-305.el8.x86_64\n");
        write(
            "/boot/config-4.18.0-305.el8.x86_64",
            "CONFIG_NF_CONNTRACK=m\n",
        );
        write("/proc/modules", "nf_conntrack 1 0 - Live 0x0\n");
        let r = check(LEGACY, false, &root);
        let (s, source) = state(&r, "nf_conntrack_ipv4");
        assert_eq!(s, ModuleState::Loaded);
        assert_eq!(source, "in nf_conntrack (merge backported): /proc/modules");

        write(
            "/boot/config-4.18.0-305.el8.x86_64",
            "CONFIG_NF_CONNTRACK=m\n# CONFIG_NF_CONNTRACK_IPV4 is not set\n",
        );
        let r = check(LEGACY, false, &root);
        assert_eq!(state(&r, "nf_conntrack_ipv4").0, ModuleState::Missing);
        assert!(problems(&r).contains("nf_conntrack_ipv4 is missing"));
    }

    #[test]
    fn unknown_release_is_a_problem_and_checks_as_a_current_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let r = check(NFT, false, &HostRoot::new(dir.path()));
        assert!(!r.ok);
        assert_eq!(r.kernel_release, "");
        assert!(r.problems[0].contains("cannot read the kernel release"));
        assert!(r.modules.iter().any(|m| m.name == "nft_chain_nat"));
    }

    #[test]
    fn json_has_exactly_the_documented_keys() {
        let r = check(NFT, true, &fixture("rhel9-nft"));
        let v = serde_json::to_value(&r).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "backend",
                "kernelRelease",
                "modules",
                "ok",
                "problems",
                "tips"
            ]
        );
        let mut keys: Vec<&str> = v["modules"][0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            ["name", "neededFor", "remedy", "required", "source", "state"]
        );
        assert_eq!(v["modules"][0]["state"], "loaded");
        assert_eq!(v["backend"], "nftables");
    }

    /// This machine: all of netfilter built in, no /proc/modules, no /lib/modules. The files
    /// (config.gz) decide; on a host that loads modules on demand they would be loadable.
    #[test]
    fn real_host_serves_the_nftables_backend() {
        let r = assess(NFT, true);
        assert!(r.ok, "{}", problems(&r));
        assert!(!r.kernel_release.is_empty());
        for m in r.modules.iter().filter(|m| m.required) {
            assert!(m.state.usable(), "{}: {}", m.name, m.source);
        }
    }

    /// Root: each backend's rules are programmed and removed in a throwaway netns, both families,
    /// and the host's own tables are left alone. (Needs the nftables backend from issue 2.)
    #[test]
    fn functional_probe_programs_and_removes_each_backends_rules() {
        let host_rules = || -> Vec<String> {
            [
                "iptables-legacy-save",
                "iptables-nft-save",
                "ip6tables-nft-save",
            ]
            .iter()
            .flat_map(|tool| {
                let out = std::process::Command::new(format!("/usr/sbin/{tool}"))
                    .output()
                    .unwrap_or_else(|e| panic!("{tool}: {e}"));
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect()
        };
        let before = host_rules();
        for kind in [NFT, LEGACY, IPT_NFT] {
            functional_probe(kind, true).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        }
        assert_eq!(host_rules(), before);
    }

    /// Root: on a host root that cannot decide, the probe of the running kernel does.
    #[test]
    fn probe_decides_what_the_files_cannot() {
        for (kind, probed) in [
            (NFT, "nft_redir"),
            (LEGACY, "iptable_nat"),
            (IPT_NFT, "xt_owner"),
        ] {
            let r = assess_at(&fixture("unverified"), kind, true, true);
            assert_eq!(r.probe, Probe::Passed, "{}", problems(&r));
            assert!(r.ok, "{}", problems(&r));
            assert!(module(&r, probed).source.starts_with("functional probe"));
        }
        // Found by the files, so not the probe's doing.
        let r = assess_at(&fixture("unverified"), NFT, false, true);
        assert_eq!(state(&r, "nf_tables").0, ModuleState::Loaded);
    }

    #[test]
    fn status_is_code_50_with_the_problems() {
        let r = check(NFT, false, &fixture("no-nftables"));
        let e = status_of(r.ok, &r.backend, &r.problems).unwrap_err();
        assert_eq!(e.code, Code::PluginNotAvailable);
        assert_eq!(e.code as u32, 50);
        assert!(e.msg.contains("nf_tables is missing"), "{}", e.msg);
        let legacy = check(LEGACY, false, &fixture("no-nftables"));
        assert!(status_of(legacy.ok, &legacy.backend, &legacy.problems).is_ok());
        // This machine can serve the nftables backend.
        let state = private_tempdir();
        status(NFT, true, state.path()).unwrap();
    }
}
