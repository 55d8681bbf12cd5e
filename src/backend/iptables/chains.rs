//! The names the iptables backend shares between rendering and reading back: our chains, where
//! they are hooked, the jump rule, and the address families. Rendering (`render`) and reading
//! `-save` output (`save`) both depend on this, not on each other.

use crate::plan::rules::IpFamily;
use crate::plan::InterceptPlan;

/// Every chain this plugin creates starts with this; nothing else does.
pub const CHAIN_PREFIX: &str = "ICNI_";
pub const INBOUND_CHAIN: &str = "ICNI_INBOUND";
pub const OUTBOUND_CHAIN: &str = "ICNI_OUTBOUND";

/// Where each of our chains is hooked: (built-in chain, our chain).
pub const HOOKS: [(&str, &str); 2] = [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The position of this family in `ALL`.
    pub fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    pub fn enabled_in(self, plan: &InterceptPlan) -> bool {
        match self {
            Family::V4 => plan.families.ipv4,
            Family::V6 => plan.families.ipv6,
        }
    }

    pub fn ip(self) -> IpFamily {
        match self {
            Family::V4 => IpFamily::V4,
            Family::V6 => IpFamily::V6,
        }
    }
}

/// A jump from a built-in chain to one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub base: &'static str,
    pub chain: &'static str,
    pub spec: String,
    /// Inserted at the head of `base` rather than appended (it must see packets first).
    pub first: bool,
}

/// One of our chains and its rules, each without the leading `-A CHAIN `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: &'static str,
    pub rules: Vec<String>,
}

/// The rule spec of the jump from a built-in chain to ours.
pub fn jump_spec(chain: &str) -> String {
    format!("-p tcp -j {chain}")
}

/// Compares rendered restore input with `testdata/iptables/<name>`; `INTERCEPT_CNI_BLESS=1`
/// rewrites the golden file instead (review the diff).
#[cfg(test)]
pub fn assert_golden(name: &str, rendered: &str) {
    let path: std::path::PathBuf = [env!("CARGO_MANIFEST_DIR"), "testdata", "iptables", name]
        .iter()
        .collect();
    if std::env::var_os("INTERCEPT_CNI_BLESS").is_some() {
        std::fs::write(&path, rendered).unwrap();
    }
    let golden =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(rendered, golden, "{name} differs from the rendering");
}
