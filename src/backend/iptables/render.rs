//! Pure rendering of an `InterceptPlan` as `iptables-restore` input. Rules are written in the
//! exact form `*-save` prints them back (`-p tcp -m tcp --dport`, `/32` kept, addresses before
//! protocol before matches before target), so CHECK can compare text with text. Every value
//! written here comes from a typed field (u16, u32, `PortRange`, `IpNetwork`): no string from a
//! config or from the kernel is copied into the output but plain chain names (jumps to ours are
//! deleted by number, see `delete_jumps`).

use super::save::{Jump, NatTable};
use crate::plan::{InboundPorts, InterceptPlan, OutboundCidrs, PortRange};
use ipnetwork::IpNetwork;
use std::fmt::Write;

/// Every chain this plugin creates starts with this; nothing else does.
pub const CHAIN_PREFIX: &str = "ICNI_";
pub const INBOUND_CHAIN: &str = "ICNI_INBOUND";
pub const OUTBOUND_CHAIN: &str = "ICNI_OUTBOUND";

/// Where each of our chains is hooked: (built-in chain, our chain).
pub const HOOKS: [(&str, &str); 2] = [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTBOUND_CHAIN)];

/// `multiport` takes at most 15 ports, a range counting as two.
const MULTIPORT_SLOTS: usize = 15;

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

    fn holds(self, net: &IpNetwork) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNetwork::V4(_)) | (Family::V6, IpNetwork::V6(_))
        )
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
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

/// The chains `apply(plan)` installs for one family, in order.
pub fn chains(plan: &InterceptPlan, family: Family) -> Vec<Chain> {
    vec![
        Chain {
            name: INBOUND_CHAIN,
            rules: inbound_rules(plan, family),
        },
        Chain {
            name: OUTBOUND_CHAIN,
            rules: outbound_rules(plan, family),
        },
    ]
}

fn inbound_rules(plan: &InterceptPlan, family: Family) -> Vec<String> {
    let mut rules = Vec::new();
    if plan.inbound_ports == InboundPorts::None {
        return rules;
    }
    let redirect = format!("-j REDIRECT --to-ports {}", plan.inbound_port);
    // The proxy's own ports are never redirected to itself.
    rules.push(format!(
        "-p tcp -m tcp --dport {} -j RETURN",
        plan.inbound_port
    ));
    if plan.outbound_port != plan.inbound_port {
        rules.push(format!(
            "-p tcp -m tcp --dport {} -j RETURN",
            plan.outbound_port
        ));
    }
    for source in plan
        .exclude_inbound_sources
        .iter()
        .filter(|n| family.holds(n))
    {
        rules.push(format!("{}-j RETURN", address_match("-s", source)));
    }
    match &plan.inbound_ports {
        InboundPorts::AllExcept(excluded) => {
            for ports in multiport_lists(excluded) {
                rules.push(format!("-p tcp -m multiport --dports {ports} -j RETURN"));
            }
            rules.push(format!("-p tcp {redirect}"));
        }
        InboundPorts::Only(included) => {
            for ports in multiport_lists(included) {
                rules.push(format!("-p tcp -m multiport --dports {ports} {redirect}"));
            }
        }
        InboundPorts::None => {}
    }
    rules
}

fn outbound_rules(plan: &InterceptPlan, family: Family) -> Vec<String> {
    let redirect = format!("-p tcp -j REDIRECT --to-ports {}", plan.outbound_port);
    // Owners by number only: a name would need an NSS lookup that can stall (istio/istio#48416).
    let mut rules = vec![format!("-m owner --uid-owner {} -j RETURN", plan.proxy_uid)];
    if let Some(gid) = plan.proxy_gid {
        rules.push(format!("-m owner --gid-owner {gid} -j RETURN"));
    }
    rules.push(format!("-d {} -j RETURN", family.loopback()));
    for ports in multiport_lists(&plan.exclude_outbound_ports) {
        rules.push(format!("-p tcp -m multiport --dports {ports} -j RETURN"));
    }
    match &plan.outbound_cidrs {
        OutboundCidrs::AllExcept(excluded) => {
            for net in excluded.iter().filter(|n| family.holds(n)) {
                rules.push(format!("{}-j RETURN", address_match("-d", net)));
            }
            rules.push(redirect);
        }
        OutboundCidrs::Only { include, exclude } => {
            for net in exclude.iter().filter(|n| family.holds(n)) {
                rules.push(format!("{}-j RETURN", address_match("-d", net)));
            }
            for net in include.iter().filter(|n| family.holds(n)) {
                rules.push(format!("{}{redirect}", address_match("-d", net)));
            }
        }
    }
    rules
}

