//! iptables rendering of the modes beyond TCP REDIRECT, rule for rule as Istio's
//! `istio-iptables` writes them for istio-cni (capture-all DNS, TPROXY, INVALID_DROP), in our own
//! chains and in the exact form `-save` prints back:
//!
//! - DNS capture: nat `ICNI_DNS`, inserted first in OUTPUT (so no other rule of ours redirects
//!   port 53 first), lets the proxy's traffic and the outbound port exclusions go, then
//!   redirects TCP and UDP 53 to the agent; raw `ICNI_DNS_OUT` (OUTPUT) and `ICNI_DNS_IN`
//!   (PREROUTING) put the two legs of a UDP query in conntrack zones 2 and 1.
//! - INVALID drop and TPROXY: mangle `ICNI_PRE` (PREROUTING) drops INVALID packets, sends TCP
//!   to `ICNI_TPROXY_IN` (Istio's mangle ISTIO_INBOUND), and saves the divert mark in the
//!   connection; `ICNI_DIVERT` marks and accepts packets of known connections, `ICNI_TPROXY`
//!   hands new ones to the proxy's transparent listener; mangle `ICNI_OUT` (OUTPUT) marks the
//!   proxy's connections to its own pod and restores the mark of replies.

use super::chains::{Chain, Family, Hook};
use super::render::{address_match, multiport_lists};
use crate::plan::{DnsCapture, InboundPorts, InterceptPlan, InterceptionMode, Tproxy};
use ipnetwork::IpNetwork;

pub const DNS_CHAIN: &str = "ICNI_DNS";
pub const DNS_ZONE_OUT_CHAIN: &str = "ICNI_DNS_OUT";
pub const DNS_ZONE_IN_CHAIN: &str = "ICNI_DNS_IN";
pub const MANGLE_PRE_CHAIN: &str = "ICNI_PRE";
pub const MANGLE_OUT_CHAIN: &str = "ICNI_OUT";
pub const TPROXY_INBOUND_CHAIN: &str = "ICNI_TPROXY_IN";
pub const DIVERT_CHAIN: &str = "ICNI_DIVERT";
pub const TPROXY_CHAIN: &str = "ICNI_TPROXY";

/// The tables beyond nat that the modes use, in restore order.
pub const EXTRA_TABLES: [&str; 2] = ["raw", "mangle"];

fn hook(base: &'static str, chain: &'static str, first: bool) -> Hook {
    Hook {
        base,
        chain,
        spec: format!("-j {chain}"),
        first,
    }
}

impl Family {
    /// The address Envoy binds for inbound passthrough (`127.0.0.6`, `::6`), `-save` style.
    fn passthrough_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }

    /// Istio's "not to loopback" address (HostIPv4LoopbackCidr and `::1`).
    fn localhost(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn any_address(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0",
            Family::V6 => "::",
        }
    }
}

/// The nat jumps the modes add.
pub fn nat_hooks(plan: &InterceptPlan) -> Vec<Hook> {
    match plan.dns {
        Some(_) => vec![hook("OUTPUT", DNS_CHAIN, true)],
        None => Vec::new(),
    }
}

/// The nat chains the modes add.
pub fn nat_chains(plan: &InterceptPlan, family: Family) -> Vec<Chain> {
    let Some(dns) = plan.dns else {
        return Vec::new();
    };
    // What precedes the DNS rules in Istio's nat OUTPUT: excluded interfaces, then in
    // ISTIO_OUTPUT port exclusions (TCP and UDP), the inbound passthrough source, and the
    // proxy's own traffic.
    let mut rules: Vec<String> = plan
        .exclude_interfaces
        .iter()
        .map(|iface| format!("-o {iface} -j RETURN"))
        .collect();
    for ports in multiport_lists(&plan.exclude_outbound_ports) {
        for proto in ["tcp", "udp"] {
            rules.push(format!(
                "-p {proto} -m multiport --dports {ports} -j RETURN"
            ));
        }
    }
    rules.push(format!(
        "-s {} -o lo -j RETURN",
        family.passthrough_source()
    ));
    rules.extend(owner_matches(plan).map(|owner| format!("{owner} -j RETURN")));
    let port = DnsCapture::DNS_PORT;
    for proto in ["tcp", "udp"] {
        rules.push(format!(
            "-p {proto} -m {proto} --dport {port} -j REDIRECT --to-ports {}",
            dns.port
        ));
    }
    vec![Chain {
        name: DNS_CHAIN,
        rules,
    }]
}

