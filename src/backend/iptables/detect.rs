//! `iptablesMode: auto`: pick the variant the host already uses, as a careful operator would.

use super::chains::Family;
use super::tools::{mode_name, Tools};
use crate::backend::{BackendOptions, IptablesMode};

/// Chains kubelet creates so that tools can tell which variant the node uses.
const KUBE_HINT_CHAINS: [&str; 2] = [":KUBE-IPTABLES-HINT ", ":KUBE-KUBELET-CANARY "];

/// What one variant's `*-save` showed in the host netns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostRules {
    pub rules: usize,
    pub kube_hint: bool,
}

impl HostRules {
    pub fn count(save_output: &str) -> HostRules {
        HostRules {
            rules: save_output.lines().filter(|l| l.starts_with("-A ")).count(),
            kube_hint: save_output
                .lines()
                .any(|l| KUBE_HINT_CHAINS.iter().any(|h| l.starts_with(h))),
        }
    }

    fn add(self, other: HostRules) -> HostRules {
        HostRules {
            rules: self.rules + other.rules,
            kube_hint: self.kube_hint || other.kube_hint,
        }
    }
}

/// Decides from what the host shows: `None` for a variant whose binaries are missing or fail.
/// `kernel_supports` is the host prerequisite check for each variant.
pub fn choose_mode(
    legacy: Option<HostRules>,
    nft: Option<HostRules>,
    kernel_supports: impl Fn(IptablesMode) -> bool,
) -> (IptablesMode, String) {
    let of = |mode| match mode {
        IptablesMode::Legacy => legacy,
        IptablesMode::Nft => nft,
    };
    for mode in [IptablesMode::Nft, IptablesMode::Legacy] {
        if of(mode).is_some_and(|r| r.kube_hint) {
            return (
                mode,
                format!("kubelet's hint chains are in iptables-{}", mode_name(mode)),
            );
        }
    }
    let legacy_rules = legacy.map_or(0, |r| r.rules);
    let nft_rules = nft.map_or(0, |r| r.rules);
    if legacy_rules > nft_rules {
        return (
            IptablesMode::Legacy,
            format!("the host has {legacy_rules} iptables-legacy rules and {nft_rules} iptables-nft rules"),
        );
    }
    if nft_rules > 0 {
        return (
            IptablesMode::Nft,
            format!("the host has {nft_rules} iptables-nft rules and {legacy_rules} iptables-legacy rules"),
        );
    }
    for mode in [IptablesMode::Nft, IptablesMode::Legacy] {
        if of(mode).is_some() && kernel_supports(mode) {
            return (
                mode,
                format!(
                    "the host has no iptables rules yet and the kernel supports iptables-{}",
                    mode_name(mode)
                ),
            );
        }
    }
    (
        IptablesMode::Nft,
        "no iptables rules on the host and no variant known to work; nft is the default".into(),
    )
}

/// Resolves `iptablesMode: auto`. Must run in the host netns (the caller's own); only lists
/// tables, so it creates nothing. The choice and the reason are logged and returned.
pub fn detect_mode(
    options: &BackendOptions,
    kernel_supports: impl Fn(IptablesMode) -> bool,
) -> (IptablesMode, String) {
    let tools = Tools {
        dir: options.iptables_path.as_deref(),
    };
    let census = |mode| {
        Family::ALL
            .iter()
            .filter_map(|&family| match tools.save_all(mode, family) {
                Ok(text) => Some(HostRules::count(&text)),
                Err(e) => {
                    log::debug!("iptablesMode auto: {e}");
                    None
                }
            })
            .reduce(HostRules::add)
    };
    let (mode, why) = choose_mode(
        census(IptablesMode::Legacy),
        census(IptablesMode::Nft),
        kernel_supports,
    );
    log::info!(
        "iptablesMode auto: using iptables-{} because {why}",
        mode_name(mode)
    );
    (mode, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(n: usize) -> Option<HostRules> {
        Some(HostRules {
            rules: n,
            kube_hint: false,
        })
    }

    #[test]
    fn counts_rules_and_kubelet_hints() {
        let text = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j KUBE-SERVICES\n-A OUTPUT -j X\n# -A comment\nCOMMIT\n";
        assert_eq!(
            HostRules::count(text),
            HostRules {
                rules: 2,
                kube_hint: true
            }
        );
    }

    #[test]
    fn existing_rules_win_then_kernel_support_then_nft() {
        let hinted = Some(HostRules {
            rules: 0,
            kube_hint: true,
        });
        assert_eq!(
            choose_mode(rules(50), hinted, |_| true).0,
            IptablesMode::Nft
        );
        assert_eq!(
            choose_mode(hinted, rules(50), |_| true).0,
            IptablesMode::Legacy
        );
        assert_eq!(
            choose_mode(rules(9), rules(3), |_| true).0,
            IptablesMode::Legacy
        );
        assert_eq!(
            choose_mode(rules(3), rules(9), |_| true).0,
            IptablesMode::Nft
        );
        assert_eq!(choose_mode(None, rules(1), |_| false).0, IptablesMode::Nft);
        let only_legacy = |m| m == IptablesMode::Legacy;
        let (mode, why) = choose_mode(rules(0), rules(0), only_legacy);
        assert_eq!(mode, IptablesMode::Legacy);
        assert!(why.contains("kernel supports"), "{why}");
        // Binaries missing for legacy: its kernel support alone does not make it usable.
        assert_eq!(
            choose_mode(None, rules(0), only_legacy).0,
            IptablesMode::Nft
        );
        assert_eq!(choose_mode(None, None, |_| false).0, IptablesMode::Nft);
    }
}
