//! Root-only, live-traffic suite: the real binary, run as a runtime runs it, against a pod netns
//! joined to a peer netns by veth. Every scenario runs for every backend.

mod common;

use common::*;
use serde_json::{json, Value};

/// A backend as the config names it, and how to damage its rules from outside for CHECK.
struct Backend {
    settings: fn() -> Value,
    tamper: &'static [&'static [&'static str]],
}

const NFTABLES: Backend = Backend {
    settings: || json!({"backend": "nftables"}),
    tamper: &[&["nft", "flush", "ruleset"]],
};
const IPTABLES_LEGACY: Backend = Backend {
    settings: || json!({"backend": "iptables", "iptablesMode": "legacy"}),
    tamper: &[&["iptables-legacy", "-t", "nat", "-F", "OUTPUT"]],
};
const IPTABLES_NFT: Backend = Backend {
    settings: || json!({"backend": "iptables", "iptablesMode": "nft"}),
    tamper: &[&["iptables-nft", "-t", "nat", "-F", "OUTPUT"]],
};

/// The lines of a firewall listing that belong to the plugin (its nft table, its iptables chains).
/// iptables leaves the shared, empty nat tables behind: those are not ours to delete.
fn plugin_lines(state: &str) -> Vec<&str> {
    state
        .lines()
        .filter(|l| l.contains("intercept") || l.contains("ICNI_"))
        .collect()
}

fn settings(b: &Backend, extra: Value) -> Value {
    let mut s = (b.settings)();
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

fn outbound_redirected_with_original_destination(b: &Backend) {
    let lab = Lab::new();
    let conf = lab.config("1.0.0", settings(b, json!({})));
    lab.cni("ADD", &conf).ok();
    lab.outbound_to_proxy(v4(PEER_V4, 8080), None, OUTBOUND_PORT);
    lab.outbound_to_proxy(v6(PEER_V6, 8080), None, OUTBOUND_PORT);
}

fn inbound_redirected_with_original_destination(b: &Backend) {
    let lab = Lab::new();
    let conf = lab.config("1.0.0", settings(b, json!({})));
    lab.cni("ADD", &conf).ok();
    lab.inbound_to_proxy(v4(POD_V4, 9080), INBOUND_PORT);
    lab.inbound_to_proxy(v6(POD_V6, 9080), INBOUND_PORT);
}

fn proxy_uid_and_gid_bypass(b: &Backend) {
    let lab = Lab::new();
    let conf = lab.config("1.0.0", settings(b, json!({"proxyGID": 1338})));
    lab.cni("ADD", &conf).ok();
    let proxy = Some((PROXY_UID, 1000));
    // The proxy's own outbound connection reaches the real destination.
    lab.outbound_direct(v4(PEER_V4, 8080), proxy);
    lab.outbound_direct(v6(PEER_V6, 8080), proxy);
    // So does anything running with the proxy's group.
    lab.outbound_direct(v4(PEER_V4, 8080), Some((1000, 1338)));
    // Any other user is still redirected.
    let app = Some((1000, 1000));
    lab.outbound_to_proxy(v4(PEER_V4, 8080), app, OUTBOUND_PORT);
}

fn excluded_ports_and_cidrs_bypass(b: &Backend) {
    let lab = Lab::new();
    let extra = json!({
        "excludeOutboundPorts": [8081],
        "excludeInboundPorts": ["9081-9082"],
        "excludeOutboundCIDRs": [format!("{PEER_V6}/128")],
    });
    let conf = lab.config("1.0.0", settings(b, extra));
    lab.cni("ADD", &conf).ok();
    lab.outbound_direct(v4(PEER_V4, 8081), None);
    lab.inbound_direct(v4(POD_V4, 9082));
    lab.outbound_direct(v6(PEER_V6, 8080), None);
    // What is not excluded is still intercepted.
    lab.outbound_to_proxy(v4(PEER_V4, 8080), None, OUTBOUND_PORT);
    lab.inbound_to_proxy(v4(POD_V4, 9080), INBOUND_PORT);
}

fn include_lists_limit_interception(b: &Backend) {
    let lab = Lab::new();
    let extra = json!({
        "includeInboundPorts": [9080],
        "includeOutboundCIDRs": [format!("{PEER_V4}/32")],
    });
    let conf = lab.config("1.0.0", settings(b, extra));
    lab.cni("ADD", &conf).ok();
    lab.inbound_to_proxy(v4(POD_V4, 9080), INBOUND_PORT);
    lab.inbound_direct(v4(POD_V4, 9090));
    lab.outbound_to_proxy(v4(PEER_V4, 8080), None, OUTBOUND_PORT);
    lab.outbound_direct(v6(PEER_V6, 8080), None);
}

fn only_the_pods_families_get_rules(b: &Backend) {
    let lab = Lab::new();
    let mut conf = lab.config("1.0.0", settings(b, json!({})));
    let ips = conf["prevResult"]["ips"].as_array_mut().unwrap();
    ips.retain(|ip| !ip["address"].as_str().unwrap().contains(':'));
    lab.cni("ADD", &conf).ok();
    lab.outbound_to_proxy(v4(PEER_V4, 8080), None, OUTBOUND_PORT);
    lab.outbound_direct(v6(PEER_V6, 8080), None);
}

fn check_passes_then_detects_drift(b: &Backend) {
    let lab = Lab::new();
    let conf = lab.config("1.0.0", settings(b, json!({})));
    lab.cni("ADD", &conf).ok();
    let check = lab.cni("CHECK", &conf).ok();
    assert_eq!(check.stdout, "", "CHECK prints nothing on success");
    for cmd in b.tamper {
        let out = lab.pod.exec(cmd);
        assert!(
            out.status.success(),
            "tamper {cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    lab.cni("CHECK", &conf).error(103);
    // ADD repairs it.
    lab.cni("ADD", &conf).ok();
    lab.cni("CHECK", &conf).ok();
}

fn add_converges_and_del_leaves_nothing(b: &Backend) {
    let lab = Lab::new();
    let before = lab.pod.firewall_state();
    let conf = lab.config("1.0.0", settings(b, json!({})));
    lab.cni("ADD", &conf).ok();
    let once = lab.pod.firewall_state();
    assert_ne!(once, before, "ADD installed nothing");
    lab.cni("ADD", &conf).ok();
    assert_eq!(
        lab.pod.firewall_state(),
        once,
        "a second ADD changed the ruleset"
    );
    lab.cni("DEL", &conf).ok();
    let after = lab.pod.firewall_state();
    assert_eq!(
        plugin_lines(&after),
        Vec::<&str>::new(),
        "DEL left rules behind"
    );
    if (b.settings)()["backend"] == "nftables" {
        assert_eq!(after, before, "DEL left state behind");
    }
    // Traffic flows untouched again.
    lab.outbound_direct(v4(PEER_V4, 8080), None);
    lab.cni("DEL", &conf).ok();
    let mut no_prev = conf.clone();
    no_prev.as_object_mut().unwrap().remove("prevResult");
    lab.cni("DEL", &no_prev).ok();
}

fn del_on_vanished_netns_succeeds(b: &Backend) {
    let lab = Lab::new();
    let conf = lab.config("1.0.0", settings(b, json!({})));
    lab.cni("ADD", &conf).ok();
    let path = lab.pod.path();
    drop(lab);
    cni("DEL", Some(&path), &conf).ok();
    cni("DEL", None, &conf).ok();
}

fn bad_input_leaves_netns_unchanged(b: &Backend) {
    let lab = Lab::new();
    let good = lab.config("1.0.0", settings(b, json!({})));
    lab.cni("ADD", &good).ok();
    let installed = lab.pod.firewall_state();
    let cases: Vec<(Value, u64)> = vec![
        (json!({"inboundPort": 0}), 7),
        (json!({"outboundPort": 70000}), 7),
        (json!({"proxyUID": -1}), 7),
        (json!({"excludeOutboundPorts": ["10-5"]}), 7),
        (json!({"excludeInboundPorts": ["80;drop"]}), 7),
        (json!({"excludeOutboundCIDRs": ["10.0.0.300/8"]}), 7),
        (json!({"includeOutboundCIDRs": ["0.0.0.0/0 -j ACCEPT"]}), 7),
        (json!({"backend": "bogus"}), 7),
        (json!({"cniVersion": "0.2.0"}), 1),
    ];
    for (patch, code) in cases {
        let mut conf = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            conf[k] = v.clone();
        }
        lab.cni("ADD", &conf).error(code);
        assert_eq!(
            lab.pod.firewall_state(),
            installed,
            "failed ADD {patch} changed the netns"
        );
    }
    let mut no_prev = good.clone();
    no_prev.as_object_mut().unwrap().remove("prevResult");
    lab.cni("ADD", &no_prev).error(7);
    assert_eq!(lab.pod.firewall_state(), installed);
}

macro_rules! live_suite {
    ($module:ident, $backend:expr, [$($scenario:ident),* $(,)?]) => {
        mod $module {
            $(
                #[test]
                fn $scenario() {
                    super::$scenario(&$backend);
                }
            )*
        }
    };
}

macro_rules! every_backend {
    ($($module:ident => $backend:expr),* $(,)?) => {
        $(
            live_suite!($module, $backend, [
                outbound_redirected_with_original_destination,
                inbound_redirected_with_original_destination,
                proxy_uid_and_gid_bypass,
                excluded_ports_and_cidrs_bypass,
                include_lists_limit_interception,
                only_the_pods_families_get_rules,
                check_passes_then_detects_drift,
                add_converges_and_del_leaves_nothing,
                del_on_vanished_netns_succeeds,
                bad_input_leaves_netns_unchanged,
            ]);
        )*
    };
}

every_backend! {
    nftables => super::NFTABLES,
    iptables_legacy => super::IPTABLES_LEGACY,
    iptables_nft => super::IPTABLES_NFT,
}

/// ADD answers with prevResult unchanged but for cniVersion, in every supported version.
#[test]
fn add_passes_prev_result_through_in_every_version() {
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let lab = Lab::new();
        let conf = lab.config(version, json!({"backend": "nftables"}));
        let out = lab.cni("ADD", &conf).ok().json();
        let mut expected = lab.prev_result(version);
        expected["cniVersion"] = json!(version);
        assert_eq!(out, expected, "version {version}");
    }
}