/// `-d 10.0.0.0/8 ` as `-save` prints it: network address, prefix always shown, and nothing at
/// all for a /0 (which matches everything).
fn address_match(flag: &str, net: &IpNetwork) -> String {
    if net.prefix() == 0 {
        return String::new();
    }
    format!("{flag} {}/{} ", net.network(), net.prefix())
}

/// Port lists for `--dports`, split so none exceeds the multiport limit.
fn multiport_lists(ports: &[PortRange]) -> Vec<String> {
    let mut lists = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut used = 0;
    for range in ports {
        let (text, slots) = if range.is_single() {
            (range.start().to_string(), 1)
        } else {
            (format!("{}:{}", range.start(), range.end()), 2)
        };
        if used + slots > MULTIPORT_SLOTS {
            lists.push(current.join(","));
            current.clear();
            used = 0;
        }
        current.push(text);
        used += slots;
    }
    if !current.is_empty() {
        lists.push(current.join(","));
    }
    lists
}

/// Restore input that installs `plan` for one family over the `existing` nat table, for
/// `--noflush`: declaring a chain flushes it, so a repeated apply replaces its contents; the
/// jumps are added only when missing and stray ones removed, so there is always exactly one.
pub fn apply_input(plan: &InterceptPlan, family: Family, existing: &NatTable) -> String {
    let chains = chains(plan, family);
    let mut out = String::from("*nat\n");
    for chain in &chains {
        let _ = writeln!(out, ":{} - [0:0]", chain.name);
    }
    for chain in &chains {
        for rule in &chain.rules {
            let _ = writeln!(out, "-A {} {rule}", chain.name);
        }
    }
    // Our jump must be the first rule of its hook that takes effect. The first canonical jump
    // stays where it is when nothing before it does; every other jump to ours goes.
    let mut hooked: Vec<&str> = Vec::new();
    let mut strays = Vec::new();
    for jump in existing.jumps_to_own() {
        let canonical = HOOKS.iter().find(|(base, chain)| {
            jump.from == *base
                && jump.spec == jump_spec(chain)
                && !hooked.contains(chain)
                && existing
                    .first_effective(base)
                    .is_none_or(|(n, _)| n > jump.number)
        });
        match canonical {
            Some((_, chain)) => hooked.push(chain),
            None => strays.push(jump),
        }
    }
    delete_jumps(&mut out, strays);
    for (base, chain) in HOOKS {
        if hooked.contains(&chain) {
            continue;
        }
        // In front of whatever else decides there (a fresh table gets the same `-A`).
        match existing.first_effective(base) {
            Some(_) => writeln!(out, "-I {base} 1 {}", jump_spec(chain)),
            None => writeln!(out, "-A {base} {}", jump_spec(chain)),
        }
        .unwrap_or_default();
    }
    out.push_str("COMMIT\n");
    out
}