/// `-m owner --uid-owner N` for each proxy UID, then `-m owner --gid-owner N` for each GID.
fn owner_matches(plan: &InterceptPlan) -> impl Iterator<Item = String> + '_ {
    plan.proxy_uids
        .iter()
        .map(|uid| format!("-m owner --uid-owner {uid}"))
        .chain(
            plan.proxy_gids
                .iter()
                .map(|gid| format!("-m owner --gid-owner {gid}")),
        )
}

/// The chains and jumps of one extra table (`EXTRA_TABLES`); empty when the plan needs none.
pub fn table(plan: &InterceptPlan, family: Family, table: &str) -> (Vec<Chain>, Vec<Hook>) {
    match table {
        "raw" => raw(plan),
        "mangle" => mangle(plan, family),
        _ => (Vec::new(), Vec::new()),
    }
}

fn raw(plan: &InterceptPlan) -> (Vec<Chain>, Vec<Hook>) {
    let Some(dns) = plan.dns else {
        return (Vec::new(), Vec::new());
    };
    let (port, upstream, client) = (
        DnsCapture::DNS_PORT,
        DnsCapture::UPSTREAM_ZONE,
        DnsCapture::CLIENT_ZONE,
    );
    let mut out = Vec::new();
    for owner in owner_matches(plan) {
        out.push(format!(
            "-p udp -m udp --dport {port} {owner} -j CT --zone {upstream}"
        ));
        out.push(format!(
            "-p udp -m udp --sport {} {owner} -j CT --zone {client}",
            dns.port
        ));
    }
    out.push(format!(
        "-p udp -m udp --dport {port} -j CT --zone {client}"
    ));
    let chains = vec![
        Chain {
            name: DNS_ZONE_OUT_CHAIN,
            rules: out,
        },
        Chain {
            name: DNS_ZONE_IN_CHAIN,
            rules: vec![format!(
                "-p udp -m udp --sport {port} -j CT --zone {upstream}"
            )],
        },
    ];
    let hooks = vec![
        hook("OUTPUT", DNS_ZONE_OUT_CHAIN, false),
        hook("PREROUTING", DNS_ZONE_IN_CHAIN, false),
    ];
    (chains, hooks)
}

/// `-m mark --mark 0x539` as `-save` prints it.
fn mark(value: u32) -> String {
    format!("0x{value:x}")
}

fn mangle(plan: &InterceptPlan, family: Family) -> (Vec<Chain>, Vec<Hook>) {
    let tproxy = match plan.mode {
        InterceptionMode::Tproxy(t) if plan.inbound_ports != InboundPorts::None => Some(t),
        _ => None,
    };
    if !plan.drop_invalid && tproxy.is_none() {
        return (Vec::new(), Vec::new());
    }
    // Under TPROXY, Istio's excluded interfaces return in mangle too, before the INVALID drop.
    let mut pre = Vec::new();
    if tproxy.is_some() {
        pre.extend(
            plan.exclude_interfaces
                .iter()
                .map(|iface| format!("-i {iface} -j RETURN")),
        );
    }
    if plan.drop_invalid {
        pre.push("-m conntrack --ctstate INVALID -j DROP".to_string());
    }
    let mut chains = Vec::new();
    let mut hooks = vec![hook("PREROUTING", MANGLE_PRE_CHAIN, false)];
    if let Some(t) = tproxy {
        pre.push(format!("-p tcp -j {TPROXY_INBOUND_CHAIN}"));
        pre.push(format!(
            "-p tcp -m mark --mark {} -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff",
            mark(t.mark)
        ));
        chains.extend(tproxy_chains(plan, family, t));
        hooks.push(hook("OUTPUT", MANGLE_OUT_CHAIN, false));
    }
    chains.insert(
        0,
        Chain {
            name: MANGLE_PRE_CHAIN,
            rules: pre,
        },
    );
    (chains, hooks)
}

