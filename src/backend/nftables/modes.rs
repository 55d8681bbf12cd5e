//! The chains of the modes beyond TCP REDIRECT in `table inet intercept-cni`, rule for rule as
//! Istio's own nftables rules (tools/istio-nftables) and iptables rules for istio-cni have them,
//! hand-encoded (`expr`) because they need `ct zone set` and `tproxy`:
//!
//! - DNS capture: `dns` (nat, output, priority -101, so it decides before `output`: the first
//!   nat chain that translates a connection ends the nat lookup) lets the proxy's traffic, the
//!   inbound passthrough source and the outbound port exclusions go, then redirects TCP and UDP
//!   53 to the agent; `raw-output` and `raw-prerouting` (priority raw, before conntrack) put
//!   the app's queries in zone 2 and the proxy's upstream queries in zone 1.
//! - INVALID drop: `ct state invalid drop` first in `mangle-prerouting` (priority mangle).
//! - TPROXY: `mangle-prerouting` sends TCP to `tproxy-inbound` (Istio's mangle ISTIO_INBOUND),
//!   where packets of known connections are marked and accepted (`divert`) and new ones handed
//!   to the proxy's transparent listener (`tproxy`); `mangle-output` (a route chain, so a new
//!   mark reroutes) marks the proxy's connections to its own pod and restores the mark of
//!   replies from the connection, which the policy routing (`crate::route`) sends to `lo`.

use super::expr::{self, Expr};
use super::TABLE_NAME;
use crate::plan::{DnsCapture, InboundPorts, InterceptPlan, InterceptionMode, PortRange, Tproxy};
use ipnetwork::IpNetwork;
use nix::libc;
use rustables::{Chain, ChainPolicy, ChainType, Hook, HookClass};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const RAW_PRIORITY: i32 = -300;
const MANGLE_PRIORITY: i32 = -150;
/// Just before the `output` nat chain (-100).
const DNS_PRIORITY: i32 = -101;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nat,
    Filter,
    Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base {
    pub kind: Kind,
    /// true: prerouting; false: output.
    pub prerouting: bool,
    pub priority: i32,
}

/// One chain of a mode; `base: None` is a regular chain reached by jumps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeChain {
    pub name: &'static str,
    pub base: Option<Base>,
    pub rules: Vec<ModeRule>,
}

/// A rule: its nft text and its expressions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeRule {
    pub text: String,
    pub exprs: Vec<Expr>,
}

impl ModeChain {
    pub fn to_chain(&self, table: &rustables::Table) -> Chain {
        let chain = Chain::new(table).with_name(self.name);
        match self.base {
            None => chain,
            Some(base) => {
                let class = match base.prerouting {
                    true => HookClass::PreRouting,
                    false => HookClass::Out,
                };
                chain
                    .with_hook(Hook::new(class, base.priority))
                    .with_type(match base.kind {
                        Kind::Nat => ChainType::Nat,
                        Kind::Filter => ChainType::Filter,
                        Kind::Route => ChainType::Route,
                    })
                    .with_policy(ChainPolicy::Accept)
            }
        }
    }

    /// What kind of chain it is, for CHECK's messages.
    pub fn kind(&self) -> String {
        match self.base {
            None => "a regular chain".to_string(),
            Some(base) => format!(
                "a {:?} chain at {} priority {} with policy accept",
                base.kind,
                if base.prerouting {
                    "prerouting"
                } else {
                    "output"
                },
                base.priority
            )
            .to_lowercase(),
        }
    }

    /// NFT_MSG_NEWRULE messages for the rules, in order.
    pub fn rule_messages(&self) -> Vec<Vec<u8>> {
        self.rules
            .iter()
            .map(|r| expr::rule_message(TABLE_NAME, self.name, &r.exprs))
            .collect()
    }
}

/// One rule being put together: nft text and expressions side by side.
struct R(Vec<String>, Vec<Expr>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    fn nfproto(self) -> u8 {
        match self {
            Fam::V4 => libc::NFPROTO_IPV4 as u8,
            Fam::V6 => libc::NFPROTO_IPV6 as u8,
        }
    }
    fn kw(self) -> &'static str {
        match self {
            Fam::V4 => "ip",
            Fam::V6 => "ip6",
        }
    }
    fn localhost(self) -> IpAddr {
        match self {
            Fam::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Fam::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    }
    /// Envoy's inbound passthrough source.
    fn passthrough(self) -> IpAddr {
        match self {
            Fam::V4 => IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)),
            Fam::V6 => IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6)),
        }
    }
    fn of(net: &IpNetwork) -> Fam {
        match net {
            IpNetwork::V4(_) => Fam::V4,
            IpNetwork::V6(_) => Fam::V6,
        }
    }
}

