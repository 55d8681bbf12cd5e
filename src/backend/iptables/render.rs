//! Pure rendering of an `InterceptPlan` as `iptables-restore` input. Rules are written in the
//! exact form `*-save` prints them back (`-p tcp -m tcp --dport`, `/32` kept, addresses before
//! protocol before matches before target), so CHECK can compare text with text. Every value
//! written here comes from a typed field (u16, u32, `PortRange`, `IpNetwork`): no string from a
//! config or from the kernel is copied into the output but plain chain names (jumps to ours are
//! deleted by number, see `delete_jumps`).

use super::chains::{jump_spec, Chain, Family, Hook, HOOKS, INBOUND_CHAIN, OUTBOUND_CHAIN};
use super::save::{Jump, NatTable};
use crate::plan::rules::{Action, Match, NetList, Program, Rule};
use crate::plan::{InterceptPlan, PortRange};
use ipnetwork::IpNetwork;
use std::fmt::Write;

/// `multiport` takes at most 15 ports, a range counting as two.
const MULTIPORT_SLOTS: usize = 15;

/// The jumps of the nat table for `plan`.
pub fn nat_hooks(plan: &InterceptPlan) -> Vec<Hook> {
    let mut hooks = super::modes::nat_hooks(plan);
    hooks.extend(HOOKS.map(|(base, chain)| Hook {
        base,
        chain,
        spec: jump_spec(chain),
        first: false,
    }));
    hooks
}

/// The nat chains `apply(plan)` installs for one family, in order.
pub fn chains(plan: &InterceptPlan, family: Family) -> Vec<Chain> {
    let program = Program::of(plan);
    let mut chains = vec![
        Chain {
            name: INBOUND_CHAIN,
            rules: render(plan, &program.inbound, family),
        },
        Chain {
            name: OUTBOUND_CHAIN,
            rules: render(plan, &program.outbound, family),
        },
    ];
    chains.extend(super::modes::nat_chains(plan, family));
    chains
}

/// The rules of one of our nat chains for one family.
fn render(plan: &InterceptPlan, rules: &[Rule], family: Family) -> Vec<String> {
    rules
        .iter()
        .filter(|r| r.applies_to(family.ip()))
        .flat_map(|r| render_rule(plan, r))
        .collect()
}

/// One rule in `-save`'s order (`-s`, `-d`, `-i`, `-o`, `-p`, matches, target). A list of
/// networks becomes one rule per network, and a port list longer than multiport takes several
/// rules in a row, as iptables itself expands them: they match the same.
fn render_rule(plan: &InterceptPlan, rule: &Rule) -> Vec<String> {
    let mut sources = vec![String::new()];
    let mut dests = vec![String::new()];
    let mut ifaces = String::new();
    let mut ports = vec![String::new()];
    let mut not_ports: Vec<String> = Vec::new();
    let mut owner = String::new();
    let mut tcp = !matches!(rule.action, Action::Return);
    let each = |flag: &str, list: &NetList| -> Vec<String> {
        list.nets.iter().map(|n| address_match(flag, n)).collect()
    };
    for m in &rule.matches {
        match m {
            Match::Source(list) => sources = each("-s", list),
            Match::Dest(list) => dests = each("-d", list),
            Match::NotDest(net) => dests = vec![format!("! {}", address_match("-d", net))],
            Match::InIface(name) => ifaces += &format!("-i {name} "),
            Match::OutIface(name) => ifaces += &format!("-o {name} "),
            Match::DestPorts(list) => {
                tcp = true;
                ports = match &list.ports[..] {
                    [one] => vec![format!("-m tcp --dport {} ", colon(one))],
                    many => multiport_lists(many)
                        .into_iter()
                        .map(|l| format!("-m multiport --dports {l} "))
                        .collect(),
                };
            }
            Match::NotDestPort(port) => {
                tcp = true;
                not_ports.push(port.to_string());
                ports = match &not_ports[..] {
                    [one] => vec![format!("-m tcp ! --dport {one} ")],
                    many => vec![format!("-m multiport ! --dports {} ", many.join(","))],
                };
            }
            Match::Uid(id) => owner += &format!("-m owner --uid-owner {id} "),
            Match::NotUid(id) => owner += &format!("-m owner ! --uid-owner {id} "),
            Match::Gid(id) => owner += &format!("-m owner --gid-owner {id} "),
            Match::NotGid(id) => owner += &format!("-m owner ! --gid-owner {id} "),
        }
    }
    let target = match rule.action {
        Action::Return => "-j RETURN".to_string(),
        Action::ToInbound => format!("-j REDIRECT --to-ports {}", plan.inbound_port),
        Action::ToOutbound => format!("-j REDIRECT --to-ports {}", plan.outbound_port),
    };
    let proto = if tcp { "-p tcp " } else { "" };
    let mut out = Vec::new();
    for s in &sources {
        for d in &dests {
            for p in &ports {
                out.push(format!("{s}{d}{ifaces}{proto}{p}{owner}{target}"));
            }
        }
    }
    out
}

