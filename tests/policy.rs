//! Root-only, live-traffic suite for the per-pod policy (issue 7): the real binary decides from
//! the annotations a runtime puts in `runtimeConfig["io.kubernetes.cri.pod-annotations"]`, and
//! real connections show what it did. Every scenario runs for every backend.

mod common;

use common::*;
use serde_json::{json, Value};

const LINKERD_INBOUND: u16 = 4143;
const LINKERD_OUTBOUND: u16 = 4140;

fn nftables() -> Value {
    json!({"backend": "nftables"})
}

fn iptables_legacy() -> Value {
    json!({"backend": "iptables", "iptablesMode": "legacy"})
}

fn iptables_nft() -> Value {
    json!({"backend": "iptables", "iptablesMode": "nft"})
}

/// The lab's config for `backend` with `keys`, as a runtime with the annotations capability
/// sends it for a pod annotated with `annotations`. `podSelection` is the default unless set.
fn pod_config(lab: &Lab, backend: fn() -> Value, keys: Value, annotations: Value) -> Value {
    let mut conf = lab.config("1.0.0", backend());
    conf.as_object_mut().unwrap().remove("podSelection");
    for (k, v) in keys.as_object().unwrap() {
        conf[k] = v.clone();
    }
    conf["runtimeConfig"] = json!({ "io.kubernetes.cri.pod-annotations": annotations });
    conf
}

/// The pod's own traffic reaches the peer, and the peer's reaches the pod, untouched.
fn assert_untouched(lab: &Lab) {
    lab.outbound_direct(v4(PEER_V4, 8080), None);
    lab.outbound_direct(v6(PEER_V6, 8080), None);
    lab.inbound_direct(v4(POD_V4, 9080));
}

/// ADD leaves the pod alone: prevResult passed through, not a rule added, traffic untouched;
/// CHECK and DEL pass.
fn assert_add_leaves_pod_alone(lab: &Lab, conf: &Value) {
    let before = lab.pod.firewall_state();
    let out = lab.cni("ADD", conf).ok().json();
    let mut expected = conf["prevResult"].clone();
    expected["cniVersion"] = conf["cniVersion"].clone();
    assert_eq!(out, expected, "ADD changed prevResult");
    assert_eq!(lab.pod.firewall_state(), before, "ADD changed the netns");
    assert_untouched(lab);
    lab.cni("CHECK", conf).ok();
    lab.cni("DEL", conf).ok();
    assert_eq!(lab.pod.firewall_state(), before);
}

fn unannotated_pod_untouched(backend: fn() -> Value) {
    let lab = Lab::new();
    let annotations = json!({
        "kubernetes.io/config.source": "api",
        "prometheus.io/scrape": "true",
        "sidecar.istio.io/inject": "true",
        "linkerd.io/inject": "enabled",
    });
    let conf = pod_config(&lab, backend, json!({}), annotations);
    assert_add_leaves_pod_alone(&lab, &conf);
    // A pod without any annotation (Go runtimes send a null map).
    let conf = pod_config(&lab, backend, json!({}), Value::Null);
    assert_add_leaves_pod_alone(&lab, &conf);
}

fn opted_in_pod_intercepted(backend: fn() -> Value) {
    let lab = Lab::new();
    let conf = pod_config(
        &lab,
        backend,
        json!({}),
        json!({"intercept-cni.io/enabled": "true"}),
    );
    lab.cni("ADD", &conf).ok();
    lab.cni("CHECK", &conf).ok();
    lab.outbound_to_proxy(v4(PEER_V4, 8080), None, OUTBOUND_PORT);
    lab.inbound_to_proxy(v6(POD_V6, 9080), INBOUND_PORT);
    lab.cni("DEL", &conf).ok();
    assert_untouched(&lab);
}

fn istio_pod_with_excluded_outbound_port(backend: fn() -> Value) {
    let lab = Lab::new();
    let annotations = json!({
        "sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}",
        "sidecar.istio.io/interceptionMode": "REDIRECT",
        "traffic.sidecar.istio.io/excludeOutboundPorts": "5432,6379",
    });
    let conf = pod_config(&lab, backend, json!({}), annotations);
    lab.cni("ADD", &conf).ok();
    lab.cni("CHECK", &conf).ok();
    lab.outbound_direct(v4(PEER_V4, 5432), None);
    lab.outbound_direct(v6(PEER_V6, 6379), None);
    lab.outbound_to_proxy(v4(PEER_V4, 8080), None, OUTBOUND_PORT);
    // Istio's health port is the proxy's own: never redirected to its inbound port.
    lab.inbound_direct(v4(POD_V4, 15021));
    lab.inbound_to_proxy(v4(POD_V4, 9080), INBOUND_PORT);
    // Istio's proxy runs with group 1337 too: that bypasses as well.
    lab.outbound_direct(v4(PEER_V4, 8080), Some((1000, 1337)));
}

