//! The plan as an ordered list of backend-neutral rules: the one place that decides where each
//! connection lands. Each mesh's order lives in its own file, written from that mesh's CNI
//! plugin (see each file for the rules it follows); every backend renders these rules one for
//! one, so nftables, iptables-legacy and iptables-nft land every connection in the same place.
//!
//! Two chains: `inbound`, hooked where the nat table sees arriving connections (PREROUTING),
//! and `outbound`, where it sees the pod's own (OUTPUT). Both see TCP only: the backends hook
//! them (or guard them) for TCP. The first rule that matches decides; falling off the end leaves
//! the connection alone.

mod istio;
mod linkerd;
mod own;

use super::{IfName, InterceptPlan, InterceptionMode, OutboundCidrs, PortRange, Semantics};
use ipnetwork::IpNetwork;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(net: &IpNetwork) -> IpFamily {
        match net {
            IpNetwork::V4(_) => IpFamily::V4,
            IpNetwork::V6(_) => IpFamily::V6,
        }
    }

    /// `v4` or `v6`, as the family's part of a list's name.
    fn pick(self, v4: &'static str, v6: &'static str) -> &'static str {
        match self {
            IpFamily::V4 => v4,
            IpFamily::V6 => v6,
        }
    }

    /// `127.0.0.1/32` or `::1/128`: the address Istio's rules treat as "localhost".
    fn localhost(self) -> IpNetwork {
        host(match self {
            IpFamily::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpFamily::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        })
    }

    /// `127.0.0.6/32` or `::6/128`: the source Envoy binds for inbound passthrough.
    fn passthrough_source(self) -> IpNetwork {
        host(match self {
            IpFamily::V4 => IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)),
            IpFamily::V6 => IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)),
        })
    }
}

fn host(addr: IpAddr) -> IpNetwork {
    let prefix = if addr.is_ipv4() { 32 } else { 128 };
    IpNetwork::new(addr, prefix).unwrap_or_else(|_| unreachable!("a full prefix is valid"))
}

/// Networks of one family, any of which matches, under a name a backend may give the set it
/// makes of them (the same name always holds the same networks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetList {
    pub name: &'static str,
    pub nets: Vec<IpNetwork>,
}

/// Port ranges, any of which matches; named like `NetList`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortList {
    pub name: &'static str,
    pub ports: Vec<PortRange>,
}

/// One condition; a rule matches when all of its conditions do. Lists are never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    InIface(IfName),
    OutIface(IfName),
    Source(NetList),
    Dest(NetList),
    NotDest(IpNetwork),
    DestPorts(PortList),
    NotDestPort(u16),
    Uid(u32),
    NotUid(u32),
    Gid(u32),
    NotGid(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Leave the chain: the connection goes where it was going.
    Return,
    /// REDIRECT to the proxy's inbound port.
    ToInbound,
    /// REDIRECT to the proxy's outbound port.
    ToOutbound,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `Some` for a rule of one family only (it names an address of that family).
    pub family: Option<IpFamily>,
    pub matches: Vec<Match>,
    pub action: Action,
}

impl Rule {
    fn new(matches: Vec<Match>, action: Action) -> Rule {
        Rule {
            family: None,
            matches,
            action,
        }
    }

    fn of(family: IpFamily, matches: Vec<Match>, action: Action) -> Rule {
        Rule {
            family: Some(family),
            matches,
            action,
        }
    }

    pub fn applies_to(&self, family: IpFamily) -> bool {
        self.family.is_none_or(|f| f == family)
    }
}

/// The two chains, in order, for the plan's families only.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Program {
    pub inbound: Vec<Rule>,
    pub outbound: Vec<Rule>,
}

impl Program {
    pub fn of(plan: &InterceptPlan) -> Program {
        let mesh = match plan.semantics {
            Semantics::Istio => istio::program(plan),
            Semantics::Linkerd => linkerd::program(plan),
            Semantics::Own => own::program(plan),
        };
        let mut inbound = Vec::new();
        interface_rules(plan, &mut inbound);
        // Under TPROXY the inbound redirect happens in the mangle table (`plan.mode`'s own
        // rules); the nat table keeps only the interface rules.
        if plan.mode == InterceptionMode::Redirect {
            inbound.extend(mesh.inbound);
        }
        let mut program = Program {
            inbound,
            outbound: mesh.outbound,
        };
        let families = families(plan);
        let wanted = |r: &Rule| r.family.is_none_or(|f| families.contains(&f));
        program.inbound.retain(wanted);
        program.outbound.retain(wanted);
        program
    }
}

/// The plan's families, IPv4 first.
pub fn families(plan: &InterceptPlan) -> Vec<IpFamily> {
    let mut out = Vec::new();
    if plan.families.ipv4 {
        out.push(IpFamily::V4);
    }
    if plan.families.ipv6 {
        out.push(IpFamily::V6);
    }
    out
}

/// One rule per family, for rules that name an address.
fn per_family(rules: &mut Vec<Rule>, make: impl Fn(IpFamily) -> Rule) {
    for family in [IpFamily::V4, IpFamily::V6] {
        rules.push(make(family));
    }
}

fn ports(name: &'static str, ports: &[PortRange]) -> Match {
    Match::DestPorts(PortList {
        name,
        ports: ports.to_vec(),
    })
}

