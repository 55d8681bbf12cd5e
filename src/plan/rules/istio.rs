//! istio-cni's rules (istio/istio `tools/istio-iptables/pkg/capture/run.go`, REDIRECT mode; the
//! expected output is `cni/pkg/plugin/testdata/basic.txt.golden`), in the order its restore input
//! leaves them. Its ISTIO_REDIRECT / ISTIO_IN_REDIRECT chains are our two actions.

use super::{
    exclude_out_interfaces, one, outbound_destinations, per_family, ports, return_ports, Action,
    Match, Program, Rule,
};
use crate::plan::{DnsCapture, IfName, InboundPorts, InterceptPlan, OutboundCidrs};

/// The HBONE tunnel port: `-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN`, and never sent to
/// the inbound port from `lo` either.
pub const TUNNEL_PORT: u16 = 15008;

pub(super) fn program(plan: &InterceptPlan) -> Program {
    let mut inbound = Vec::new();
    if plan.inbound_ports != InboundPorts::None {
        inbound.push(Rule::new(
            vec![ports("tunnel_port", &[single(TUNNEL_PORT)])],
            Action::Return,
        ));
    }
    match &plan.inbound_ports {
        // `-p tcp --dport P -j RETURN` per excluded port, then `-p tcp -j ISTIO_IN_REDIRECT`.
        InboundPorts::AllExcept(excluded) => {
            return_ports(&mut inbound, "in_excluded_ports", excluded);
            inbound.push(Rule::new(vec![], Action::ToInbound));
        }
        // An include list redirects exactly its ports: istio-iptables applies no exclusion to it.
        InboundPorts::Only(included) => inbound.push(Rule::new(
            vec![ports("in_included_ports", included)],
            Action::ToInbound,
        )),
        InboundPorts::None => {}
    }

    let mut outbound = Vec::new();
    exclude_out_interfaces(plan, &mut outbound);
    return_ports(
        &mut outbound,
        "out_excluded_ports",
        &plan.exclude_outbound_ports,
    );
    // `-o lo -s 127.0.0.6/32 -j RETURN`: Envoy's inbound passthrough to the app.
    per_family(&mut outbound, |f| {
        Rule::of(
            f,
            vec![
                lo(),
                Match::Source(one("passthrough", f.passthrough_source())),
            ],
            Action::Return,
        )
    });
    // With loopback in includeOutboundIPRanges, Istio drops the `-o lo ! --uid-owner` returns.
    let loopback_included = match &plan.outbound_cidrs {
        OutboundCidrs::Only { include, .. } => include.iter().any(|n| n.ip().is_loopback()),
        OutboundCidrs::AllExcept(_) => false,
    };
    // With DNS capture, the UID rules leave port 53 alone (`! --dports 53,15008`): the agent's
    // own queries to a resolver on the pod go there, not through the inbound port.
    let dns_port = plan.dns.map(|_| Match::NotDestPort(DnsCapture::DNS_PORT));
    let owners = plan
        .proxy_uids
        .iter()
        .map(|&id| (Match::Uid(id), Match::NotUid(id), dns_port.clone()))
        .chain(
            plan.proxy_gids
                .iter()
                .map(|&id| (Match::Gid(id), Match::NotGid(id), None)),
        );
    for (is, is_not, not_dns) in owners {
        // appN => Envoy (client) => Envoy (server) => appN: the proxy's connection to the pod
        // itself through lo, to anything but 127.0.0.1, goes to the inbound port.
        per_family(&mut outbound, |f| {
            let mut matches = vec![lo(), Match::NotDest(f.localhost())];
            matches.extend(not_dns.clone());
            matches.extend([Match::NotDestPort(TUNNEL_PORT), is.clone()]);
            Rule::of(f, matches, Action::ToInbound)
        });
        // appN => appN by lo: direct.
        if !loopback_included {
            outbound.push(Rule::new(vec![lo(), is_not], Action::Return));
        }
        outbound.push(Rule::new(vec![is], Action::Return));
    }
    per_family(&mut outbound, |f| {
        Rule::of(
            f,
            vec![Match::Dest(one("localhost", f.localhost()))],
            Action::Return,
        )
    });
    outbound_destinations(plan, &mut outbound);
    Program { inbound, outbound }
}

fn lo() -> Match {
    Match::OutIface(IfName::loopback())
}

fn single(port: u16) -> crate::plan::PortRange {
    crate::plan::PortRange::single(port).unwrap_or_else(|_| unreachable!("not port 0"))
}