impl R {
    fn new() -> R {
        R(Vec::new(), Vec::new())
    }
    /// A rule of a base chain that only the plan's family may pass when it has one (iptables
    /// writes such rules for that family's table only).
    fn within(plan: &InterceptPlan) -> R {
        match families(plan)[..] {
            [only] => R::new().nfproto(only),
            _ => R::new(),
        }
    }
    fn add(mut self, text: impl Into<String>, exprs: impl IntoIterator<Item = Expr>) -> R {
        self.0.push(text.into());
        self.1.extend(exprs);
        self
    }
    /// `meta l4proto tcp`; `shown: false` for the implicit dependency of a port match.
    fn l4_match(self, proto: &str, shown: bool) -> R {
        let num = match proto {
            "udp" => libc::IPPROTO_UDP,
            _ => libc::IPPROTO_TCP,
        } as u8;
        let text = if shown {
            format!("meta l4proto {proto}")
        } else {
            String::new()
        };
        self.add(
            text,
            [
                expr::meta_load(expr::META_L4PROTO),
                expr::cmp(expr::CMP_EQ, &[num]),
            ],
        )
    }
    fn l4(self, proto: &str) -> R {
        self.l4_match(proto, true)
    }
    /// `meta nfproto ipv4`; `shown: false` for the implicit dependency of an address match.
    fn nfproto_match(self, fam: Fam, shown: bool) -> R {
        let name = match fam {
            Fam::V4 => "ipv4",
            Fam::V6 => "ipv6",
        };
        let text = if shown {
            format!("meta nfproto {name}")
        } else {
            String::new()
        };
        self.add(
            text,
            [
                expr::meta_load(expr::META_NFPROTO),
                expr::cmp(expr::CMP_EQ, &[fam.nfproto()]),
            ],
        )
    }
    fn nfproto(self, fam: Fam) -> R {
        self.nfproto_match(fam, true)
    }
    /// `udp dport 53`, `tcp sport 8000-8100` (with its protocol dependency).
    fn port(self, proto: &str, dest: bool, range: PortRange) -> R {
        let dir = if dest { "dport" } else { "sport" };
        let load = expr::payload(expr::PAYLOAD_TRANSPORT, if dest { 2 } else { 0 }, 2);
        let cmps = expr::port_cmps(&range);
        let r = self.l4_match(proto, false);
        r.add(
            format!("{proto} {dir} {range}"),
            std::iter::once(load).chain(cmps),
        )
    }
    /// `ip saddr 10.0.0.0/8`, `ip6 daddr != ::1`.
    fn addr(self, source: bool, net: IpNetwork, equal: bool) -> R {
        let fam = Fam::of(&net);
        let op = if equal { expr::CMP_EQ } else { expr::CMP_NEQ };
        let exprs = expr::address_cmp(&net, source, op);
        let full = if net.is_ipv6() { 128 } else { 32 };
        let shown = if net.prefix() == full {
            net.ip().to_string()
        } else {
            format!("{}/{}", net.network(), net.prefix())
        };
        let dir = if source { "saddr" } else { "daddr" };
        let neg = if equal { "" } else { "!= " };
        self.nfproto_match(fam, false)
            .add(format!("{} {dir} {neg}{shown}", fam.kw()), exprs)
    }
    fn host(self, source: bool, addr: IpAddr, equal: bool) -> R {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        match IpNetwork::new(addr, prefix) {
            Ok(net) => self.addr(source, net, equal),
            Err(_) => self,
        }
    }
    fn ifname(self, input: bool) -> R {
        self.iface(input, "lo")
    }
    /// `iifname "eth1"` / `oifname "eth1"` (a validated `IfName`, or `lo`).
    fn iface(self, input: bool, name: &str) -> R {
        let (key, kw) = match input {
            true => (expr::META_IIFNAME, "iifname"),
            false => (expr::META_OIFNAME, "oifname"),
        };
        self.add(
            format!("{kw} \"{name}\""),
            [
                expr::meta_load(key),
                expr::cmp(expr::CMP_EQ, &expr::ifname(name)),
            ],
        )
    }
    /// `meta skuid 1337` / `meta skgid 1337`.
    fn owner(self, owner: Owner) -> R {
        let (key, kw, id) = match owner {
            Owner::Uid(id) => (expr::META_SKUID, "skuid", id),
            Owner::Gid(id) => (expr::META_SKGID, "skgid", id),
        };
        self.add(
            format!("meta {kw} {id}"),
            [
                expr::meta_load(key),
                expr::cmp(expr::CMP_EQ, &id.to_ne_bytes()),
            ],
        )
    }
    fn mark(self, mark: u32, equal: bool) -> R {
        let (op, neg) = match equal {
            true => (expr::CMP_EQ, ""),
            false => (expr::CMP_NEQ, "!= "),
        };
        self.add(
            format!("meta mark {neg}0x{mark:08x}"),
            [
                expr::meta_load(expr::META_MARK),
                expr::cmp(op, &mark.to_ne_bytes()),
            ],
        )
    }
    fn ct_mark(self, mark: u32) -> R {
        self.add(
            format!("ct mark 0x{mark:08x}"),
            [
                expr::ct_load(expr::CT_MARK),
                expr::cmp(expr::CMP_EQ, &mark.to_ne_bytes()),
            ],
        )
    }
    fn ct_state(self, bits: u32, text: &str) -> R {
        self.add(
            format!("ct state {text}"),
            [
                expr::ct_load(expr::CT_STATE),
                expr::and_mask(&bits.to_ne_bytes()),
                expr::cmp(expr::CMP_NEQ, &0u32.to_ne_bytes()),
            ],
        )
    }
    fn verdict(self, code: i32, chain: Option<&str>) -> ModeRule {
        let text = match (code, chain) {
            (expr::NFT_RETURN, _) => "return".to_string(),
            (expr::NF_DROP, _) => "drop".to_string(),
            (expr::NF_ACCEPT, _) => "accept".to_string(),
            (_, Some(chain)) => format!("jump {chain}"),
            _ => format!("verdict {code}"),
        };
        self.add(text, [expr::verdict(code, chain)]).done()
    }
    fn ret(self) -> ModeRule {
        self.verdict(expr::NFT_RETURN, None)
    }
    fn jump(self, chain: &str) -> ModeRule {
        self.verdict(expr::NFT_JUMP, Some(chain))
    }
    fn set_mark(self, mark: u32) -> R {
        self.add(
            format!("meta mark set 0x{mark:08x}"),
            [
                expr::immediate(expr::REG_1, &mark.to_ne_bytes()),
                expr::meta_set(expr::META_MARK),
            ],
        )
    }
    fn ct_zone(self, zone: u16) -> ModeRule {
        self.add(
            format!("ct zone set {zone}"),
            [
                expr::immediate(expr::REG_1, &zone.to_ne_bytes()),
                expr::ct_set(expr::CT_ZONE),
            ],
        )
        .done()
    }
    /// REDIRECT of local traffic: DNAT to loopback and `port`.
    fn redirect(self, fam: Fam, port: u16) -> ModeRule {
        let to = match fam.localhost() {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        self.nfproto(fam)
            .add(
                format!("dnat {} to {to}", fam.kw()),
                [
                    expr::immediate(expr::REG_1, &expr::octets(fam.localhost())),
                    expr::immediate(expr::REG_2, &port.to_be_bytes()),
                    expr::dnat(fam.nfproto()),
                ],
            )
            .done()
    }
    fn done(self) -> ModeRule {
        let words: Vec<String> = self.0.into_iter().filter(|t| !t.is_empty()).collect();
        ModeRule {
            text: words.join(" "),
            exprs: self.1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Owner {
    Uid(u32),
    Gid(u32),
}

fn owners(plan: &InterceptPlan) -> Vec<Owner> {
    let uids = plan.proxy_uids.iter().copied().map(Owner::Uid);
    uids.chain(plan.proxy_gids.iter().copied().map(Owner::Gid))
        .collect()
}

fn families(plan: &InterceptPlan) -> Vec<Fam> {
    let mut out = Vec::new();
    if plan.families.ipv4 {
        out.push(Fam::V4);
    }
    if plan.families.ipv6 {
        out.push(Fam::V6);
    }
    out
}

fn single(port: u16) -> Option<PortRange> {
    PortRange::single(port).ok()
}

/// The mode chains for `plan`, empty when it asks for no mode.
pub fn chains(plan: &InterceptPlan) -> Vec<ModeChain> {
    let mut chains = Vec::new();
    if let Some(dns) = plan.dns {
        chains.extend(dns_chains(plan, dns));
    }
    let tproxy = match plan.mode {
        InterceptionMode::Tproxy(t) if plan.inbound_ports != InboundPorts::None => Some(t),
        _ => None,
    };
    if plan.drop_invalid || tproxy.is_some() {
        let mut pre = Vec::new();
        // Under TPROXY, Istio's excluded interfaces return in mangle too, before the drop.
        if tproxy.is_some() {
            for iface in &plan.exclude_interfaces {
                pre.push(R::new().iface(true, iface.as_str()).ret());
            }
        }
        if plan.drop_invalid {
            pre.push(
                R::within(plan)
                    .ct_state(expr::CT_STATE_INVALID, "invalid")
                    .verdict(expr::NF_DROP, None),
            );
        }
        if let Some(t) = tproxy {
            pre.push(R::within(plan).l4("tcp").jump("tproxy-inbound"));
            pre.push(
                R::within(plan)
                    .l4("tcp")
                    .mark(t.mark, true)
                    .add(
                        "ct mark set meta mark",
                        [
                            expr::meta_load(expr::META_MARK),
                            expr::ct_set(expr::CT_MARK),
                        ],
                    )
                    .done(),
            );
        }
        chains.push(ModeChain {
            name: "mangle-prerouting",
            base: Some(Base {
                kind: Kind::Filter,
                prerouting: true,
                priority: MANGLE_PRIORITY,
            }),
            rules: pre,
        });
        if let Some(t) = tproxy {
            chains.extend(tproxy_chains(plan, t));
        }
    }
    chains
}

fn dns_chains(plan: &InterceptPlan, dns: DnsCapture) -> Vec<ModeChain> {
    let fams = families(plan);
    let mut nat: Vec<ModeRule> = plan
        .exclude_interfaces
        .iter()
        .map(|iface| R::new().iface(false, iface.as_str()).ret())
        .collect();
    for range in &plan.exclude_outbound_ports {
        for proto in ["tcp", "udp"] {
            nat.push(R::new().port(proto, true, *range).ret());
        }
    }
    for &fam in &fams {
        nat.push(
            R::new()
                .ifname(false)
                .host(true, fam.passthrough(), true)
                .ret(),
        );
    }
    for owner in owners(plan) {
        nat.push(R::new().owner(owner).ret());
    }
    let Some(port53) = single(DnsCapture::DNS_PORT) else {
        return Vec::new();
    };
    for proto in ["tcp", "udp"] {
        for &fam in &fams {
            nat.push(R::new().port(proto, true, port53).redirect(fam, dns.port));
        }
    }
    let mut out = Vec::new();
    for owner in owners(plan) {
        out.push(
            R::within(plan)
                .port("udp", true, port53)
                .owner(owner)
                .ct_zone(DnsCapture::UPSTREAM_ZONE),
        );
        if let Some(agent) = single(dns.port) {
            out.push(
                R::within(plan)
                    .port("udp", false, agent)
                    .owner(owner)
                    .ct_zone(DnsCapture::CLIENT_ZONE),
            );
        }
    }
    out.push(
        R::within(plan)
            .port("udp", true, port53)
            .ct_zone(DnsCapture::CLIENT_ZONE),
    );
    let pre = vec![R::within(plan)
        .port("udp", false, port53)
        .ct_zone(DnsCapture::UPSTREAM_ZONE)];
    vec![
        ModeChain {
            name: "dns",
            base: Some(Base {
                kind: Kind::Nat,
                prerouting: false,
                priority: DNS_PRIORITY,
            }),
            rules: nat,
        },
        ModeChain {
            name: "raw-output",
            base: Some(Base {
                kind: Kind::Filter,
                prerouting: false,
                priority: RAW_PRIORITY,
            }),
            rules: out,
        },
        ModeChain {
            name: "raw-prerouting",
            base: Some(Base {
                kind: Kind::Filter,
                prerouting: true,
                priority: RAW_PRIORITY,
            }),
            rules: pre,
        },
    ]
}

fn tproxy_chains(plan: &InterceptPlan, t: Tproxy) -> Vec<ModeChain> {
    let fams = families(plan);
    let mut inbound = vec![R::new().l4("tcp").mark(t.mark, true).ret()];
    for &fam in &fams {
        inbound.push(
            R::new()
                .ifname(true)
                .host(true, fam.passthrough(), true)
                .l4("tcp")
                .ret(),
        );
    }
    inbound.push(
        R::new()
            .ifname(true)
            .l4("tcp")
            .mark(t.outbound_mark, false)
            .ret(),
    );
    for net in plan
        .exclude_inbound_sources
        .iter()
        .filter(|n| fams.contains(&Fam::of(n)))
    {
        inbound.push(R::new().addr(true, *net, true).ret());
    }
    let established = expr::CT_STATE_ESTABLISHED | expr::CT_STATE_RELATED;
    match &plan.inbound_ports {
        InboundPorts::AllExcept(excluded) => {
            for range in excluded {
                inbound.push(R::new().port("tcp", true, *range).ret());
            }
            inbound.push(
                R::new()
                    .l4("tcp")
                    .ct_state(established, "established,related")
                    .jump("divert"),
            );
            inbound.push(R::new().l4("tcp").jump("tproxy"));
        }
        InboundPorts::Only(included) => {
            for range in included {
                inbound.push(
                    R::new()
                        .port("tcp", true, *range)
                        .ct_state(established, "established,related")
                        .jump("divert"),
                );
                inbound.push(R::new().port("tcp", true, *range).jump("tproxy"));
            }
        }
        InboundPorts::None => {}
    }
    let divert = vec![
        R::new().set_mark(t.mark).done(),
        R::new().verdict(expr::NF_ACCEPT, None),
    ];
    let tproxy = fams
        .iter()
        .map(|&fam| {
            R::new()
                .l4("tcp")
                .host(false, fam.localhost(), false)
                .add(
                    format!("tproxy {} to :{}", fam.kw(), plan.inbound_port),
                    [
                        expr::immediate(expr::REG_2, &plan.inbound_port.to_be_bytes()),
                        expr::tproxy(fam.nfproto()),
                    ],
                )
                .set_mark(t.mark)
                .verdict(expr::NF_ACCEPT, None)
        })
        .collect();
    let mut output: Vec<ModeRule> = plan
        .exclude_interfaces
        .iter()
        .map(|iface| R::new().iface(false, iface.as_str()).ret())
        .collect();
    output.push(
        R::within(plan)
            .ifname(false)
            .l4("tcp")
            .mark(t.mark, true)
            .ret(),
    );
    for owner in owners(plan) {
        for &fam in &fams {
            output.push(
                R::new()
                    .ifname(false)
                    .l4("tcp")
                    .host(false, fam.localhost(), false)
                    .owner(owner)
                    .set_mark(t.outbound_mark)
                    .done(),
            );
        }
    }
    output.push(
        R::within(plan)
            .l4("tcp")
            .ct_mark(t.mark)
            .add(
                "meta mark set ct mark",
                [
                    expr::ct_load(expr::CT_MARK),
                    expr::meta_set(expr::META_MARK),
                ],
            )
            .done(),
    );
    vec![
        ModeChain {
            name: "tproxy-inbound",
            base: None,
            rules: inbound,
        },
        ModeChain {
            name: "divert",
            base: None,
            rules: divert,
        },
        ModeChain {
            name: "tproxy",
            base: None,
            rules: tproxy,
        },
        ModeChain {
            name: "mangle-output",
            base: Some(Base {
                kind: Kind::Route,
                prerouting: false,
                priority: MANGLE_PRIORITY,
            }),
            rules: output,
        },
    ]
}

impl fmt::Display for ModeChain {
    /// As `nft list table` prints the chain.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "\tchain {} {{", self.name)?;
        if let Some(base) = self.base {
            let kind = match base.kind {
                Kind::Nat => "nat",
                Kind::Filter => "filter",
                Kind::Route => "route",
            };
            let hook = if base.prerouting {
                "prerouting"
            } else {
                "output"
            };
            let priority = match base.priority {
                RAW_PRIORITY => "raw".to_string(),
                MANGLE_PRIORITY => "mangle".to_string(),
                other => other.to_string(),
            };
            writeln!(
                f,
                "\t\ttype {kind} hook {hook} priority {priority}; policy accept;"
            )?;
        }
        for rule in &self.rules {
            writeln!(f, "\t\t{}", rule.text)?;
        }
        writeln!(f, "\t}}")
    }
}
