//! Which backend the plugin will use on a host, and that backend's host check: what `doctor
//! --backend auto` shows and what the agent's readiness requires. Follows `backend::resolve`:
//! an explicit backend wins; `auto` takes nftables when the kernel serves it, else iptables in
//! the variant `iptablesMode: auto` picks.

use super::{assess_at, backend_name, HostRoot, Report};
use crate::backend::{iptables, BackendChoice, BackendKind, BackendOptions};

/// The backend chosen, why, and its report.
pub struct Chosen {
    pub kind: BackendKind,
    pub why: String,
    pub report: Report,
}

/// The choice is made on IPv4, as the plugin makes it; the report covers IPv6 too when `ipv6`.
/// `probe`: whether the functional probe may decide unverified modules (only on the running
/// system, as root).
pub fn choose(
    choice: BackendChoice,
    options: &BackendOptions,
    root: &HostRoot,
    ipv6: bool,
    probe: bool,
) -> Chosen {
    let assess = |kind| assess_at(root, kind, false, probe);
    let (kind, why) = match choice {
        BackendChoice::Nftables => (BackendKind::Nftables, "configured".to_string()),
        BackendChoice::Iptables(Some(mode)) => {
            (BackendKind::Iptables(mode), "configured".to_string())
        }
        BackendChoice::Iptables(None) => {
            let (mode, why) =
                iptables::detect_mode(options, |mode| assess(BackendKind::Iptables(mode)).ok);
            (
                BackendKind::Iptables(mode),
                format!("iptablesMode auto: {why}"),
            )
        }
        BackendChoice::Auto => {
            let nft = assess(BackendKind::Nftables);
            if nft.ok {
                return Chosen {
                    kind: BackendKind::Nftables,
                    why: "backend auto: the kernel serves nftables".into(),
                    report: if ipv6 {
                        assess_at(root, BackendKind::Nftables, true, probe)
                    } else {
                        nft
                    },
                };
            }
            let (mode, why) =
                iptables::detect_mode(options, |mode| assess(BackendKind::Iptables(mode)).ok);
            (
                BackendKind::Iptables(mode),
                format!(
                    "backend auto: the kernel cannot serve nftables ({}), and {why}",
                    nft.problems.first().map_or("", String::as_str)
                ),
            )
        }
    };
    Chosen {
        kind,
        why,
        report: assess_at(root, kind, ipv6, probe),
    }
}

impl Chosen {
    pub fn backend(&self) -> &'static str {
        backend_name(self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::tests::fixture;

    #[test]
    fn auto_takes_nftables_when_the_kernel_serves_it_else_iptables() {
        let options = BackendOptions::default();
        let chosen = choose(
            BackendChoice::Auto,
            &options,
            &fixture("builtin-only"),
            false,
            false,
        );
        assert_eq!(chosen.backend(), "nftables");
        assert!(chosen.report.ok);
        let chosen = choose(
            BackendChoice::Auto,
            &options,
            &fixture("no-nftables"),
            false,
            false,
        );
        assert!(
            matches!(chosen.kind, BackendKind::Iptables(_)),
            "{}",
            chosen.why
        );
        assert!(
            chosen.why.contains("cannot serve nftables"),
            "{}",
            chosen.why
        );
        let chosen = choose(
            BackendChoice::Nftables,
            &options,
            &fixture("no-nftables"),
            false,
            false,
        );
        assert_eq!(chosen.backend(), "nftables");
        assert!(!chosen.report.ok);
    }
}
