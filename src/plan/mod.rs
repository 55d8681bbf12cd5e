//! The validated, backend-neutral interception plan. Everything a backend renders comes from here,
//! already typed and checked: no string from a config or an annotation reaches rule text.

use ipnetwork::IpNetwork;
use std::fmt;
use std::str::FromStr;

pub mod rules;

/// An inclusive TCP port range, `start <= end`, never containing port 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    pub fn new(start: u16, end: u16) -> Result<Self, String> {
        if start == 0 {
            return Err("port 0 is not a valid port".into());
        }
        if start > end {
            return Err(format!("port range {start}-{end} is reversed"));
        }
        Ok(PortRange { start, end })
    }

    pub fn single(port: u16) -> Result<Self, String> {
        PortRange::new(port, port)
    }

    pub fn start(&self) -> u16 {
        self.start
    }

    pub fn end(&self) -> u16 {
        self.end
    }

    pub fn is_single(&self) -> bool {
        self.start == self.end
    }

    pub fn contains(&self, port: u16) -> bool {
        self.start <= port && port <= self.end
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `"8080"` or `"8000-8100"`; surrounding blanks are tolerated, anything else is refused.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let parse = |p: &str| -> Result<u16, String> {
            let p = p.trim();
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("{s:?} is not a port or a port range"));
            }
            p.parse::<u16>()
                .map_err(|_| format!("{p} is out of range (1-65535)"))
        };
        match s.split_once('-') {
            Some((a, b)) => PortRange::new(parse(a)?, parse(b)?),
            None => PortRange::single(parse(s)?),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// A network interface name as the kernel accepts it (at most 15 bytes), restricted to letters,
/// digits, `.`, `_` and `-` so it can go into rule text as is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IfName(String);

impl IfName {
    /// The loopback interface.
    pub fn loopback() -> IfName {
        IfName("lo".to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for IfName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 15
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok {
            Ok(IfName(s.to_string()))
        } else {
            Err(format!(
                "{:?} is not an interface name (1-15 of letters, digits, '.', '_', '-')",
                s.chars().take(32).collect::<String>()
            ))
        }
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whose rules a plan reproduces, rule for rule (see `rules`): a pod of a mesh gets exactly the
/// landing its mesh's own CNI plugin gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Semantics {
    /// istio-cni (istio-iptables in REDIRECT mode).
    Istio,
    /// linkerd-cni (linkerd2-proxy-init).
    Linkerd,
    /// A plain `intercept-cni.io/` pod: nothing the proxy or loopback sends is redirected.
    Own,
}

/// Which IP families get rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Families {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Families {
    pub const BOTH: Families = Families {
        ipv4: true,
        ipv6: true,
    };
}

/// Which inbound destination ports go to the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    /// Every port except these.
    AllExcept(Vec<PortRange>),
    /// Only these ports (validation has already removed any excluded ones).
    Only(Vec<PortRange>),
    /// No inbound interception at all (e.g. Istio's empty includeInboundPorts).
    None,
}

/// Which outbound destinations go to the proxy, by address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundCidrs {
    /// Every destination except these.
    AllExcept(Vec<IpNetwork>),
    /// Only these destinations, minus `exclude`.
    Only {
        include: Vec<IpNetwork>,
        exclude: Vec<IpNetwork>,
    },
}

/// The complete interception to install in one pod netns. Built only by validation code
/// (`cni::config`, the annotation policy), read by every backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptPlan {
    /// Proxy port receiving redirected inbound connections (destination address kept).
    pub inbound_port: u16,
    /// Proxy port receiving redirected outbound connections (on loopback).
    pub outbound_port: u16,
    /// The proxy's UIDs and GIDs: their traffic is not redirected outbound (Istio sends what
    /// they send to the pod itself through `lo` to the inbound port).
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    pub inbound_ports: InboundPorts,
    /// Inbound connections from these sources are not redirected (Linkerd's skip-subnets).
    pub exclude_inbound_sources: Vec<IpNetwork>,
    /// Outbound connections to these destination ports are not redirected.
    pub exclude_outbound_ports: Vec<PortRange>,
    pub outbound_cidrs: OutboundCidrs,
    /// Outbound connections to these ports are redirected whatever their address (Istio's
    /// includeOutboundPorts).
    pub include_outbound_ports: Vec<PortRange>,
    /// Traffic in or out through these interfaces is never redirected.
    pub exclude_interfaces: Vec<IfName>,
    /// TCP arriving on these (KubeVirt) interfaces goes to the outbound port, as if the pod sent it.
    pub reroute_interfaces: Vec<IfName>,
    pub semantics: Semantics,
    pub families: Families,
    // Modes beyond TCP REDIRECT (Istio's DNS capture, TPROXY inbound, INVALID drop).
    /// DNS capture: UDP and TCP to port 53 go to the agent's DNS port.
    pub dns: Option<DnsCapture>,
    /// How inbound connections reach the proxy; outbound is always REDIRECT.
    pub mode: InterceptionMode,
    /// Packets conntrack finds INVALID are dropped on arrival (Istio's INVALID_DROP).
    pub drop_invalid: bool,
}