fn outbound_cidr_exclusion(backend: fn() -> Value) {
    let lab = Lab::new();
    let annotations = json!({
        "intercept-cni.io/enabled": "true",
        "intercept-cni.io/exclude-outbound-cidrs": format!("{PEER_V4}/32"),
    });
    let conf = pod_config(&lab, backend, json!({}), annotations);
    lab.cni("ADD", &conf).ok();
    lab.outbound_direct(v4(PEER_V4, 8080), None);
    lab.outbound_to_proxy(v6(PEER_V6, 8080), None, OUTBOUND_PORT);
}

fn explicit_opt_out(backend: fn() -> Value) {
    let lab = Lab::new();
    let all = json!({"podSelection": "all"});
    let opt_outs = [
        json!({"intercept-cni.io/enabled": "false"}),
        json!({"sidecar.istio.io/status": "{}", "sidecar.istio.io/inject": "false"}),
        json!({"linkerd.io/proxy-version": "stable-2.14.10", "linkerd.io/inject": "disabled"}),
    ];
    for annotations in opt_outs {
        let conf = pod_config(&lab, backend, all.clone(), annotations);
        assert_add_leaves_pod_alone(&lab, &conf);
    }
    // The operator's namespace exclusion beats the pod's opt-in (the lab's pod is in "default").
    let keys = json!({"excludeNamespaces": ["kube-system", "default"]});
    let conf = pod_config(
        &lab,
        backend,
        keys,
        json!({"intercept-cni.io/enabled": "true"}),
    );
    assert_add_leaves_pod_alone(&lab, &conf);
}

fn linkerd_skip_subnets_exempts_inbound_sources(backend: fn() -> Value) {
    let lab = Lab::new();
    let annotations = json!({
        "linkerd.io/proxy-version": "stable-2.14.10",
        "config.linkerd.io/skip-subnets": format!("{PEER_V4}/32"),
    });
    // IPv6 only with linkerd-cni's `ipv6` switch (off by default, as in its chart).
    let conf = pod_config(&lab, backend, json!({}), annotations.clone());
    lab.cni("ADD", &conf).ok();
    lab.inbound_direct(v6(POD_V6, 9080));
    lab.cni("DEL", &conf).ok();
    let conf = pod_config(&lab, backend, json!({"dualStack": true}), annotations);
    lab.cni("ADD", &conf).ok();
    lab.cni("CHECK", &conf).ok();
    // From the skipped subnet: straight to the application.
    lab.inbound_direct(v4(POD_V4, 9080));
    // From elsewhere: to Linkerd's inbound port.
    lab.inbound_to_proxy(v6(POD_V6, 9080), LINKERD_INBOUND);
    // skip-subnets is inbound only: the pod's connections to that subnet still go to the proxy.
    lab.outbound_to_proxy(v4(PEER_V4, 8080), None, LINKERD_OUTBOUND);
    // Linkerd's proxy UID bypasses.
    lab.outbound_direct(v4(PEER_V4, 8080), Some((2102, 2102)));
}

fn pod_overrides_off_ignores_tuning(backend: fn() -> Value) {
    let lab = Lab::new();
    let annotations = json!({
        "intercept-cni.io/enabled": "true",
        "intercept-cni.io/exclude-outbound-ports": "8080",
        "intercept-cni.io/proxy-uid": "1000",
    });
    let conf = pod_config(&lab, backend, json!({"podOverrides": false}), annotations);
    lab.cni("ADD", &conf).ok();
    lab.outbound_to_proxy(v4(PEER_V4, 8080), Some((1000, 1000)), OUTBOUND_PORT);
}

