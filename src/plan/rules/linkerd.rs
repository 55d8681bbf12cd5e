//! linkerd-cni's rules (linkerd/linkerd2-proxy-init `pkg/iptables/iptables.go`): PROXY_INIT_REDIRECT
//! for arriving connections, PROXY_INIT_OUTPUT for the pod's own.

use super::{
    exclude_out_interfaces, outbound_destinations, ports, return_ports, return_sources, Action,
    Match, Program, Rule,
};
use crate::plan::{IfName, InboundPorts, InterceptPlan};

pub(super) fn program(plan: &InterceptPlan) -> Program {
    // Ignored ports, then ignored subnets, then the redirect (all ports, or the listed ones).
    // No port of the proxy's own is spared: a connection to the outbound port is redirected.
    let mut inbound = Vec::new();
    match &plan.inbound_ports {
        InboundPorts::AllExcept(excluded) => {
            return_ports(&mut inbound, "in_excluded_ports", excluded);
            return_sources(plan, &mut inbound);
            inbound.push(Rule::new(vec![], Action::ToInbound));
        }
        InboundPorts::Only(included) => {
            return_sources(plan, &mut inbound);
            inbound.push(Rule::new(
                vec![ports("in_included_ports", included)],
                Action::ToInbound,
            ));
        }
        InboundPorts::None => {}
    }

    // The proxy's UID and GID, then everything through lo, then ignored ports, then the rest.
    let mut outbound = Vec::new();
    exclude_out_interfaces(plan, &mut outbound);
    for &uid in &plan.proxy_uids {
        outbound.push(Rule::new(vec![Match::Uid(uid)], Action::Return));
    }
    for &gid in &plan.proxy_gids {
        outbound.push(Rule::new(vec![Match::Gid(gid)], Action::Return));
    }
    outbound.push(Rule::new(
        vec![Match::OutIface(IfName::loopback())],
        Action::Return,
    ));
    return_ports(
        &mut outbound,
        "out_excluded_ports",
        &plan.exclude_outbound_ports,
    );
    outbound_destinations(plan, &mut outbound);
    Program { inbound, outbound }
}
