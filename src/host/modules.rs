//! The kernel modules each backend needs: one table per backend and iptables mode, filtered by
//! IP family and feature. Derived from the Istio platform requirements (the seed) and from what
//! our REDIRECT-mode rules really use. The modules of DNS capture, TPROXY and INVALID drop are
//! required only when a config asks for those modes (`Modes`); the seed's modules for features
//! we do not implement (ambient mode, node bridging) are listed as not required, for reference.
//!
//! Module names changed over kernel history; each rename below was checked against the kernel
//! sources and their commit history:
//! - `nf_conntrack_ipv4`/`_ipv6` were merged into `nf_conntrack` in Linux 4.19
//!   (a0ae2562c6c4, "netfilter: conntrack: remove l3proto abstraction"; RHEL 8 backported it to 4.18).
//! - `nf_nat_ipv4`/`_ipv6` were merged into `nf_nat` in Linux 5.1 (3bf195ae6037, "netfilter: nat:
//!   merge nf_nat_ipv4,6 into nat core"; CONFIG_NF_NAT_IPV4/6 disappeared).
//! - `nf_nat_redirect` became part of `nf_nat.ko` in the same 5.1 NAT consolidation
//!   (`nf_nat-$(CONFIG_NF_NAT_REDIRECT) += nf_nat_redirect.o`; CONFIG_NF_NAT_REDIRECT turned bool).
//! - `nft_chain_nat_ipv4`/`_ipv6` were merged into `nft_chain_nat` (built by CONFIG_NFT_NAT) in
//!   Linux 5.1 (db8ab38880e0, "netfilter: nf_tables: merge ipv4 and ipv6 nat chain types").
//! - `nf_defrag_ipv4`/`_ipv6` and the `xt_*` modules kept their names; `xt_tcpudp` is built by
//!   CONFIG_NETFILTER_XTABLES together with `x_tables`.

use crate::backend::{BackendKind, IptablesMode};

/// A kernel version, compared numerically (`5.13 > 5.4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl KernelVersion {
    pub const fn new(major: u32, minor: u32) -> Self {
        KernelVersion {
            major,
            minor,
            patch: 0,
        }
    }

    /// Reads the numeric prefix of a release string: `5.14.0-362.el9.x86_64` is 5.14.0.
    /// `None` when it does not start with at least `MAJOR.MINOR`.
    pub fn from_release(release: &str) -> Option<Self> {
        let numeric: &str = release
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()?;
        let mut parts = numeric.split('.').filter(|p| !p.is_empty());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(KernelVersion {
            major,
            minor,
            patch,
        })
    }
}

impl std::fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The oldest kernel a backend supports, when it has a minimum.
pub fn minimum_kernel(kind: BackendKind) -> Option<KernelVersion> {
    match kind {
        // The seed: nftables-based interception needs Linux 5.13 or newer.
        BackendKind::Nftables => Some(KernelVersion::new(5, 13)),
        BackendKind::Iptables(_) => None,
    }
}

/// Which pods need a module: every pod, or only pods with IPv6 addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Any,
    Ipv6,
}

/// What a module serves. `Redirect` (our default rules) makes a module required; `Mode`, only
/// when one of its modes is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// The rules this plugin installs.
    Redirect,
    /// Rules of the modes that a config turns on.
    Mode(Modes),
    /// Features of other meshes' rules that this plugin does not install.
    NotUsed,
}

/// The modes beyond TCP REDIRECT a config asks for (or a module serves).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Modes {
    pub dns: bool,
    pub tproxy: bool,
    pub drop_invalid: bool,
}

impl Modes {
    const DNS: Modes = Modes {
        dns: true,
        tproxy: false,
        drop_invalid: false,
    };
    const TPROXY: Modes = Modes {
        dns: false,
        tproxy: true,
        drop_invalid: false,
    };
    /// Connection state and marks: TPROXY and INVALID drop.
    const CONNTRACK: Modes = Modes {
        dns: false,
        tproxy: true,
        drop_invalid: true,
    };
    /// The ct expression: zones (DNS), state and marks (TPROXY, INVALID drop).
    const ALL: Modes = Modes {
        dns: true,
        tproxy: true,
        drop_invalid: true,
    };

    fn meets(self, other: Modes) -> bool {
        (self.dns && other.dns)
            || (self.tproxy && other.tproxy)
            || (self.drop_invalid && other.drop_invalid)
    }

    pub fn any(self) -> bool {
        self.meets(Modes::ALL)
    }
}

/// A module that newer kernels fold into another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merge {
    pub into: &'static str,
    pub since: KernelVersion,
}