/// `8000:8100`, as iptables writes a range.
fn colon(range: &PortRange) -> String {
    if range.is_single() {
        range.start().to_string()
    } else {
        format!("{}:{}", range.start(), range.end())
    }
}

/// `-d 10.0.0.0/8 ` as `-save` prints it: network address, prefix always shown, and nothing at
/// all for a /0 (which matches everything).
pub fn address_match(flag: &str, net: &IpNetwork) -> String {
    if net.prefix() == 0 {
        return String::new();
    }
    format!("{flag} {}/{} ", net.network(), net.prefix())
}

/// Port lists for `--dports`, split so none exceeds the multiport limit.
pub fn multiport_lists(ports: &[PortRange]) -> Vec<String> {
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
    section("nat", &chains(plan, family), &nat_hooks(plan), existing)
}

/// One table's part of a restore input: `chains` declared (so flushed) and filled, each hook
/// present once and first to take effect in its base chain, and whatever of ours is there but
/// not wanted (jumps, chains) removed.
pub fn section(table: &str, chains: &[Chain], hooks: &[Hook], existing: &NatTable) -> String {
    let mut out = format!("*{table}\n");
    let stale: Vec<&str> = existing
        .own_chains()
        .into_iter()
        .filter(|name| !chains.iter().any(|c| c.name == *name))
        .collect();
    for name in chains.iter().map(|c| c.name).chain(stale.iter().copied()) {
        let _ = writeln!(out, ":{name} - [0:0]");
    }
    for chain in chains {
        for rule in &chain.rules {
            let _ = writeln!(out, "-A {} {rule}", chain.name);
        }
    }
    // Our jump must be the first rule of its hook that takes effect. The first canonical jump
    // stays where it is when nothing before it does; every other jump to ours goes.
    let mut kept: Vec<(&Hook, Jump)> = Vec::new();
    let mut strays = Vec::new();
    for jump in existing.jumps_to_own() {
        let canonical = hooks.iter().find(|hook| {
            jump.from == hook.base
                && jump.spec == hook.spec
                && !kept.iter().any(|(h, _)| h.chain == hook.chain)
                && existing
                    .first_effective(hook.base)
                    .is_none_or(|(n, _)| n > jump.number)
        });
        match canonical {
            Some(hook) => kept.push((hook, jump)),
            None => strays.push(jump),
        }
    }
    // A base chain missing one of our jumps gets all of ours again, in the hooks' order (DNS
    // capture's before the outbound redirect).
    let incomplete: Vec<&str> = hooks
        .iter()
        .filter(|h| !kept.iter().any(|(k, _)| k.chain == h.chain))
        .map(|h| h.base)
        .collect();
    let (redo, keep): (Vec<_>, Vec<_>) = kept
        .into_iter()
        .partition(|(h, _)| incomplete.contains(&h.base));
    strays.extend(redo.into_iter().map(|(_, jump)| jump));
    let stuck = delete_jumps(&mut out, strays);
    let missing: Vec<&Hook> = hooks
        .iter()
        .filter(|h| !keep.iter().any(|(k, _)| k.chain == h.chain))
        .collect();
    // In front of whatever else decides there (a fresh table gets `-A`); inserted last first,
    // so they end up in order.
    let inserted = |h: &Hook| h.first || existing.first_effective(h.base).is_some();
    for hook in missing.iter().rev().filter(|h| inserted(h)) {
        let _ = writeln!(out, "-I {} 1 {}", hook.base, hook.spec);
    }
    for hook in missing.iter().filter(|h| !inserted(h)) {
        let _ = writeln!(out, "-A {} {}", hook.base, hook.spec);
    }
    for name in stale
        .iter()
        .filter(|c| !stuck.iter().any(|j| j.target == **c))
    {
        let _ = writeln!(out, "-X {name}");
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

/// Restore input that removes every chain of ours and every jump to them from `existing` (the
/// `table` as `-save` printed it), or `None` when there is nothing to remove (so an untouched
/// table is never written to).
pub fn remove_section(table: &str, existing: &NatTable) -> Option<String> {
    let own = existing.own_chains();
    let jumps = existing.jumps_to_own();
    if own.is_empty() && jumps.is_empty() {
        return None;
    }
    let mut out = format!("*{table}\n");
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
    use crate::plan::test_support::ports;
    use crate::plan::{Families, InboundPorts, OutboundCidrs};

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
    use crate::plan::{Families, InboundPorts, OutboundCidrs, Semantics};

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
            proxy_uids: vec![2102],
            proxy_gids: vec![2103],
            inbound_ports: InboundPorts::Only(vec![range("80"), range("8000-8100")]),
            exclude_inbound_sources: vec![net("10.9.0.0/16"), net("fd00:9::/32")],
            exclude_outbound_ports: vec![range("22"), range("3306"), range("9000-9100")],
            outbound_cidrs: OutboundCidrs::Only {
                include: vec![net("10.0.0.0/8"), net("fd00::/8")],
                exclude: vec![net("10.96.0.1/32"), net("fd00::1/128")],
            },
            ..InterceptPlan::with_defaults(Families::BOTH)
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
        crate::backend::iptables::chains::assert_golden(name, &rendered);
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

    /// A default Istio pod: istio/istio `cni/pkg/plugin/testdata/basic.txt.golden`, rule for
    /// rule (its ISTIO_REDIRECT / ISTIO_IN_REDIRECT jumps written as the REDIRECTs they hold).
    fn istio() -> InterceptPlan {
        InterceptPlan {
            semantics: Semantics::Istio,
            proxy_gids: vec![1337],
            inbound_ports: InboundPorts::AllExcept(vec![
                range("15020"),
                range("15021"),
                range("15090"),
            ]),
            exclude_outbound_ports: vec![range("15020")],
            ..InterceptPlan::with_defaults(Families::BOTH)
        }
    }

    /// Istio with includes, interfaces and two proxy UIDs (capture testdata
    /// `ipnets-with-kube-virt-interfaces.golden`, `outbound-ports-include.golden`).
    fn istio_tuned() -> InterceptPlan {
        InterceptPlan {
            proxy_uids: vec![3, 4],
            proxy_gids: vec![1, 2],
            inbound_ports: InboundPorts::Only(vec![range("4000"), range("5000")]),
            include_outbound_ports: vec![range("32000")],
            outbound_cidrs: OutboundCidrs::Only {
                include: vec![net("10.0.0.0/8"), net("2001:db8::/32")],
                exclude: vec![],
            },
            exclude_interfaces: vec!["not-istio-nic".parse().unwrap()],
            reroute_interfaces: vec!["eth1".parse().unwrap(), "eth2".parse().unwrap()],
            ..istio()
        }
    }

    /// A default Linkerd pod (linkerd2-proxy-init `pkg/iptables/iptables.go`).
    fn linkerd() -> InterceptPlan {
        InterceptPlan {
            semantics: Semantics::Linkerd,
            inbound_port: 4143,
            outbound_port: 4140,
            proxy_uids: vec![2102],
            inbound_ports: InboundPorts::AllExcept(vec![range("4190"), range("4191")]),
            exclude_inbound_sources: vec![net("10.244.0.0/16")],
            exclude_outbound_ports: vec![range("3306")],
            ..InterceptPlan::with_defaults(Families::BOTH)
        }
    }

    #[test]
    fn golden_meshes() {
        compare("istio-v4.rules", &istio(), Family::V4);
        compare("istio-tuned-v4.rules", &istio_tuned(), Family::V4);
        compare("istio-tuned-v6.rules", &istio_tuned(), Family::V6);
        compare("linkerd-v4.rules", &linkerd(), Family::V4);
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
        assert_eq!(remove_section("nat", &NatTable::default()), None);
        let table = NatTable::parse(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:ICNI_OUTBOUND - [0:0]\n:KUBE-X - [0:0]\n\
             -A OUTPUT -j KUBE-X\n-A OUTPUT -p tcp -j ICNI_OUTBOUND\n\
             -A OUTPUT -m comment --comment \"hello world\" -j ICNI_OUTBOUND\n\
             -A ICNI_OUTBOUND -j RETURN\nCOMMIT\n",
        );
        assert_eq!(
            remove_section("nat", &table).unwrap(),
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
        extreme.proxy_uids = vec![u32::MAX];
        extreme.proxy_gids = vec![0];
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
