//! Reading `*-save -t nat` output: the plugin's chains, the jumps to them, and how they differ
//! from the expected rendering. Pure; the text comes from `tools::save`.

use super::chains::{Chain, Family, Hook, CHAIN_PREFIX};

/// Longest chain name the kernel accepts (XT_EXTENSION_MAXNAMELEN - 1).
const MAX_CHAIN_NAME: usize = 28;

/// The nat table as `-save` printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatTable {
    chains: Vec<String>,
    /// (chain, rule spec without the leading `-A CHAIN `), in order.
    rules: Vec<(String, String)>,
}

/// A rule outside our chains whose target is one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub from: String,
    pub target: String,
    pub spec: String,
}

impl Jump {
    /// Plain tokens only (letters, digits, `-_.:/,!+`), so the rule can be re-sent as `-D` input
    /// without anything from the kernel being able to add a line or a quoted argument.
    pub fn is_plain(&self) -> bool {
        let plain_name = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        plain_name(&self.from)
            && !self.spec.is_empty()
            && self
                .spec
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:/,!+ ".contains(&b))
    }
}

/// A chain name this plugin would create: the prefix, then upper-case letters, digits, `_`.
pub fn is_own_chain(name: &str) -> bool {
    name.len() <= MAX_CHAIN_NAME
        && name.starts_with(CHAIN_PREFIX)
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

impl NatTable {
    /// Parses the `*nat` section; other tables, comments and counters are ignored.
    #[cfg(test)]
    pub fn parse(text: &str) -> NatTable {
        NatTable::parse_table(text, "nat")
    }

    /// Parses the section of table `wanted` (the type serves every table, not only nat).
    pub fn parse_table(text: &str, wanted: &str) -> NatTable {
        let mut table = NatTable::default();
        let mut in_nat = false;
        for line in text.lines() {
            let line = line.trim_end();
            if let Some(name) = line.strip_prefix('*') {
                in_nat = name == wanted;
            } else if !in_nat {
                continue;
            } else if line == "COMMIT" {
                in_nat = false;
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    table.chains.push(name.to_string());
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
                table
                    .rules
                    .push((chain.to_string(), spec.trim().to_string()));
            }
        }
        table
    }

    /// Our chains present in the table, in the order `-save` listed them.
    pub fn own_chains(&self) -> Vec<&str> {
        self.chains
            .iter()
            .map(String::as_str)
            .filter(|c| is_own_chain(c))
            .collect()
    }

    pub fn has_chain(&self, name: &str) -> bool {
        self.chains.iter().any(|c| c == name)
    }

    pub fn rules_of<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.rules
            .iter()
            .filter(move |(c, _)| c == chain)
            .map(|(_, spec)| spec.as_str())
    }

    /// Rules in chains that are not ours that jump (`-j`) or go (`-g`) to one of ours.
    pub fn jumps_to_own(&self) -> Vec<Jump> {
        self.rules
            .iter()
            .filter(|(chain, _)| !is_own_chain(chain))
            .filter_map(|(chain, spec)| {
                let tokens: Vec<&str> = spec.split_whitespace().collect();
                let target = tokens
                    .windows(2)
                    .find(|w| (w[0] == "-j" || w[0] == "-g") && is_own_chain(w[1]))?[1];
                Some(Jump {
                    from: chain.clone(),
                    target: target.to_string(),
                    spec: spec.clone(),
                })
            })
            .collect()
    }
}

/// Everything that differs between `table` and the `expected` chains and `hooks` of one family
/// (none expected: the family is not intercepted and must hold nothing of ours). Empty when
/// intact.
pub fn drift(expected: &[Chain], hooks: &[Hook], table: &NatTable, family: Family) -> Vec<String> {
    let fam = family.label();
    let mut found = Vec::new();
    for chain in expected {
        if !table.has_chain(chain.name) {
            found.push(format!("{fam} chain {} is missing", chain.name));
            continue;
        }
        let actual: Vec<String> = table.rules_of(chain.name).map(normalize).collect();
        let wanted: Vec<String> = chain.rules.iter().map(|r| normalize(r)).collect();
        if let Some(diff) = first_difference(&actual, &wanted) {
            found.push(format!("{fam} chain {}: {diff}", chain.name));
        }
    }
    for name in table.own_chains() {
        if !expected.iter().any(|c| c.name == name) {
            found.push(format!("{fam} chain {name} should not exist"));
        }
    }
    let jumps = table.jumps_to_own();
    for Hook {
        base, chain, spec, ..
    } in hooks
    {
        if !expected.iter().any(|c| c.name == *chain) {
            continue;
        }
        let spec = normalize(spec);
        let count = jumps
            .iter()
            .filter(|j| j.from == *base && normalize(&j.spec) == spec)
            .count();
        if count != 1 {
            found.push(format!(
                "{fam} {base} has {count} jumps to {chain}, expected exactly 1"
            ));
        }
    }
    for jump in &jumps {
        let canonical = hooks.iter().any(|hook| {
            jump.from == hook.base
                && normalize(&jump.spec) == normalize(&hook.spec)
                && expected.iter().any(|c| c.name == hook.chain)
        });
        if !canonical {
            found.push(format!(
                "{fam} {} has an unexpected rule `{}`",
                jump.from, jump.spec
            ));
        }
    }
    found
}