/// One row of a backend's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    pub name: &'static str,
    /// The Kconfig symbol that builds it (without `CONFIG_`).
    pub config: &'static str,
    pub needed_for: &'static str,
    pub family: Family,
    pub feature: Feature,
    /// Set when the module only exists before this kernel; its successor serves from then on.
    pub merged: Option<Merge>,
    /// Set when the module only exists from this kernel on (its predecessors carry `merged`).
    pub since: Option<KernelVersion>,
}

impl Requirement {
    /// Required for this pod family on the plugin's own rules.
    pub fn required(&self, ipv6: bool) -> bool {
        self.feature == Feature::Redirect && (self.family == Family::Any || ipv6)
    }

    /// Required by the rules of `modes` for this pod family.
    pub fn required_by(&self, ipv6: bool, modes: Modes) -> bool {
        matches!(self.feature, Feature::Mode(serves) if serves.meets(modes))
            && (self.family == Family::Any || ipv6)
    }

    /// The table row for `name`, in any backend's table.
    pub fn find(name: &str) -> Option<&'static Requirement> {
        ALL.iter().flat_map(|t| t.iter()).find(|r| r.name == name)
    }
}

const fn row(
    name: &'static str,
    config: &'static str,
    family: Family,
    feature: Feature,
    needed_for: &'static str,
) -> Requirement {
    Requirement {
        name,
        config,
        needed_for,
        family,
        feature,
        merged: None,
        since: None,
    }
}

const fn merged(mut r: Requirement, into: &'static str, since: KernelVersion) -> Requirement {
    r.merged = Some(Merge { into, since });
    r
}

const fn since(mut r: Requirement, version: KernelVersion) -> Requirement {
    r.since = Some(version);
    r
}

use Family::{Any, Ipv6};
use Feature::{Mode, NotUsed, Redirect};

const V4_19: KernelVersion = KernelVersion::new(4, 19);
const V5_1: KernelVersion = KernelVersion::new(5, 1);

/// Connection tracking and NAT: every backend redirects through them.
#[rustfmt::skip]
const NAT_CORE: &[Requirement] = &[
    row("nf_conntrack", "NF_CONNTRACK", Any, Redirect,
        "connection tracking: NAT state and the original destination"),
    merged(row("nf_conntrack_ipv4", "NF_CONNTRACK_IPV4", Any, Redirect,
        "IPv4 connection tracking"), "nf_conntrack", V4_19),
    merged(row("nf_conntrack_ipv6", "NF_CONNTRACK_IPV6", Ipv6, Redirect,
        "IPv6 connection tracking"), "nf_conntrack", V4_19),
    row("nf_defrag_ipv4", "NF_DEFRAG_IPV4", Any, Redirect,
        "IPv4 reassembly before connection tracking"),
    row("nf_defrag_ipv6", "NF_DEFRAG_IPV6", Ipv6, Redirect,
        "IPv6 reassembly before connection tracking"),
    row("nf_nat", "NF_NAT", Any, Redirect, "NAT core: rewrites destinations to the proxy"),
    merged(row("nf_nat_ipv4", "NF_NAT_IPV4", Any, Redirect, "IPv4 NAT"), "nf_nat", V5_1),
    merged(row("nf_nat_ipv6", "NF_NAT_IPV6", Ipv6, Redirect, "IPv6 NAT"), "nf_nat", V5_1),
];

/// The nat chain type of nf_tables (nftables backend and iptables-nft).
#[rustfmt::skip]
const NFT_NAT_CHAINS: &[Requirement] = &[
    row("nf_tables", "NF_TABLES", Any, Redirect, "nf_tables core: tables, chains, rules, sets"),
    since(row("nft_chain_nat", "NFT_NAT", Any, Redirect,
        "nat chains hooked at prerouting and output"), V5_1),
    merged(row("nft_chain_nat_ipv4", "NFT_CHAIN_NAT_IPV4", Any, Redirect,
        "IPv4 nat chains"), "nft_chain_nat", V5_1),
    merged(row("nft_chain_nat_ipv6", "NFT_CHAIN_NAT_IPV6", Ipv6, Redirect,
        "IPv6 nat chains"), "nft_chain_nat", V5_1),
];