fn hostile_values_rejected_without_change(backend: fn() -> Value) {
    let lab = Lab::new();
    let good = pod_config(
        &lab,
        backend,
        json!({}),
        json!({"intercept-cni.io/enabled": "true"}),
    );
    lab.cni("ADD", &good).ok();
    let installed = lab.pod.firewall_state();
    let huge_list = (1..=300)
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let cases = [
        ("intercept-cni.io/exclude-outbound-ports", "80;drop"),
        ("intercept-cni.io/exclude-inbound-ports", "1-2-3"),
        ("intercept-cni.io/include-inbound-ports", "80 -j ACCEPT"),
        (
            "intercept-cni.io/exclude-outbound-cidrs",
            "10.0.0.0/8 -j ACCEPT",
        ),
        (
            "intercept-cni.io/include-outbound-cidrs",
            "0.0.0.0/0\n-A OUTPUT -j ACCEPT",
        ),
        ("intercept-cni.io/inbound-port", "70000"),
        ("intercept-cni.io/outbound-port", "0"),
        ("intercept-cni.io/proxy-uid", "-1"),
        ("intercept-cni.io/proxy-gid", "4294967296"),
        (
            "intercept-cni.io/exclude-outbound-ports",
            huge_list.as_str(),
        ),
        ("intercept-cni.io/enabled", "yes; iptables -F"),
        (
            "traffic.sidecar.istio.io/excludeOutboundPorts",
            "53$(reboot)",
        ),
        ("sidecar.istio.io/interceptionMode", "TPROXY;"),
        (
            "proxy.istio.io/config",
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"$(reboot)\"\n",
        ),
        (
            "proxy.istio.io/config",
            "{\"proxyMetadata\": {\"INVALID_DROP\": [\"true\"]}}",
        ),
        ("config.linkerd.io/skip-subnets", "10.0.0.0/8,;"),
        ("config.linkerd.io/proxy-uid", "2102 -j RETURN"),
    ];
    for (key, value) in cases {
        let mut annotations = json!({"intercept-cni.io/enabled": "true"});
        if key.starts_with("traffic.sidecar")
            || key.starts_with("sidecar.")
            || key.starts_with("proxy.istio.io/")
        {
            annotations = json!({"sidecar.istio.io/status": "{}"});
        } else if key.starts_with("config.linkerd.io/") {
            annotations = json!({"linkerd.io/proxy-version": "stable-2.14.10"});
        }
        annotations[key] = json!(value);
        let conf = pod_config(&lab, backend, json!({}), annotations);
        let answer = lab.cni("ADD", &conf).error(7);
        let msg = answer["msg"].as_str().unwrap();
        assert!(msg.contains(key), "{key}={value:?}: {msg}");
        assert_eq!(
            lab.pod.firewall_state(),
            installed,
            "rejected {key}={value:?} changed the netns"
        );
    }
    // Not a string map at all.
    for bad in [json!({"intercept-cni.io/enabled": true}), json!(["a"])] {
        let conf = pod_config(&lab, backend, json!({}), bad.clone());
        lab.cni("ADD", &conf).error(7);
        assert_eq!(lab.pod.firewall_state(), installed, "{bad}");
    }
}

fn annotated_without_the_capability_is_code_7(backend: fn() -> Value) {
    let lab = Lab::new();
    let before = lab.pod.firewall_state();
    let mut conf = lab.config("1.0.0", backend());
    conf.as_object_mut().unwrap().remove("podSelection");
    for runtime_config in [None, Some(json!({"portMappings": []}))] {
        if let Some(rc) = &runtime_config {
            conf["runtimeConfig"] = rc.clone();
        }
        for command in ["ADD", "CHECK"] {
            let answer = lab.cni(command, &conf).error(7);
            let msg = answer["msg"].as_str().unwrap();
            assert!(
                msg.contains("\"io.kubernetes.cri.pod-annotations\": true"),
                "{command}: {msg}"
            );
        }
        assert_eq!(lab.pod.firewall_state(), before);
    }
    // DEL still succeeds: the runtime repeats it with the config that failed ADD.
    lab.cni("DEL", &conf).ok();
}

macro_rules! every_backend {
    ($($module:ident => $backend:expr),* $(,)?) => {
        $(
            mod $module {
                every_backend!(@tests $backend, [
                    unannotated_pod_untouched,
                    opted_in_pod_intercepted,
                    istio_pod_with_excluded_outbound_port,
                    outbound_cidr_exclusion,
                    explicit_opt_out,
                    linkerd_skip_subnets_exempts_inbound_sources,
                    pod_overrides_off_ignores_tuning,
                    hostile_values_rejected_without_change,
                    annotated_without_the_capability_is_code_7,
                ]);
            }
        )*
    };
    (@tests $backend:expr, [$($scenario:ident),* $(,)?]) => {
        $(
            #[test]
            fn $scenario() {
                super::$scenario($backend);
            }
        )*
    };
}

every_backend! {
    nftables => super::nftables,
    iptables_legacy => super::iptables_legacy,
    iptables_nft => super::iptables_nft,
}
