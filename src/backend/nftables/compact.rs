//! Fewer rules for the same verdicts: every rule costs the kernel a few microseconds to load
//! at ADD (and every new connection a walk past it), and a mesh's rule list, written for
//! iptables, holds some that nftables can never reach or can take as one.
//!
//! Two rewrites, each leaving every packet's verdict as it was:
//! - **Unreachable owner rules on lo.** Once a chain has returned both `oifname "lo" meta skuid
//!   != X` and `meta skuid X` (or the same pair for a GID), every packet out of lo that has a
//!   socket has left the chain; one without a socket (or with one whose owner cannot be read)
//!   fails every `meta skuid`/`skgid` test, equal or not, because nftables' meta expression
//!   breaks the rule when the owner is unknown. A later rule testing lo and an owner can then
//!   never match. Istio's chains have such rules for the proxy's GID after its UID.
//! - **Adjacent port returns.** Consecutive rules that only return for a list of destination
//!   ports become one rule over the union (Istio's tunnel port before the excluded ports).

use crate::plan::rules::{Action, Match, PortList, Rule};
use crate::plan::IfName;

/// `rules` without those that can never match, and with adjacent port returns merged.
pub fn compact(rules: &[Rule]) -> Vec<Rule> {
    merge_port_returns(reachable(rules))
}

fn reachable(rules: &[Rule]) -> Vec<Rule> {
    // Owners (UID or GID, by id) whose lo return and whose own return have been seen.
    let mut lo_others = Vec::new();
    let mut owners = Vec::new();
    let mut kept = Vec::with_capacity(rules.len());
    for rule in rules {
        let lo_decided = lo_others.iter().any(|o| owners.contains(o));
        if lo_decided && tests_lo_and_owner(rule) {
            continue;
        }
        if rule.action == Action::Return && rule.family.is_none() {
            match &rule.matches[..] {
                [Match::OutIface(lo), Match::NotUid(id)] if *lo == IfName::loopback() => {
                    lo_others.push((Owner::Uid, *id))
                }
                [Match::OutIface(lo), Match::NotGid(id)] if *lo == IfName::loopback() => {
                    lo_others.push((Owner::Gid, *id))
                }
                [Match::Uid(id)] => owners.push((Owner::Uid, *id)),
                [Match::Gid(id)] => owners.push((Owner::Gid, *id)),
                _ => {}
            }
        }
        kept.push(rule.clone());
    }
    kept
}

#[derive(PartialEq)]
enum Owner {
    Uid,
    Gid,
}

fn tests_lo_and_owner(rule: &Rule) -> bool {
    let lo = rule
        .matches
        .iter()
        .any(|m| matches!(m, Match::OutIface(name) if *name == IfName::loopback()));
    let owner = rule.matches.iter().any(|m| {
        matches!(
            m,
            Match::Uid(_) | Match::NotUid(_) | Match::Gid(_) | Match::NotGid(_)
        )
    });
    lo && owner
}

fn merge_port_returns(rules: Vec<Rule>) -> Vec<Rule> {
    let mut merged: Vec<Rule> = Vec::with_capacity(rules.len());
    for rule in rules {
        if let (Some(last), Some(ports)) = (merged.last_mut(), port_return(&rule)) {
            if let Some(earlier) = port_return(last) {
                let mut union = earlier.ports.clone();
                union.extend(ports.ports.iter().copied());
                // The later list names the set: it is the one that was a set already.
                last.matches = vec![Match::DestPorts(PortList {
                    name: ports.name,
                    ports: union,
                })];
                continue;
            }
        }
        merged.push(rule);
    }
    merged
}

/// The port list of a rule that returns for those ports and tests nothing else.
fn port_return(rule: &Rule) -> Option<&PortList> {
    match (&rule.matches[..], rule.action, rule.family) {
        ([Match::DestPorts(list)], Action::Return, None) => Some(list),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::rules::Program;
    use crate::plan::{Families, InboundPorts, InterceptPlan, PortRange, Semantics};

    fn istio() -> InterceptPlan {
        let port = |p| PortRange::single(p).unwrap();
        InterceptPlan {
            semantics: Semantics::Istio,
            proxy_gids: vec![1337],
            inbound_ports: InboundPorts::AllExcept(vec![port(15020), port(15021), port(15090)]),
            ..InterceptPlan::with_defaults(Families::BOTH)
        }
    }

    fn dropped(before: &[Rule], after: &[Rule]) -> Vec<Rule> {
        before
            .iter()
            .filter(|r| !after.contains(r))
            .cloned()
            .collect()
    }

    #[test]
    fn istio_gid_rules_on_lo_after_the_uid_pair_go() {
        let program = Program::of(&istio());
        let out = compact(&program.outbound);
        let gone = dropped(&program.outbound, &out);
        // The GID's lo redirect (one per family) and its lo return.
        assert_eq!(gone.len(), 3, "{gone:#?}");
        assert!(gone.iter().all(tests_lo_and_owner));
        assert!(gone.iter().all(|r| r
            .matches
            .iter()
            .any(|m| matches!(m, Match::Gid(_) | Match::NotGid(_)))));
        // The GID's own return stays: it decides packets that do not leave by lo.
        assert!(out.iter().any(|r| r.matches == [Match::Gid(1337)]));
    }

    #[test]
    fn without_the_whole_pair_nothing_goes() {
        let mut plan = istio();
        plan.proxy_uids = vec![];
        let program = Program::of(&plan);
        // Only GIDs: their pair comes after their own lo redirect, which stays.
        assert_eq!(compact(&program.outbound).len(), program.outbound.len());
        // A pair with an extra condition (Istio's DNS capture: `! --dport 53`) decides only
        // some of lo's packets.
        let narrowed: Vec<Rule> = Program::of(&istio())
            .outbound
            .into_iter()
            .map(|mut r| {
                if r.matches.iter().any(|m| matches!(m, Match::NotUid(_))) {
                    r.matches.insert(1, Match::NotDestPort(53));
                }
                r
            })
            .collect();
        assert_eq!(reachable(&narrowed).len(), narrowed.len());
    }

    #[test]
    fn the_tunnel_port_joins_the_excluded_ports() {
        let program = Program::of(&istio());
        let inbound = compact(&program.inbound);
        assert_eq!(inbound.len(), program.inbound.len() - 1);
        let Match::DestPorts(list) = &inbound[0].matches[0] else {
            panic!("{inbound:#?}");
        };
        assert_eq!(list.name, "in_excluded_ports");
        let ports: Vec<String> = list.ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(ports, ["15008", "15020", "15021", "15090"]);
        // A redirect between two port returns keeps them apart.
        assert_eq!(inbound.last().unwrap().action, Action::ToInbound);
    }
}