#[rustfmt::skip]
const NFTABLES: &[Requirement] = &[
    row("nft_nat", "NFT_NAT", Any, Mode(Modes::DNS), "nat expression: DNS capture's dnat"),
    row("nft_ct", "NFT_CT", Any, Mode(Modes::ALL),
        "ct expression: DNS capture's conntrack zones, TPROXY's and INVALID drop's state and marks"),
    row("nft_redir", "NFT_REDIR", Any, Redirect, "redirect to the proxy ports"),
    row("nft_socket", "NFT_SOCKET", Any, NotUsed,
        "socket expression (other TPROXY rule sets), not used here"),
    row("nft_tproxy", "NFT_TPROXY", Any, Mode(Modes::TPROXY),
        "tproxy statement: TPROXY interception"),
];

/// The transparent-proxy core both `nft_tproxy` and `xt_TPROXY` use.
#[rustfmt::skip]
const TPROXY_CORE: &[Requirement] = &[
    row("nf_tproxy_ipv4", "NF_TPROXY_IPV4", Any, Mode(Modes::TPROXY),
        "TPROXY socket lookup (IPv4)"),
    row("nf_tproxy_ipv6", "NF_TPROXY_IPV6", Ipv6, Mode(Modes::TPROXY),
        "TPROXY socket lookup (IPv6)"),
];

/// xtables matches and targets, shared by both iptables modes.
#[rustfmt::skip]
const XTABLES: &[Requirement] = &[
    row("x_tables", "NETFILTER_XTABLES", Any, Redirect, "xtables core"),
    row("xt_tcpudp", "NETFILTER_XTABLES", Any, Redirect, "-p tcp and --dport matches"),
    row("xt_multiport", "NETFILTER_XT_MATCH_MULTIPORT", Any, Redirect,
        "--dports port lists"),
    row("xt_owner", "NETFILTER_XT_MATCH_OWNER", Any, Redirect,
        "--uid-owner/--gid-owner: the proxy's own traffic bypasses"),
    row("xt_REDIRECT", "NETFILTER_XT_TARGET_REDIRECT", Any, Redirect,
        "REDIRECT target to the proxy ports"),
    merged(row("nf_nat_redirect", "NF_NAT_REDIRECT", Any, Redirect,
        "REDIRECT address selection"), "nf_nat", V5_1),
    row("xt_conntrack", "NETFILTER_XT_MATCH_CONNTRACK", Any, Mode(Modes::CONNTRACK),
        "--ctstate: TPROXY's established connections, INVALID drop"),
    row("xt_mark", "NETFILTER_XT_MARK", Any, Mode(Modes::TPROXY),
        "MARK and --mark: TPROXY's divert marks"),
    row("xt_connmark", "NETFILTER_XT_CONNMARK", Any, Mode(Modes::TPROXY),
        "CONNMARK: TPROXY's marks kept in the connection"),
    row("xt_TPROXY", "NETFILTER_XT_TARGET_TPROXY", Any, Mode(Modes::TPROXY),
        "TPROXY target: TPROXY interception"),
    row("xt_CT", "NETFILTER_XT_TARGET_CT", Any, Mode(Modes::DNS),
        "CT --zone: DNS capture's conntrack zones"),
    row("ip_set", "IP_SET", Any, NotUsed, "ambient mode (Istio), not used here"),
    row("ip_set_hash_ip", "IP_SET_HASH_IP", Any, NotUsed, "ambient mode (Istio), not used here"),
    row("br_netfilter", "BRIDGE_NETFILTER", Any, NotUsed,
        "node-level filtering of bridged traffic, not pod rules"),
    row("bridge", "BRIDGE", Any, NotUsed, "node-level bridging, not pod rules"),
];

#[rustfmt::skip]
const IPTABLES_LEGACY: &[Requirement] = &[
    row("ip_tables", "IP_NF_IPTABLES", Any, Redirect, "iptables-legacy (IPv4)"),
    row("ip6_tables", "IP6_NF_IPTABLES", Ipv6, Redirect, "ip6tables-legacy (IPv6)"),
    row("iptable_nat", "IP_NF_NAT", Any, Redirect, "the IPv4 nat table"),
    row("ip6table_nat", "IP6_NF_NAT", Ipv6, Redirect, "the IPv6 nat table"),
    row("iptable_mangle", "IP_NF_MANGLE", Any, Mode(Modes::CONNTRACK),
        "the IPv4 mangle table: TPROXY, INVALID drop"),
    row("ip6table_mangle", "IP6_NF_MANGLE", Ipv6, Mode(Modes::CONNTRACK),
        "the IPv6 mangle table: TPROXY, INVALID drop"),
    row("iptable_raw", "IP_NF_RAW", Any, Mode(Modes::DNS),
        "the IPv4 raw table: DNS capture's conntrack zones"),
    row("ip6table_raw", "IP6_NF_RAW", Ipv6, Mode(Modes::DNS),
        "the IPv6 raw table: DNS capture's conntrack zones"),
];