fn tproxy_chains(plan: &InterceptPlan, family: Family, t: Tproxy) -> Vec<Chain> {
    let (m, om) = (mark(t.mark), mark(t.outbound_mark));
    let in_family = |n: &&IpNetwork| {
        matches!(
            (family, n),
            (Family::V4, IpNetwork::V4(_)) | (Family::V6, IpNetwork::V6(_))
        )
    };
    let mut inbound = vec![
        format!("-p tcp -m mark --mark {m} -j RETURN"),
        format!("-s {} -i lo -p tcp -j RETURN", family.passthrough_source()),
        format!("-i lo -p tcp -m mark ! --mark {om} -j RETURN"),
    ];
    for net in plan.exclude_inbound_sources.iter().filter(in_family) {
        inbound.push(format!("{}-j RETURN", address_match("-s", net)));
    }
    let established = "-m conntrack --ctstate RELATED,ESTABLISHED";
    match &plan.inbound_ports {
        InboundPorts::AllExcept(excluded) => {
            for ports in multiport_lists(excluded) {
                inbound.push(format!("-p tcp -m multiport --dports {ports} -j RETURN"));
            }
            inbound.push(format!("-p tcp {established} -j {DIVERT_CHAIN}"));
            inbound.push(format!("-p tcp -j {TPROXY_CHAIN}"));
        }
        InboundPorts::Only(included) => {
            for ports in multiport_lists(included) {
                let dports = format!("-m multiport --dports {ports}");
                inbound.push(format!("-p tcp {dports} {established} -j {DIVERT_CHAIN}"));
                inbound.push(format!("-p tcp {dports} -j {TPROXY_CHAIN}"));
            }
        }
        InboundPorts::None => {}
    }
    let mut out: Vec<String> = plan
        .exclude_interfaces
        .iter()
        .map(|iface| format!("-o {iface} -j RETURN"))
        .collect();
    out.push(format!("-o lo -p tcp -m mark --mark {m} -j RETURN"));
    for owner in owner_matches(plan) {
        out.push(format!(
            "! -d {} -o lo -p tcp {owner} -j MARK --set-xmark {om}/0xffffffff",
            family.localhost()
        ));
    }
    out.push(format!(
        "-p tcp -m connmark --mark {m} -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"
    ));
    vec![
        Chain {
            name: TPROXY_INBOUND_CHAIN,
            rules: inbound,
        },
        Chain {
            name: DIVERT_CHAIN,
            rules: vec![
                format!("-j MARK --set-xmark {m}/0xffffffff"),
                "-j ACCEPT".to_string(),
            ],
        },
        Chain {
            name: TPROXY_CHAIN,
            rules: vec![format!(
                "! -d {} -p tcp -j TPROXY --on-port {} --on-ip {} --tproxy-mark {m}/0xffffffff",
                family.localhost(),
                plan.inbound_port,
                family.any_address()
            )],
        },
        Chain {
            name: MANGLE_OUT_CHAIN,
            rules: out,
        },
    ]
}

/// Golden files of the restore input for the modes, over fresh tables.
/// Regenerate with `INTERCEPT_CNI_BLESS=1 cargo test --lib golden` and review the diff.
#[cfg(test)]
mod golden {
    use super::*;
    use crate::backend::iptables::render::{apply_input, section};
    use crate::backend::iptables::save::NatTable;
    use crate::plan::{Families, PortRange};

    fn restore_input(plan: &InterceptPlan, family: Family) -> String {
        let mut text = apply_input(plan, family, &NatTable::default());
        for name in EXTRA_TABLES {
            let (chains, hooks) = table(plan, family, name);
            if !chains.is_empty() {
                text += &section(name, &chains, &hooks, &NatTable::default());
            }
        }
        text
    }

    fn compare(name: &str, plan: &InterceptPlan, family: Family) {
        let rendered = restore_input(plan, family);
        crate::backend::iptables::chains::assert_golden(name, &rendered);
    }

    /// Istio's dns.txt.golden and invalid-drop.txt.golden, both at once.
    fn dns_and_drop() -> InterceptPlan {
        let mut plan = InterceptPlan::with_defaults(Families::BOTH);
        plan.proxy_gids = vec![1337];
        plan.exclude_outbound_ports = vec![PortRange::single(15020).unwrap()];
        plan.dns = Some(DnsCapture::istio());
        plan.drop_invalid = true;
        plan
    }

