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
    /// Its position in `from`, from 1: how it is deleted (its text is never sent back).
    pub number: usize,
}

impl Jump {
    /// Whether `-D <from> <number>` can name its chain: a plain name (letters, digits, `-_.`),
    /// so nothing from the kernel can add a word or a line to the restore input.
    pub fn deletable(&self) -> bool {
        !self.from.is_empty()
            && self
                .from
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    }
}

/// Targets after which the packet goes on to the next rule: a rule with one of these, or with
/// no target, decides nothing about where a connection goes.
const GOES_ON: [&str; 14] = [
    "LOG", "NFLOG", "ULOG", "TRACE", "MARK", "CONNMARK", "AUDIT", "SET", "CHECKSUM", "TOS", "DSCP",
    "TTL", "HL", "CLASSIFY",
];

/// The words of a rule as `-save` prints them; a double-quoted word (a comment's text, with
/// `\"` and `\\` inside) is one word, marked quoted so it is never taken for an option.
fn words(spec: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut chars = spec.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut word = String::new();
        let quoted = c == '"';
        if quoted {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => word.extend(chars.next()),
                    '"' => break,
                    c => word.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        out.push((word, quoted));
    }
    out
}

/// Every (target, goto) an unquoted `-j`/`-g` names. More than one only when an option's
/// unquoted value is `-j` (iptables-legacy-save quotes a comment only when it has spaces), so
/// the target is the last, and a jump to ours is any of them.
fn targets(spec: &str) -> Vec<(String, bool)> {
    let words = words(spec);
    words
        .windows(2)
        .filter_map(|w| match (&w[0], &w[1]) {
            ((flag, false), (target, false))
                if (flag == "-j" || flag == "-g") && !target.starts_with('-') =>
            {
                Some((target.clone(), flag == "-g"))
            }
            _ => None,
        })
        .collect()
}

/// The rule's target and whether it is a goto (`-g`).
pub fn target(spec: &str) -> Option<(String, bool)> {
    targets(spec).pop()
}

/// Whether a rule decides where the connection goes (or may: a jump to another chain).
pub fn takes_effect(spec: &str) -> bool {
    match target(spec) {
        None => false,
        Some((_, true)) => true,
        Some((target, false)) => !GOES_ON.contains(&target.as_str()),
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

    /// Rules in chains that are not ours that jump (`-j`) or go (`-g`) to one of ours, however
    /// they look otherwise (comments, other matches), with their numbers.
    pub fn jumps_to_own(&self) -> Vec<Jump> {
        let mut numbers: Vec<(&str, usize)> = Vec::new();
        let mut jumps = Vec::new();
        for (chain, spec) in &self.rules {
            let number = match numbers.iter_mut().find(|(c, _)| c == chain) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    numbers.push((chain, 1));
                    1
                }
            };
            if is_own_chain(chain) {
                continue;
            }
            if let Some((target, _)) = targets(spec).into_iter().find(|(t, _)| is_own_chain(t)) {
                jumps.push(Jump {
                    from: chain.clone(),
                    target,
                    spec: spec.clone(),
                    number,
                });
            }
        }
        jumps
    }

    /// The first rule of `chain` that takes effect, other than a jump to one of ours: its
    /// number and text. Our jump must come before it.
    pub fn first_effective<'a>(&'a self, chain: &'a str) -> Option<(usize, &'a str)> {
        self.rules_of(chain)
            .enumerate()
            .find(|(_, spec)| {
                takes_effect(spec) && !targets(spec).iter().any(|(t, _)| is_own_chain(t))
            })
            .map(|(i, spec)| (i + 1, spec))
    }
}

/// Rules of the raw table's `chain` that turn connection tracking off (`-j CT --notrack`,
/// `-j NOTRACK`): connections they match are never NATed, so never intercepted.
pub fn notrack_rules<'a>(text: &'a str, chain: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let mut in_raw = false;
    text.lines().filter_map(move |line| {
        if let Some(name) = line.strip_prefix('*') {
            in_raw = name.trim_end() == "raw";
            return None;
        }
        let spec = line
            .strip_prefix("-A ")?
            .strip_prefix(chain)?
            .strip_prefix(' ')?;
        let words = words(spec);
        let notrack = match target(spec) {
            Some((t, false)) if t == "NOTRACK" => true,
            Some((t, false)) if t == "CT" => words.iter().any(|(w, q)| !q && w == "--notrack"),
            _ => false,
        };
        (in_raw && notrack).then_some(spec)
    })
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
            continue;
        }
        let ours = jumps
            .iter()
            .find(|j| j.from == *base && normalize(&j.spec) == spec)
            .map_or(0, |j| j.number);
        if let Some((number, rule)) = table.first_effective(base).filter(|(n, _)| *n < ours) {
            found.push(format!(
                "{fam} {base} rule {number} `{rule}` takes effect before the jump to {chain} (rule {ours})"
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
        assert_eq!((jumps[0].number, jumps[1].number), (1, 2));
        assert!(jumps.iter().all(Jump::deletable));
        assert_eq!(
            t.rules_of(INBOUND_CHAIN).collect::<Vec<_>>(),
            vec!["-p tcp -m tcp --dport 15006 -j RETURN"]
        );
    }

    /// Comments cannot hide a jump to ours nor fake one: quoted words are never options, and
    /// iptables-legacy-save leaves a one-word comment such as `-j` unquoted.
    #[test]
    fn jumps_are_found_whatever_their_comments_say() {
        let t = NatTable::parse(
            "*nat\n\
             -A OUTPUT -m comment --comment -j -j ICNI_OUTBOUND\n\
             -A OUTPUT -m comment --comment \"x \\\"-j ICNI_INBOUND\\\" y\" -j RETURN\n\
             -A OUTPUT -j LOG --log-prefix -j --log-level 4\n\
             -A PREROUTING -m comment --comment \"-g ICNI_INBOUND\" -g ICNI_INBOUND\nCOMMIT\n",
        );
        let jumps: Vec<(String, usize)> = t
            .jumps_to_own()
            .into_iter()
            .map(|j| (format!("{} {}", j.from, j.target), j.number))
            .collect();
        assert_eq!(
            jumps,
            [
                ("OUTPUT ICNI_OUTBOUND".to_string(), 1),
                ("PREROUTING ICNI_INBOUND".to_string(), 1)
            ]
        );
        assert_eq!(t.first_effective("OUTPUT").map(|(n, _)| n), Some(2));
        assert!(!takes_effect("-j LOG --log-prefix -j --log-level 4"));
        assert!(takes_effect(
            "-p tcp -m tcp --dport 9 -j DNAT --to-destination 10.0.0.1"
        ));
        assert!(!takes_effect("-p tcp"));
        let raw = "*raw\n-A OUTPUT -p tcp -j CT --notrack\n-A OUTPUT -j CT --zone 1\n\
                   -A PREROUTING -j NOTRACK\nCOMMIT\n*nat\n-A OUTPUT -j NOTRACK\nCOMMIT\n";
        assert_eq!(
            notrack_rules(raw, "OUTPUT").collect::<Vec<_>>(),
            ["-p tcp -j CT --notrack"]
        );
        assert_eq!(notrack_rules(raw, "PREROUTING").count(), 1);
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
