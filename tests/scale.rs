//! Scale: policies of thousands of entries install, verify and go away, through the binary as a
//! runtime runs it; with nftables every list is one set, so a set-excluded destination goes
//! direct and another is redirected whatever the list's length.

mod common;

use common::*;
use serde_json::{json, Value};
use std::net::{Ipv4Addr, Ipv6Addr};

/// `n` IPv4 /24s from 100.64.0.0 up, every other one so that none merge (never the lab's
/// addresses).
fn many_v4(n: u32) -> Vec<String> {
    (0..n)
        .map(|i| format!("100.{}.{}.0/24", 64 + 2 * i / 256, 2 * i % 256))
        .collect()
}

/// `n` IPv6 /48s inside fd10::/16, every other one.
fn many_v6(n: u32) -> Vec<String> {
    (0..n).map(|i| format!("fd10:{:x}::/48", 2 * i)).collect()
}

/// `n` separate port ranges of 10 ports from 20000 up (clear of the proxy's ports).
fn many_ranges(n: u32) -> Vec<String> {
    (0..n)
        .map(|i| {
            let start = 20000 + i * 40;
            format!("{start}-{}", start + 9)
        })
        .collect()
}

fn rules_in(listing: &str, chain: &str) -> usize {
    let start = listing
        .find(&format!("chain {chain} {{"))
        .unwrap_or_else(|| panic!("no chain {chain} in {listing}"));
    listing[start..]
        .lines()
        .skip(2)
        .take_while(|l| l.trim() != "}")
        .count()
}

fn large_settings(cidrs: u32, ranges: u32) -> Value {
    let mut out_cidrs = many_v4(cidrs);
    out_cidrs.extend(many_v6(cidrs));
    json!({
        "backend": "nftables",
        "excludeOutboundCIDRs": out_cidrs,
        "excludeInboundSourceCIDRs": many_v6(cidrs),
        "excludeOutboundPorts": many_ranges(ranges),
        "excludeInboundPorts": many_ranges(ranges),
    })
}

/// 10000 CIDRs per family and 1000 port ranges: far beyond one netlink message, still one
/// transaction; the chains keep a handful of rules.
#[test]
fn nftables_huge_policy_installs_checks_and_removes() {
    let lab = Lab::new();
    let conf = lab.config("1.0.0", large_settings(10_000, 1000));
    lab.cni("ADD", &conf).ok();
    let listing = lab.pod.nft_ruleset();
    assert!(rules_in(&listing, "output") <= 8, "{listing}");
    assert!(rules_in(&listing, "prerouting") <= 8, "{listing}");
    assert!(listing.contains("100.142.30.0/24"), "last v4 CIDR missing");
    lab.cni("CHECK", &conf).ok();
    // A repeated ADD replaces the table in place.
    lab.cni("ADD", &conf).ok();
    lab.cni("CHECK", &conf).ok();
    lab.cni("DEL", &conf).ok();
    assert_eq!(lab.pod.nft_ruleset(), "", "DEL left rules behind");
}

/// Lists long enough to be sets: the excluded peer goes direct, any other destination, port or
/// source is redirected; then CHECK passes and DEL restores direct traffic.
#[test]
fn nftables_set_excluded_destination_goes_direct_and_another_is_redirected() {
    let lab = Lab::new();
    let mut out_cidrs = many_v4(1000);
    out_cidrs.push(format!("{PEER_V4}/32"));
    out_cidrs.extend(many_v6(1000));
    let mut sources = many_v6(1000);
    sources.push(format!("{PEER_V6}/128"));
    let settings = json!({
        "backend": "nftables",
        "excludeOutboundCIDRs": out_cidrs,
        "excludeOutboundPorts": ["8000-8100", "8500", "20000-20010"],
        "excludeInboundPorts": ["9080-9081", "9500"],
        "excludeInboundSourceCIDRs": sources,
    });
    let conf = lab.config("1.0.0", settings);
    lab.cni("ADD", &conf).ok();
    let listing = lab.pod.nft_ruleset();
    for set in [
        "out_excluded_v4",
        "out_excluded_v6",
        "out_excluded_ports",
        "in_excluded_ports",
        "in_excluded_sources_v6",
    ] {
        assert!(listing.contains(&format!("@{set} return")), "{listing}");
    }

    // In the v4 set: direct. Not in it (same subnet, no owner needed): to the proxy.
    lab.outbound_direct(v4(PEER_V4, 9999), None);
    let elsewhere_v4 = Ipv4Addr::new(10, 248, 0, 77);
    lab.outbound_to_proxy(v4(elsewhere_v4, 9999), None, OUTBOUND_PORT);
    // The v6 peer is in no CIDR set: redirected, except to a port in the port set.
    lab.outbound_to_proxy(v6(PEER_V6, 9999), None, OUTBOUND_PORT);
    lab.outbound_direct(v6(PEER_V6, 8050), None);
    lab.outbound_direct(v6(PEER_V6, 8500), None);
    let elsewhere_v6 = Ipv6Addr::new(0xfd00, 0x248, 0, 0, 0, 0, 0, 0x77);
    lab.outbound_to_proxy(v6(elsewhere_v6, 8499), None, OUTBOUND_PORT);
    // Inbound: excluded ports and the excluded v6 source go direct, the rest to the proxy.
    lab.inbound_direct(v4(POD_V4, 9081));
    lab.inbound_direct(v4(POD_V4, 9500));
    lab.inbound_to_proxy(v4(POD_V4, 9082), INBOUND_PORT);
    lab.inbound_direct(v6(POD_V6, 9999));

    lab.cni("CHECK", &conf).ok();
    lab.cni("DEL", &conf).ok();
    assert_eq!(lab.pod.nft_ruleset(), "");
    lab.outbound_direct(v4(PEER_V4, 9999), None);
}