/// `-D CHAIN NUMBER` for each jump, last first within a chain so every number still names the
/// rule read. Never the rule's text: whatever a jump looks like (a comment with quotes, odd
/// matches), it is removed. A jump from a chain whose name cannot be written back is left (and
/// logged); our chain it targets then stays, empty.
fn delete_jumps(out: &mut String, mut jumps: Vec<Jump>) -> Vec<Jump> {
    let (deletable, stuck): (Vec<Jump>, Vec<Jump>) = {
        jumps.sort_by(|a, b| a.from.cmp(&b.from).then(b.number.cmp(&a.number)));
        jumps.into_iter().partition(Jump::deletable)
    };
    for jump in &deletable {
        let _ = writeln!(out, "-D {} {}", jump.from, jump.number);
    }
    for jump in &stuck {
        log::warn!(
            "chain {:?} jumps to {} and its name cannot be written back; leaving that jump",
            jump.from,
            jump.target
        );
    }
    stuck
}

/// Restore input that removes every chain of ours and every jump to them from `existing`, or
/// `None` when there is nothing to remove (so an untouched table is never written to).
pub fn remove_input(existing: &NatTable) -> Option<String> {
    let own = existing.own_chains();
    let jumps = existing.jumps_to_own();
    if own.is_empty() && jumps.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    // Declaring flushes (under --noflush), so the chains are empty before they are deleted.
    for chain in &own {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    let stuck = delete_jumps(&mut out, jumps);
    for chain in own
        .iter()
        .filter(|c| !stuck.iter().any(|j| j.target == **c))
    {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Families;

    fn ports(list: &[(u16, u16)]) -> Vec<PortRange> {
        list.iter()
            .map(|&(a, b)| PortRange::new(a, b).unwrap())
            .collect()
    }

    #[test]
    fn multiport_lists_respect_the_fifteen_slot_limit() {
        let singles: Vec<(u16, u16)> = (1..=16).map(|p| (p, p)).collect();
        let lists = multiport_lists(&ports(&singles));
        assert_eq!(lists.len(), 2);
        assert_eq!(lists[0].split(',').count(), 15);
        assert_eq!(lists[1], "16");
        // Seven ranges use 14 slots; the eighth does not fit.
        let ranges: Vec<(u16, u16)> = (1..=8).map(|i| (i * 100, i * 100 + 9)).collect();
        let lists = multiport_lists(&ports(&ranges));
        assert_eq!(lists.len(), 2);
        assert_eq!(lists[1], "800:809");
        assert!(multiport_lists(&[]).is_empty());
    }

    #[test]
    fn addresses_are_written_as_save_prints_them() {
        let host: IpNetwork = "10.1.2.3/32".parse().unwrap();
        assert_eq!(address_match("-d", &host), "-d 10.1.2.3/32 ");
        let unaligned: IpNetwork = "10.1.2.3/8".parse().unwrap();
        assert_eq!(address_match("-d", &unaligned), "-d 10.0.0.0/8 ");
        let v6: IpNetwork = "fd00:0:0::1:0/112".parse().unwrap();
        assert_eq!(address_match("-s", &v6), "-s fd00::1:0/112 ");
        let any: IpNetwork = "0.0.0.0/0".parse().unwrap();
        assert_eq!(address_match("-d", &any), "");
    }

    #[test]
    fn no_inbound_interception_leaves_the_inbound_chain_empty() {
        let mut plan = InterceptPlan::with_defaults(Families::BOTH);
        plan.inbound_ports = InboundPorts::None;
        let chains = chains(&plan, Family::V4);
        assert!(chains[0].rules.is_empty());
        assert!(!chains[1].rules.is_empty());
    }

    #[test]
    fn cidrs_of_the_other_family_are_left_out() {
        let mut plan = InterceptPlan::with_defaults(Families::BOTH);
        plan.outbound_cidrs = OutboundCidrs::Only {
            include: vec!["10.0.0.0/8".parse().unwrap()],
            exclude: vec![],
        };
        let v6 = chains(&plan, Family::V6);
        // Only IPv4 destinations are included, so IPv6 gets no redirect at all.
        assert!(v6[1].rules.iter().all(|r| !r.contains("REDIRECT")));
    }
}

/// Golden files: the exact restore input for a few option sets, over a fresh nat table.
/// Regenerate with `INTERCEPT_CNI_BLESS=1 cargo test --lib golden` and review the diff.
#[cfg(test)]
mod golden {
    use super::*;
    use crate::plan::Families;
    use std::path::PathBuf;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn range(s: &str) -> PortRange {
        s.parse().unwrap()
    }

    /// Includes, excludes, CIDRs both ways, a GID, non-default ports.
    fn custom() -> InterceptPlan {
        InterceptPlan {
            inbound_port: 15106,
            outbound_port: 15101,
            proxy_uid: 2102,
            proxy_gid: Some(2103),
            inbound_ports: InboundPorts::Only(vec![range("80"), range("8000-8100")]),
            exclude_inbound_sources: vec![net("10.9.0.0/16"), net("fd00:9::/32")],
            exclude_outbound_ports: vec![range("22"), range("3306"), range("9000-9100")],
            outbound_cidrs: OutboundCidrs::Only {
                include: vec![net("10.0.0.0/8"), net("fd00::/8")],
                exclude: vec![net("10.96.0.1/32"), net("fd00::1/128")],
            },
            families: Families::BOTH,
        }
    }

    /// Istio-like exclusions, enough ports to need two multiport rules, and a /0.
    fn excludes() -> InterceptPlan {
        let mut plan = InterceptPlan::with_defaults(Families::BOTH);
        plan.inbound_ports =
            InboundPorts::AllExcept(vec![range("15020"), range("15021"), range("15090")]);
        plan.exclude_outbound_ports = (1..=14)
            .map(|i| range(&(i * 1000).to_string()))
            .chain([range("20000-20099")])
            .collect();
        plan.outbound_cidrs = OutboundCidrs::AllExcept(vec![
            net("169.254.169.254/32"),
            net("10.1.2.3/8"),
            net("::/0"),
        ]);
        plan
    }

    fn compare(name: &str, plan: &InterceptPlan, family: Family) {
        let rendered = apply_input(plan, family, &NatTable::default());
        let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "testdata", "iptables", name]
            .iter()
            .collect();
        if std::env::var_os("INTERCEPT_CNI_BLESS").is_some() {
            std::fs::write(&path, &rendered).unwrap();
        }
        let golden =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(rendered, golden, "{name} differs from the rendering");
    }

    #[test]
    fn golden_defaults() {
        let plan = InterceptPlan::with_defaults(Families::BOTH);
        compare("defaults-v4.rules", &plan, Family::V4);
        compare("defaults-v6.rules", &plan, Family::V6);
    }

    #[test]
    fn golden_custom() {
        compare("custom-v4.rules", &custom(), Family::V4);
        compare("custom-v6.rules", &custom(), Family::V6);
    }

    #[test]
    fn golden_excludes() {
        compare("excludes-v4.rules", &excludes(), Family::V4);
        compare("excludes-v6.rules", &excludes(), Family::V6);
    }

    #[test]
    fn existing_jumps_are_kept_once_and_strays_removed_by_number() {
        let plan = InterceptPlan::with_defaults(Families::BOTH);
        let table = NatTable::parse(
            "*nat\n:ICNI_INBOUND - [0:0]\n\
             -A PREROUTING -p tcp -j ICNI_INBOUND\n\
             -A PREROUTING -p tcp -j ICNI_INBOUND\n\
             -A OUTPUT -j LOG\n\
             -A OUTPUT -j ICNI_INBOUND\n\
             -A OUTPUT -m comment --comment \"a \\\"-j\\\" b\" -j ICNI_OUTBOUND\nCOMMIT\n",
        );
        let input = apply_input(&plan, Family::V4, &table);
        let tail: Vec<&str> = input
            .lines()
            .filter(|l| !l.starts_with("-A ICNI_"))
            .collect();
        assert_eq!(
            tail[3..],
            [
                "-D OUTPUT 3",
                "-D OUTPUT 2",
                "-D PREROUTING 2",
                "-A OUTPUT -p tcp -j ICNI_OUTBOUND",
                "COMMIT"
            ]
        );
    }

    /// Our jump must be the first rule of its hook that takes effect: one that comes after a
    /// rule deciding something is moved in front of it (deleted by number, inserted first).
    #[test]
    fn a_jump_behind_a_deciding_rule_is_moved_first() {
        let plan = InterceptPlan::with_defaults(Families::BOTH);
        let table = NatTable::parse(
            "*nat\n:ICNI_INBOUND - [0:0]\n:ICNI_OUTBOUND - [0:0]\n\
             -A PREROUTING -j LOG\n\
             -A PREROUTING -p tcp -j ICNI_INBOUND\n\
             -A OUTPUT -p tcp -j RETURN\n\
             -A OUTPUT -p tcp -j ICNI_OUTBOUND\nCOMMIT\n",
        );
        let input = apply_input(&plan, Family::V4, &table);
        let tail: Vec<&str> = input
            .lines()
            .filter(|l| !l.starts_with("-A ICNI_") && !l.starts_with(':'))
            .collect();
        assert_eq!(
            tail[1..],
            [
                "-D OUTPUT 2",
                "-I OUTPUT 1 -p tcp -j ICNI_OUTBOUND",
                "COMMIT"
            ]
        );
    }

    #[test]
    fn removal_flushes_unhooks_and_deletes_only_what_is_there() {
        assert_eq!(remove_input(&NatTable::default()), None);
        let table = NatTable::parse(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:ICNI_OUTBOUND - [0:0]\n:KUBE-X - [0:0]\n\
             -A OUTPUT -j KUBE-X\n-A OUTPUT -p tcp -j ICNI_OUTBOUND\n\
             -A OUTPUT -m comment --comment \"hello world\" -j ICNI_OUTBOUND\n\
             -A ICNI_OUTBOUND -j RETURN\nCOMMIT\n",
        );
        assert_eq!(
            remove_input(&table).unwrap(),
            "*nat\n:ICNI_OUTBOUND - [0:0]\n-D OUTPUT 3\n-D OUTPUT 2\n-X ICNI_OUTBOUND\nCOMMIT\n"
        );
    }

    /// Only typed values reach the rule text: strings that are not ports or networks are
    /// refused at parsing, and whatever typed values a plan holds, the rendering is made of
    /// known commands and a narrow alphabet (no quotes, no newlines inside a rule, no `#`).
    #[test]
    fn hostile_values_cannot_reach_restore_input() {
        for bad in [
            "80 -j ACCEPT",
            "80\n-A OUTPUT -j DROP",
            "\"80\"",
            "80,81",
            "1:2",
        ] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?}");
        }
        for bad in ["10.0.0.0/8 -j ACCEPT", "10.0.0.0/8\nCOMMIT", "::1/129", "x"] {
            assert!(bad.parse::<IpNetwork>().is_err(), "{bad:?}");
        }
        let mut extreme = custom();
        extreme.inbound_port = u16::MAX;
        extreme.outbound_port = 1;
        extreme.proxy_uid = u32::MAX;
        extreme.proxy_gid = Some(0);
        extreme.exclude_outbound_ports = vec![PortRange::new(1, u16::MAX).unwrap()];
        extreme.exclude_inbound_sources = vec![net("::ffff:1.2.3.4/128"), net("0.0.0.0/0")];
        for plan in [custom(), excludes(), extreme] {
            for family in Family::ALL {
                let text = apply_input(&plan, family, &NatTable::default());
                for line in text.lines() {
                    let known = line == "*nat"
                        || line == "COMMIT"
                        || (line.starts_with(":ICNI_") && line.ends_with(" - [0:0]"))
                        || line.starts_with("-A ICNI_")
                        || line.starts_with("-A PREROUTING ")
                        || line.starts_with("-A OUTPUT ");
                    assert!(known, "unexpected line {line:?}");
                    assert!(
                        line.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b" -_.:/,[]*".contains(&b)),
                        "unexpected character in {line:?}"
                    );
                }
            }
        }
    }
}