const IPTABLES_NFT: &[Requirement] = &[row(
    "nft_compat",
    "NFT_COMPAT",
    Any,
    Redirect,
    "xtables matches and targets inside nf_tables",
)];

const ALL: &[&[Requirement]] = &[
    NAT_CORE,
    NFT_NAT_CHAINS,
    NFTABLES,
    TPROXY_CORE,
    XTABLES,
    IPTABLES_LEGACY,
    IPTABLES_NFT,
];

/// The rows for a backend on a kernel: rows that only exist from a later kernel on are left out
/// (their predecessors are in the table instead). An unknown kernel counts as a current one.
pub fn table(kind: BackendKind, kernel: Option<KernelVersion>) -> Vec<&'static Requirement> {
    let groups: &[&[Requirement]] = match kind {
        BackendKind::Nftables => &[NFT_NAT_CHAINS, NFTABLES, NAT_CORE, TPROXY_CORE],
        BackendKind::Iptables(IptablesMode::Legacy) => {
            &[IPTABLES_LEGACY, XTABLES, NAT_CORE, TPROXY_CORE]
        }
        BackendKind::Iptables(IptablesMode::Nft) => {
            &[NFT_NAT_CHAINS, IPTABLES_NFT, XTABLES, NAT_CORE, TPROXY_CORE]
        }
    };
    groups
        .iter()
        .flat_map(|g| g.iter())
        .filter(|r| match (r.since, kernel) {
            (Some(since), Some(kernel)) => kernel >= since,
            _ => true,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [BackendKind; 3] = [
        BackendKind::Nftables,
        BackendKind::Iptables(IptablesMode::Legacy),
        BackendKind::Iptables(IptablesMode::Nft),
    ];

    #[test]
    fn release_strings_parse_to_versions() {
        let v = |s| KernelVersion::from_release(s);
        assert_eq!(
            v("6.18.44-fc-v782"),
            Some(KernelVersion {
                major: 6,
                minor: 18,
                patch: 44
            })
        );
        assert_eq!(
            v("5.14.0-362.8.1.el9_3.x86_64"),
            Some(KernelVersion {
                major: 5,
                minor: 14,
                patch: 0
            })
        );
        assert_eq!(
            v("4.14.35-1902.el7uek"),
            Some(KernelVersion {
                major: 4,
                minor: 14,
                patch: 35
            })
        );
        assert_eq!(v("5.4"), Some(KernelVersion::new(5, 4)));
        assert_eq!(v("6"), None);
        assert_eq!(v("garbage"), None);
        assert_eq!(v(""), None);
        assert!(KernelVersion::new(5, 13) > KernelVersion::new(5, 4));
        assert!(v("5.13.0").unwrap() >= KernelVersion::new(5, 13));
        assert!(v("5.12.19").unwrap() < KernelVersion::new(5, 13));
    }

    #[test]
    fn every_row_names_a_config_symbol_and_a_purpose() {
        for r in ALL.iter().flat_map(|t| t.iter()) {
            assert!(
                !r.config.is_empty() && !r.config.starts_with("CONFIG_"),
                "{}",
                r.name
            );
            assert!(r
                .config
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'));
            assert!(!r.needed_for.is_empty(), "{}", r.name);
            if let Some(m) = r.merged {
                assert!(
                    Requirement::find(m.into).is_some(),
                    "{} merges into unknown",
                    r.name
                );
            }
        }
    }

    #[test]
    fn every_seed_module_is_in_its_backends_table() {
        let seed_iptables = [
            "br_netfilter",
            "ip6table_mangle",
            "ip6table_nat",
            "ip6table_raw",
            "iptable_mangle",
            "iptable_nat",
            "iptable_raw",
            "xt_REDIRECT",
            "xt_connmark",
            "xt_conntrack",
            "xt_mark",
            "xt_owner",
            "xt_tcpudp",
            "xt_multiport",
            "ip_set",
            "bridge",
            "ip6_tables",
            "ip_tables",
            "nf_conntrack",
            "nf_conntrack_ipv4",
            "nf_conntrack_ipv6",
            "nf_nat",
            "nf_nat_ipv4",
            "nf_nat_ipv6",
            "nf_nat_redirect",
            "x_tables",
            "ip_set_hash_ip",
        ];
        let seed_nftables = [
            "nf_tables",
            "nf_conntrack",
            "nft_ct",
            "nf_defrag_ipv4",
            "nf_defrag_ipv6",
            "nft_nat",
            "nft_socket",
            "nft_tproxy",
            "nft_redir",
        ];
        let names = |kind| -> Vec<&str> { table(kind, None).iter().map(|r| r.name).collect() };
        let legacy = names(BackendKind::Iptables(IptablesMode::Legacy));
        for m in seed_iptables {
            assert!(
                legacy.contains(&m),
                "{m} missing from the iptables-legacy table"
            );
        }
        let nft = names(BackendKind::Nftables);
        for m in seed_nftables {
            assert!(nft.contains(&m), "{m} missing from the nftables table");
        }
    }

    #[test]
    fn iptables_nft_uses_nf_tables_and_no_legacy_tables() {
        let rows = table(BackendKind::Iptables(IptablesMode::Nft), None);
        let names: Vec<&str> = rows.iter().map(|r| r.name).collect();
        for m in [
            "nf_tables",
            "nft_compat",
            "nft_chain_nat",
            "xt_REDIRECT",
            "xt_owner",
        ] {
            assert!(names.contains(&m), "{m}");
        }
        for m in ["ip_tables", "iptable_nat", "ip6_tables", "ip6table_nat"] {
            assert!(!names.contains(&m), "{m}");
        }
    }

    #[test]
    fn rows_appear_only_on_kernels_that_have_them() {
        let has = |kind, kernel, name| table(kind, kernel).iter().any(|r| r.name == name);
        let old = Some(KernelVersion::new(4, 14));
        let new = Some(KernelVersion::new(6, 1));
        assert!(!has(BackendKind::Nftables, old, "nft_chain_nat"));
        assert!(has(BackendKind::Nftables, old, "nft_chain_nat_ipv4"));
        assert!(has(BackendKind::Nftables, new, "nft_chain_nat"));
        // Merged predecessors stay listed; their successor decides their state.
        assert!(has(BackendKind::Nftables, new, "nf_conntrack_ipv4"));
    }

    #[test]
    fn required_depends_on_family_and_feature() {
        for kind in KINDS {
            for r in table(kind, None) {
                match (r.feature, r.family) {
                    (Feature::NotUsed | Feature::Mode(_), _) => {
                        assert!(!r.required(true) && !r.required(false))
                    }
                    (Feature::Redirect, Family::Ipv6) => {
                        assert!(r.required(true) && !r.required(false))
                    }
                    (Feature::Redirect, Family::Any) => {
                        assert!(r.required(true) && r.required(false))
                    }
                }
            }
        }
    }

    #[test]
    fn modes_require_their_modules_on_each_backend() {
        let required = |kind, modes: Modes, ipv6| -> Vec<&str> {
            table(kind, None)
                .iter()
                .filter(|r| r.required_by(ipv6, modes))
                .map(|r| r.name)
                .collect()
        };
        let dns = Modes {
            dns: true,
            ..Modes::default()
        };
        let tproxy = Modes {
            tproxy: true,
            ..Modes::default()
        };
        let drop = Modes {
            drop_invalid: true,
            ..Modes::default()
        };
        let legacy = BackendKind::Iptables(IptablesMode::Legacy);
        assert_eq!(
            required(BackendKind::Nftables, dns, false),
            ["nft_nat", "nft_ct"]
        );
        assert_eq!(
            required(BackendKind::Nftables, tproxy, true),
            ["nft_ct", "nft_tproxy", "nf_tproxy_ipv4", "nf_tproxy_ipv6"]
        );
        assert_eq!(
            required(legacy, dns, true),
            ["iptable_raw", "ip6table_raw", "xt_CT"]
        );
        assert_eq!(
            required(legacy, drop, false),
            ["iptable_mangle", "xt_conntrack"]
        );
        let nft_tproxy = required(BackendKind::Iptables(IptablesMode::Nft), tproxy, false);
        for m in [
            "xt_TPROXY",
            "xt_mark",
            "xt_connmark",
            "xt_conntrack",
            "nf_tproxy_ipv4",
        ] {
            assert!(nft_tproxy.contains(&m), "{m}");
        }
        assert!(required(legacy, Modes::default(), true).is_empty());
    }

    #[test]
    fn only_nftables_has_a_minimum_kernel() {
        assert_eq!(
            minimum_kernel(BackendKind::Nftables),
            Some(KernelVersion::new(5, 13))
        );
        assert_eq!(
            minimum_kernel(BackendKind::Iptables(IptablesMode::Nft)),
            None
        );
        assert_eq!(
            minimum_kernel(BackendKind::Iptables(IptablesMode::Legacy)),
            None
        );
    }
}