/// A runtime's config for a pod netns with both families (no veth: the rules do not need one).
fn pod_config(ns: &Netns, backend: &str) -> Value {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "burst",
        "type": "intercept-cni",
        "podSelection": "all",
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": ns.path()}],
            "ips": [
                {"address": format!("{POD_V4}/24"), "interface": 0},
                {"address": format!("{POD_V6}/64"), "interface": 0},
            ],
        },
    });
    match backend.strip_prefix("iptables-") {
        None => conf["backend"] = json!(backend),
        Some(mode) => {
            conf["backend"] = json!("iptables");
            conf["iptablesMode"] = json!(mode);
        }
    }
    conf
}

/// Runs `command` for every pod, `concurrency` at a time as a runtime's workers do; returns the
/// failures as (pod, answer).
fn burst(pods: &[Netns], backend: &str, command: &str, concurrency: usize) -> Vec<String> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(ns) = pods.get(i) else { break };
                let answer = cni(command, Some(&ns.path()), &pod_config(ns, backend));
                if !answer.success {
                    failures.lock().unwrap().push(format!(
                        "{command} pod {i}: {} {}",
                        answer.stdout, answer.stderr
                    ));
                }
            });
        }
    });
    failures.into_inner().unwrap()
}

/// Whether the backend's rules are in `ns`, per family (nftables: its one inet table).
fn ours_in(ns: &Netns, backend: &str) -> [bool; 2] {
    let text = |argv: &[&str]| String::from_utf8_lossy(&ns.exec(argv).stdout).into_owned();
    match backend.strip_prefix("iptables-") {
        None => [text(&["nft", "list", "tables"]).contains("table inet intercept-cni"); 2],
        Some(mode) => ["iptables", "ip6tables"]
            .map(|ip| text(&[&format!("{ip}-{mode}-save"), "-t", "nat"]).contains("ICNI_OUTBOUND")),
    }
}

/// A slice of a node's pods (the benchmark runs kubelet's 110): ADDed 8 at a time then DELed
/// the same way, on every backend; every call succeeds, each pod was intercepted, and no netns
/// keeps anything of ours.
#[test]
fn many_pods_at_once_all_succeed_and_leave_nothing_behind() {
    const PODS: usize = 16;
    const CONCURRENCY: usize = 8;
    for backend in ["nftables", "iptables-legacy", "iptables-nft"] {
        let pods: Vec<Netns> = (0..PODS).map(|_| Netns::new("burst")).collect();
        let failed = burst(&pods, backend, "ADD", CONCURRENCY);
        assert!(failed.is_empty(), "{backend}: {failed:#?}");
        for (i, ns) in pods.iter().enumerate() {
            assert_eq!(
                ours_in(ns, backend),
                [true, true],
                "{backend} pod {i}: no rules"
            );
        }
        let failed = burst(&pods, backend, "DEL", CONCURRENCY);
        assert!(failed.is_empty(), "{backend}: {failed:#?}");
        for (i, ns) in pods.iter().enumerate() {
            assert_eq!(
                ours_in(ns, backend),
                [false, false],
                "{backend} pod {i}: left behind"
            );
        }
    }
}