fn first_difference(actual: &[String], wanted: &[String]) -> Option<String> {
    for (i, (a, w)) in actual.iter().zip(wanted).enumerate() {
        if a != w {
            return Some(format!("rule {} is `{a}`, expected `{w}`", i + 1));
        }
    }
    match actual.len().cmp(&wanted.len()) {
        std::cmp::Ordering::Less => Some(format!(
            "rule {} `{}` is missing",
            actual.len() + 1,
            wanted[actual.len()]
        )),
        std::cmp::Ordering::Greater => Some(format!(
            "rule {} `{}` should not be there",
            wanted.len() + 1,
            actual[wanted.len()]
        )),
        std::cmp::Ordering::Equal => None,
    }
}

/// Irons out what iptables versions print differently for the same rule: the implicit
/// `-m tcp` after `-p tcp`, and host prefixes (`/32`, `/128`) on addresses.
fn normalize(rule: &str) -> String {
    let tokens: Vec<&str> = rule.split_whitespace().collect();
    let mut out: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        let token = tokens[i];
        if token == "-m" && tokens.get(i + 1) == Some(&"tcp") && out.ends_with(&["-p", "tcp"]) {
            i += 2;
            continue;
        }
        if matches!(out.last(), Some(&"-s") | Some(&"-d")) {
            let bare = token
                .strip_suffix("/32")
                .filter(|a| !a.contains(':'))
                .or_else(|| token.strip_suffix("/128").filter(|a| a.contains(':')))
                .unwrap_or(token);
            out.push(bare);
        } else {
            out.push(token);
        }
        i += 1;
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::iptables::chains::{INBOUND_CHAIN, OUTBOUND_CHAIN};
    use crate::backend::iptables::render::{chains, nat_hooks};
    use crate::plan::{Families, InterceptPlan};

    const SAVED: &str = "# Generated by iptables-save v1.8.9
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j ICNI_INBOUND
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ICNI_INBOUND - [0:0]
:ICNI_custom - [0:0]
-A PREROUTING -p tcp -j ICNI_INBOUND
-A PREROUTING -m comment --comment \"x y\" -j ICNI_INBOUND
-A OUTPUT -j KUBE-SERVICES
-A ICNI_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
COMMIT
";

    #[test]
    fn parses_only_the_nat_table_and_our_chains() {
        let t = NatTable::parse(SAVED);
        assert_eq!(t.own_chains(), vec![INBOUND_CHAIN]);
        let jumps = t.jumps_to_own();
        assert_eq!(jumps.len(), 2);
        assert!(jumps[0].is_plain());
        assert!(!jumps[1].is_plain(), "quoted comment must not be re-sent");
        assert_eq!(
            t.rules_of(INBOUND_CHAIN).collect::<Vec<_>>(),
            vec!["-p tcp -m tcp --dport 15006 -j RETURN"]
        );
    }

    #[test]
    fn own_chain_names_are_strict() {
        assert!(is_own_chain("ICNI_OUTBOUND"));
        for other in [
            "ICNI_x",
            "ICNI_A B",
            "KUBE-SERVICES",
            "ICNI_AAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert!(!is_own_chain(other), "{other}");
        }
    }

    #[test]
    fn normalize_irons_out_version_differences() {
        assert_eq!(
            normalize("-d 10.0.0.1/32  -p tcp -m tcp --dport 80 -j RETURN"),
            normalize("-d 10.0.0.1 -p tcp --dport 80 -j RETURN")
        );
        assert_eq!(normalize("-s ::1/128 -j RETURN"), "-s ::1 -j RETURN");
        assert_eq!(
            normalize("-s 10.0.0.0/8 -j RETURN"),
            "-s 10.0.0.0/8 -j RETURN"
        );
    }

    fn installed(plan: &InterceptPlan) -> String {
        let mut text = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        let chains = chains(plan, Family::V4);
        for c in &chains {
            text += &format!(":{} - [0:0]\n", c.name);
        }
        text += "-A PREROUTING -p tcp -j ICNI_INBOUND\n-A OUTPUT -p tcp -j ICNI_OUTBOUND\n";
        for c in &chains {
            for r in &c.rules {
                text += &format!("-A {} {r}\n", c.name);
            }
        }
        text + "COMMIT\n"
    }

    #[test]
    fn intact_rules_show_no_drift_and_each_change_is_named() {
        let plan = InterceptPlan::with_defaults(Families::BOTH);
        let expected = chains(&plan, Family::V4);
        let good = installed(&plan);
        assert!(drift(
            &expected,
            &nat_hooks(&plan),
            &NatTable::parse(&good),
            Family::V4
        )
        .is_empty());

        let flushed = good.replace("-A ICNI_OUTBOUND ", "# ");
        let d = drift(
            &expected,
            &nat_hooks(&plan),
            &NatTable::parse(&flushed),
            Family::V4,
        );
        assert!(
            d[0].contains(OUTBOUND_CHAIN) && d[0].contains("missing"),
            "{d:?}"
        );

        let doubled = good.replace(
            "-A OUTPUT -p tcp -j ICNI_OUTBOUND\n",
            "-A OUTPUT -p tcp -j ICNI_OUTBOUND\n-A OUTPUT -p tcp -j ICNI_OUTBOUND\n",
        );
        let d = drift(
            &expected,
            &nat_hooks(&plan),
            &NatTable::parse(&doubled),
            Family::V4,
        );
        assert!(d.iter().any(|m| m.contains("has 2 jumps")), "{d:?}");

        let changed = good.replace("--to-ports 15001", "--to-ports 15002");
        let d = drift(
            &expected,
            &nat_hooks(&plan),
            &NatTable::parse(&changed),
            Family::V4,
        );
        assert!(d[0].contains("15002") && d[0].contains("expected"), "{d:?}");

        // A family that is not intercepted must hold nothing of ours.
        let d = drift(&[], &[], &NatTable::parse(&good), Family::V6);
        assert_eq!(d.len(), 4, "{d:?}");
    }
}