impl InterceptPlan {
    /// A plain pod with Istio's ports: 15006 inbound, 15001 outbound, UID 1337, everything
    /// intercepted.
    pub fn with_defaults(families: Families) -> Self {
        InterceptPlan {
            inbound_port: 15006,
            outbound_port: 15001,
            proxy_uids: vec![1337],
            proxy_gids: Vec::new(),
            inbound_ports: InboundPorts::AllExcept(Vec::new()),
            exclude_inbound_sources: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            outbound_cidrs: OutboundCidrs::AllExcept(Vec::new()),
            include_outbound_ports: Vec::new(),
            exclude_interfaces: Vec::new(),
            reroute_interfaces: Vec::new(),
            semantics: Semantics::Own,
            families,
            dns: None,
            mode: InterceptionMode::Redirect,
            drop_invalid: false,
        }
    }
}

/// Istio's DNS capture as istio-cni installs it (CAPTURE_ALL_DNS: every destination, since a
/// CNI plugin cannot know the pod's resolvers): UDP and TCP to port 53 from anyone but the proxy
/// are redirected to `port`; the proxy's own queries go out directly. UDP DNS is split into two
/// conntrack zones (app <-> agent in zone 2, agent <-> resolver in zone 1) so the two legs of
/// one query never share a conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsCapture {
    /// The agent's DNS listener (Istio: 15053).
    pub port: u16,
}

impl DnsCapture {
    /// The port every DNS capture rule matches.
    pub const DNS_PORT: u16 = 53;
    /// Conntrack zone of the proxy's queries to the resolvers (and their answers).
    pub const UPSTREAM_ZONE: u16 = 1;
    /// Conntrack zone of the app's queries to the agent (and its answers).
    pub const CLIENT_ZONE: u16 = 2;

    /// Istio's agent DNS port.
    pub const fn istio() -> Self {
        DnsCapture { port: 15053 }
    }
}

/// How inbound connections are handed to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterceptionMode {
    /// DNAT to the proxy's inbound port (the proxy reads SO_ORIGINAL_DST).
    Redirect,
    /// TPROXY: the connection reaches the proxy's transparent listener unchanged (peer's source
    /// address and original destination kept).
    Tproxy(Tproxy),
}

/// Istio's TPROXY numbers (INBOUND_TPROXY_MARK, INBOUND_TPROXY_ROUTE_TABLE and the mark of the
/// proxy's connections to its own pod).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tproxy {
    /// Mark of diverted inbound packets, routed by `route_table` to the local stack.
    pub mark: u32,
    /// Mark of the proxy's connections to its own pod over `lo` (so they are diverted too).
    pub outbound_mark: u32,
    /// Routing table holding `local default dev lo`.
    pub route_table: u32,
}

impl Tproxy {
    pub const fn istio() -> Self {
        Tproxy {
            mark: 1337,
            outbound_mark: 1338,
            route_table: 133,
        }
    }
}

/// Literal ports and networks for the tests of every module that builds plans.
#[cfg(test)]
pub(crate) mod test_support {
    use super::PortRange;
    use ipnetwork::IpNetwork;

    pub fn ports(list: &[(u16, u16)]) -> Vec<PortRange> {
        list.iter()
            .map(|&(a, b)| PortRange::new(a, b).unwrap())
            .collect()
    }

    pub fn nets(list: &[&str]) -> Vec<IpNetwork> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_reject() {
        assert_eq!(
            "80".parse::<PortRange>().unwrap(),
            PortRange::single(80).unwrap()
        );
        assert_eq!(
            " 8000-8100 ".parse::<PortRange>().unwrap(),
            PortRange::new(8000, 8100).unwrap()
        );
        for bad in [
            "",
            "0",
            "65536",
            "-1",
            "10-5",
            "a",
            "1-",
            "-5",
            "1-2-3",
            "+5",
            "8080;drop",
            "1 2",
        ] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(PortRange::new(1, 65535).unwrap().to_string(), "1-65535");
        assert_eq!(PortRange::single(22).unwrap().to_string(), "22");
    }
}