    /// Istio's tproxy.txt.golden.
    fn tproxy() -> InterceptPlan {
        let mut plan = InterceptPlan::with_defaults(Families::BOTH);
        plan.proxy_gids = vec![1337];
        plan.inbound_ports = InboundPorts::AllExcept(
            [15020, 15021, 15090]
                .map(|p| PortRange::single(p).unwrap())
                .to_vec(),
        );
        plan.mode = InterceptionMode::Tproxy(Tproxy::istio());
        plan
    }

    #[test]
    fn golden_dns_and_drop_invalid() {
        compare("dns-drop-v4.rules", &dns_and_drop(), Family::V4);
        compare("dns-drop-v6.rules", &dns_and_drop(), Family::V6);
        // Istio's rules with DNS capture: the UID's lo rule spares port 53 (dns.txt.golden).
        let mut istio = dns_and_drop();
        istio.semantics = crate::plan::Semantics::Istio;
        istio.drop_invalid = false;
        compare("istio-dns-v4.rules", &istio, Family::V4);
    }

    #[test]
    fn golden_tproxy() {
        compare("tproxy-v4.rules", &tproxy(), Family::V4);
        compare("tproxy-v6.rules", &tproxy(), Family::V6);
        let mut only = tproxy();
        only.inbound_ports = InboundPorts::Only(vec![PortRange::new(8000, 8100).unwrap()]);
        only.exclude_interfaces = vec!["eth9".parse().unwrap()];
        only.drop_invalid = true;
        only.dns = Some(DnsCapture::istio());
        compare("tproxy-only-v4.rules", &only, Family::V4);
    }

    /// DNS capture's jump must precede the outbound one: added to a table where the outbound
    /// jump sits before another deciding rule, both are put back first, in order.
    #[test]
    fn dns_jump_goes_before_the_outbound_one() {
        let mut plan = InterceptPlan::with_defaults(Families::BOTH);
        plan.dns = Some(DnsCapture::istio());
        let table = NatTable::parse(
            "*nat\n:ICNI_INBOUND - [0:0]\n:ICNI_OUTBOUND - [0:0]\n\
             -A PREROUTING -p tcp -j ICNI_INBOUND\n\
             -A OUTPUT -p tcp -j ICNI_OUTBOUND\n\
             -A OUTPUT -p tcp -j RETURN\nCOMMIT\n",
        );
        let input = apply_input(&plan, Family::V4, &table);
        let hooks: Vec<&str> = input
            .lines()
            .filter(|l| l.contains(" OUTPUT ") || l.contains(" PREROUTING "))
            .collect();
        assert_eq!(
            hooks,
            [
                "-D OUTPUT 1",
                "-I OUTPUT 1 -p tcp -j ICNI_OUTBOUND",
                "-I OUTPUT 1 -j ICNI_DNS"
            ]
        );
        // Turned off again: its chain and jump go.
        let with_dns = NatTable::parse(
            "*nat\n:ICNI_INBOUND - [0:0]\n:ICNI_OUTBOUND - [0:0]\n:ICNI_DNS - [0:0]\n\
             -A PREROUTING -p tcp -j ICNI_INBOUND\n\
             -A OUTPUT -j ICNI_DNS\n\
             -A OUTPUT -p tcp -j ICNI_OUTBOUND\n\
             -A ICNI_DNS -j RETURN\nCOMMIT\n",
        );
        let input = apply_input(
            &InterceptPlan::with_defaults(Families::BOTH),
            Family::V4,
            &with_dns,
        );
        assert!(input.contains("\n:ICNI_DNS - [0:0]\n"), "{input}");
        assert!(input.contains("\n-D OUTPUT 1\n"), "{input}");
        assert!(input.ends_with("-X ICNI_DNS\nCOMMIT\n"), "{input}");
    }

    #[test]
    fn modes_off_add_nothing() {
        let plan = InterceptPlan::with_defaults(Families::BOTH);
        for name in EXTRA_TABLES {
            assert_eq!(table(&plan, Family::V4, name), (Vec::new(), Vec::new()));
        }
        assert!(nat_chains(&plan, Family::V4).is_empty() && nat_hooks(&plan).is_empty());
    }
}