/// The networks of each family among `nets`, with the list's name for that family.
fn by_family<'a>(
    nets: &'a [IpNetwork],
    v4: &'static str,
    v6: &'static str,
) -> impl Iterator<Item = (IpFamily, NetList)> + 'a {
    [IpFamily::V4, IpFamily::V6]
        .into_iter()
        .filter_map(move |f| {
            let mine: Vec<IpNetwork> = nets
                .iter()
                .copied()
                .filter(|n| IpFamily::of(n) == f)
                .collect();
            (!mine.is_empty()).then(|| {
                (
                    f,
                    NetList {
                        name: f.pick(v4, v6),
                        nets: mine,
                    },
                )
            })
        })
}

/// One address, as a list of one.
fn one(name: &'static str, net: IpNetwork) -> NetList {
    NetList {
        name,
        nets: vec![net],
    }
}

/// `Return` when `ports` is not empty.
fn return_ports(rules: &mut Vec<Rule>, name: &'static str, list: &[PortRange]) {
    if !list.is_empty() {
        rules.push(Rule::new(vec![ports(name, list)], Action::Return));
    }
}

fn return_sources(plan: &InterceptPlan, rules: &mut Vec<Rule>) {
    let lists = by_family(
        &plan.exclude_inbound_sources,
        "in_excluded_sources_v4",
        "in_excluded_sources_v6",
    );
    for (family, list) in lists {
        rules.push(Rule::of(family, vec![Match::Source(list)], Action::Return));
    }
}

/// What istio-iptables puts into PREROUTING before its jump, read as the first rules of our
/// inbound chain (the order is the one it ends with, its inserts at position 1 included): TCP
/// from a rerouted interface goes to the outbound port (only to the included ranges when there
/// is a list), anything else from there or from an excluded interface is left alone.
fn interface_rules(plan: &InterceptPlan, rules: &mut Vec<Rule>) {
    for iface in plan.reroute_interfaces.iter().rev() {
        let on = Match::InIface(iface.clone());
        match &plan.outbound_cidrs {
            OutboundCidrs::AllExcept(_) => {
                rules.push(Rule::new(vec![on], Action::ToOutbound));
            }
            OutboundCidrs::Only { include, .. } => {
                for (family, list) in by_family(include, "out_included_v4", "out_included_v6") {
                    rules.push(Rule::of(
                        family,
                        vec![on.clone(), Match::Dest(list)],
                        Action::ToOutbound,
                    ));
                }
            }
        }
    }
    for iface in plan.reroute_interfaces.iter().rev() {
        rules.push(Rule::new(
            vec![Match::InIface(iface.clone())],
            Action::Return,
        ));
    }
    for iface in &plan.exclude_interfaces {
        rules.push(Rule::new(
            vec![Match::InIface(iface.clone())],
            Action::Return,
        ));
    }
}

fn exclude_out_interfaces(plan: &InterceptPlan, rules: &mut Vec<Rule>) {
    for iface in &plan.exclude_interfaces {
        rules.push(Rule::new(
            vec![Match::OutIface(iface.clone())],
            Action::Return,
        ));
    }
}

/// The destination rules every mesh ends its outbound chain with: excluded ranges, included
/// ports, then the included ranges (all of them when there is no list).
fn outbound_destinations(plan: &InterceptPlan, rules: &mut Vec<Rule>) {
    let excluded = match &plan.outbound_cidrs {
        OutboundCidrs::AllExcept(excluded) => excluded,
        OutboundCidrs::Only { exclude, .. } => exclude,
    };
    for (family, list) in by_family(excluded, "out_excluded_v4", "out_excluded_v6") {
        rules.push(Rule::of(family, vec![Match::Dest(list)], Action::Return));
    }
    if !plan.include_outbound_ports.is_empty() {
        rules.push(Rule::new(
            vec![ports("out_included_ports", &plan.include_outbound_ports)],
            Action::ToOutbound,
        ));
    }
    match &plan.outbound_cidrs {
        OutboundCidrs::AllExcept(_) => rules.push(Rule::new(vec![], Action::ToOutbound)),
        OutboundCidrs::Only { include, .. } => {
            for (family, list) in by_family(include, "out_included_v4", "out_included_v6") {
                rules.push(Rule::of(
                    family,
                    vec![Match::Dest(list)],
                    Action::ToOutbound,
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Families;

    #[test]
    fn rules_of_a_family_the_plan_lacks_are_left_out() {
        let mut plan = InterceptPlan::with_defaults(Families {
            ipv4: true,
            ipv6: false,
        });
        plan.semantics = Semantics::Istio;
        let program = Program::of(&plan);
        assert!(program
            .outbound
            .iter()
            .chain(&program.inbound)
            .all(|r| r.applies_to(IpFamily::V4)));
    }

    #[test]
    fn interface_names_are_strict() {
        for ok in ["eth0", "net1", "veth-a.1_b", "abcdefghijklmno"] {
            assert!(ok.parse::<IfName>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "eth 0",
            "eth0;",
            "a/b",
            "abcdefghijklmnop",
            "é",
            "eth0\n",
        ] {
            assert!(bad.parse::<IfName>().is_err(), "{bad:?}");
        }
    }
}
