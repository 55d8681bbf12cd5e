//! The nftables backend on its own: golden renderings (no kernel), then root-only tests that
//! program throwaway namespaces, read the table back with netlink and `nft`, tamper with it,
//! remove it, and prove the rules with live traffic.

mod common;

use common::*;
use intercept_cni::backend::nftables::{render_text, Nftables, TABLE_NAME};
use intercept_cni::backend::Backend;
use intercept_cni::cni::error::{Code, Error, Result};
use intercept_cni::netns::PodNetns;
use intercept_cni::plan::{
    DnsCapture, Families, IfName, InboundPorts, InterceptPlan, InterceptionMode, OutboundCidrs,
    PortRange, Semantics, Tproxy,
};
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

const V4_ONLY: Families = Families {
    ipv4: true,
    ipv6: false,
};

fn ports(list: &[&str]) -> Vec<PortRange> {
    list.iter().map(|p| p.parse().unwrap()).collect()
}

fn nets(list: &[&str]) -> Vec<ipnetwork::IpNetwork> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

/// The plans with a golden file under `testdata/nftables/`.
fn golden_cases() -> Vec<(&'static str, InterceptPlan)> {
    let defaults = InterceptPlan::with_defaults(Families::BOTH);
    let v4_excludes = InterceptPlan {
        proxy_gids: vec![1338],
        inbound_ports: InboundPorts::AllExcept(ports(&["22", "8000-8100"])),
        // The IPv6 entries must vanish: the pod has no IPv6 address.
        exclude_inbound_sources: nets(&["192.168.7.0/24", "fd00:1::/64"]),
        exclude_outbound_ports: ports(&["53", "9000-9100"]),
        outbound_cidrs: OutboundCidrs::AllExcept(nets(&[
            "169.254.169.254/32",
            "10.96.0.0/12",
            "fd00:2::/64",
        ])),
        ..InterceptPlan::with_defaults(V4_ONLY)
    };
    let v4_includes = InterceptPlan {
        inbound_port: 16006,
        outbound_port: 16001,
        proxy_uids: vec![2000],
        proxy_gids: vec![2001],
        inbound_ports: InboundPorts::Only(ports(&["8080", "9000-9100"])),
        outbound_cidrs: OutboundCidrs::Only {
            include: nets(&["10.0.0.0/8", "172.16.0.0/12"]),
            exclude: nets(&["10.1.0.0/16"]),
        },
        ..InterceptPlan::with_defaults(V4_ONLY)
    };
    let no_inbound = InterceptPlan {
        inbound_ports: InboundPorts::None,
        outbound_cidrs: OutboundCidrs::Only {
            include: nets(&["10.0.0.0/8", "fd00::/8"]),
            exclude: nets(&["fd00:3::1/128"]),
        },
        ..InterceptPlan::with_defaults(Families::BOTH)
    };
    // What istio-cni installs for a default injected pod (cni/pkg/plugin/testdata/basic.txt.golden).
    let istio = InterceptPlan {
        semantics: Semantics::Istio,
        proxy_gids: vec![1337],
        inbound_ports: InboundPorts::AllExcept(ports(&["15020", "15021", "15090"])),
        exclude_outbound_ports: ports(&["15020"]),
        ..InterceptPlan::with_defaults(V4_ONLY)
    };
    // Every Istio knob at once, dual-stack.
    let istio_tuned = InterceptPlan {
        semantics: Semantics::Istio,
        proxy_uids: vec![1337, 1338],
        proxy_gids: vec![1337],
        inbound_ports: InboundPorts::Only(ports(&["8080", "9090"])),
        exclude_outbound_ports: ports(&["15020", "3306"]),
        include_outbound_ports: ports(&["32000"]),
        outbound_cidrs: OutboundCidrs::Only {
            include: nets(&["10.0.0.0/8", "fd00::/8"]),
            exclude: nets(&["10.96.0.0/12"]),
        },
        exclude_interfaces: vec!["eth9".parse::<IfName>().unwrap()],
        reroute_interfaces: vec!["net1".parse::<IfName>().unwrap()],
        ..InterceptPlan::with_defaults(Families::BOTH)
    };
    // What linkerd-cni installs for a default injected pod (IPv4 only, as its chart's default).
    let linkerd = InterceptPlan {
        semantics: Semantics::Linkerd,
        inbound_port: 4143,
        outbound_port: 4140,
        proxy_uids: vec![2102],
        inbound_ports: InboundPorts::AllExcept(ports(&["4190", "4191"])),
        exclude_inbound_sources: nets(&["10.244.0.0/16"]),
        ..InterceptPlan::with_defaults(V4_ONLY)
    };
    // Istio's modes (dns.txt.golden + invalid-drop.txt.golden; tproxy.txt.golden), dual-stack.
    let istio_dns_drop = InterceptPlan {
        dns: Some(DnsCapture::istio()),
        drop_invalid: true,
        ..istio_tuned.clone()
    };
    let istio_tproxy = InterceptPlan {
        semantics: Semantics::Istio,
        proxy_gids: vec![1337],
        inbound_ports: InboundPorts::AllExcept(ports(&["15020", "15021", "15090"])),
        exclude_outbound_ports: ports(&["15020"]),
        mode: InterceptionMode::Tproxy(Tproxy::istio()),
        ..InterceptPlan::with_defaults(Families::BOTH)
    };
    // Every mode on an IPv4-only plain pod: the other family passes the mode chains untouched.
    let ipv4_only_modes = InterceptPlan {
        dns: Some(DnsCapture::istio()),
        drop_invalid: true,
        mode: InterceptionMode::Tproxy(Tproxy::istio()),
        ..InterceptPlan::with_defaults(V4_ONLY)
    };
    vec![
        ("defaults_dual_stack", defaults),
        ("ipv4_only_modes", ipv4_only_modes),
        ("istio_dns_drop", istio_dns_drop),
        ("istio_tproxy", istio_tproxy),
        ("ipv4_only_excludes", v4_excludes),
        ("ipv4_only_includes", v4_includes),
        ("inbound_none", no_inbound),
        ("istio_default", istio),
        ("istio_tuned", istio_tuned),
        ("linkerd_default", linkerd),
    ]
}

fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/nftables")
        .join(format!("{name}.nft"))
}

/// Pure: no kernel involved. `UPDATE_GOLDEN=1` rewrites the files after a deliberate change.
#[test]
fn rendered_text_matches_golden_files() {
    for (name, plan) in golden_cases() {
        let text = render_text(&plan);
        let path = golden_path(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &text).unwrap();
        }
        let golden =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            text, golden,
            "{name}: rendering differs from the golden file"
        );
    }
}

fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    PodNetns::open(Path::new(&ns.path()))
        .expect("open netns")
        .expect("netns exists")
        .run(f)
}

fn nft(ns: &Netns, args: &[&str]) {
    let mut all = vec!["nft"];
    all.extend_from_slice(args);
    let out = ns.exec(&all);
    assert!(
        out.status.success(),
        "nft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn drift_of(ns: &Netns, plan: &InterceptPlan) -> Error {
    let err = in_ns(ns, || Nftables.check(plan)).expect_err("check passed on a damaged table");
    assert_eq!(err.code, Code::Drift, "{err}");
    err
}

/// The kernel's own reading of what we sent, printed by nft, is exactly our rendering: the
/// expressions mean what the text says.
#[test]
fn kernel_listing_matches_golden_files() {
    for (name, plan) in golden_cases() {
        let ns = Netns::new("nftgold");
        in_ns(&ns, || Nftables.apply(&plan)).expect("apply");
        let golden = std::fs::read_to_string(golden_path(name)).unwrap();
        assert_eq!(ns.nft_ruleset(), golden, "{name}: kernel listing differs");
        in_ns(&ns, || Nftables.check(&plan)).expect("check after apply");
    }
}

#[test]
fn apply_converges_and_check_passes() {
    let ns = Netns::new("nftconv");
    let plan = InterceptPlan::with_defaults(Families::BOTH);
    in_ns(&ns, || Nftables.apply(&plan)).expect("first apply");
    let first = ns.nft_ruleset();
    in_ns(&ns, || Nftables.apply(&plan)).expect("second apply");
    assert_eq!(
        ns.nft_ruleset(),
        first,
        "a repeated apply changed the ruleset"
    );
    in_ns(&ns, || Nftables.check(&plan)).expect("check");

    // A changed plan replaces the whole table, in place.
    let changed = InterceptPlan {
        outbound_port: 15101,
        ..plan.clone()
    };
    in_ns(&ns, || Nftables.apply(&changed)).expect("apply changed plan");
    assert_eq!(ns.nft_ruleset(), render_text(&changed));
    let err = drift_of(&ns, &plan);
    assert!(
        err.msg
            .contains("chain output rule 3 differs from `meta l4proto tcp redirect to :15001`"),
        "{err}"
    );
}

#[test]
fn check_names_what_drifted() {
    let ns = Netns::new("nftdrift");
    let plan = InterceptPlan::with_defaults(Families::BOTH);
    let reapply = || in_ns(&ns, || Nftables.apply(&plan)).expect("apply");
    let assert_drift = |what: &str| {
        let err = drift_of(&ns, &plan);
        assert!(err.msg.contains(what), "expected {what:?} in: {err}");
    };

    reapply();
    in_ns(&ns, || Nftables.check(&plan)).expect("check after apply");

    // One rule deleted by handle over netlink.
    in_ns(&ns, || {
        let chain = rustables::Chain::new(
            &rustables::Table::new(rustables::ProtocolFamily::Inet).with_name(TABLE_NAME),
        )
        .with_name("output");
        let rules = rustables::list_rules_for_chain(&chain).unwrap();
        let mut batch = rustables::Batch::new();
        batch.add(&rules[1], rustables::MsgType::Del);
        batch.send().unwrap();
        Ok(())
    })
    .unwrap();
    assert_drift("chain output rule 2 differs from `oifname \"lo\" return`");
    assert_drift("chain output rule 3 is missing");

    reapply();
    nft(&ns, &["flush", "chain", "inet", TABLE_NAME, "prerouting"]);
    assert_drift("chain prerouting rule 1 is missing (`meta l4proto tcp redirect to :15006`)");

    reapply();
    nft(
        &ns,
        &["add", "rule", "inet", TABLE_NAME, "output", "counter"],
    );
    assert_drift("chain output has 1 extra rule(s) after rule 3");

    reapply();
    nft(
        &ns,
        &["insert", "rule", "inet", TABLE_NAME, "output", "accept"],
    );
    assert_drift("chain output rule 1 differs from `meta skuid 1337 return`");

    reapply();
    nft(&ns, &["delete", "chain", "inet", TABLE_NAME, "prerouting"]);
    assert_drift("chain prerouting is missing");

    // rustables reads a drop policy back as accept: the kernel's own value is compared.
    for chain in ["output", "prerouting"] {
        reapply();
        nft(
            &ns,
            &[
                "add",
                "chain",
                "inet",
                TABLE_NAME,
                chain,
                "{ policy drop; }",
            ],
        );
        assert!(ns.nft_ruleset().contains("policy drop;"));
        assert_drift(&format!(
            "chain {chain} is not a nat chain at {chain} priority -100 with policy accept"
        ));
    }

    reapply();
    nft(&ns, &["add", "chain", "inet", TABLE_NAME, "extra"]);
    assert_drift("unexpected chain extra");

    reapply();
    nft(
        &ns,
        &["add", "table", "inet", TABLE_NAME, "{ flags dormant; }"],
    );
    assert_drift("the table is dormant");

    reapply();
    nft(&ns, &["delete", "table", "inet", TABLE_NAME]);
    assert_drift("table inet intercept-cni is missing");
}

#[test]
fn other_tables_are_never_touched() {
    let ns = Netns::new("nftother");
    // Someone else's tables, one even with our name in another family.
    let others = "table inet other {\n\tchain out {\n\t\ttype filter hook output priority filter; policy accept;\n\t\ttcp dport 1234 counter packets 0 bytes 0\n\t}\n}\ntable ip intercept-cni {\n\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\ttcp dport 4321 return\n\t}\n}\n";
    let script = std::env::temp_dir().join(format!("icni-other-{}.nft", std::process::id()));
    std::fs::write(&script, others).unwrap();
    nft(&ns, &["-f", script.to_str().unwrap()]);
    std::fs::remove_file(&script).unwrap();
    let before = ns.nft_ruleset();
    assert_eq!(before, others);

    let plan = InterceptPlan::with_defaults(Families::BOTH);
    // `installed` (read by `intercept-cni audit`) sees only our inet table.
    assert!(!in_ns(&ns, || Nftables.installed()).unwrap());
    in_ns(&ns, || Nftables.apply(&plan)).expect("apply");
    assert!(in_ns(&ns, || Nftables.installed()).unwrap());
    assert_eq!(ns.nft_ruleset(), format!("{others}{}", render_text(&plan)));
    in_ns(&ns, || Nftables.check(&plan)).expect("check ignores the ip table of the same name");
    in_ns(&ns, || Nftables.remove()).expect("remove");
    assert!(!in_ns(&ns, || Nftables.installed()).unwrap());
    assert_eq!(ns.nft_ruleset(), before);
    in_ns(&ns, || Nftables.remove()).expect("remove when already gone");
    assert_eq!(ns.nft_ruleset(), before);
    let err = drift_of(&ns, &plan);
    assert!(
        err.msg.contains("table inet intercept-cni is missing"),
        "{err}"
    );
}

#[test]
fn ipv4_only_plan_has_no_ipv6_rules() {
    let ns = Netns::new("nftv4");
    let plan = InterceptPlan::with_defaults(V4_ONLY);
    in_ns(&ns, || Nftables.apply(&plan)).expect("apply");
    let listed = ns.nft_ruleset();
    assert!(listed.contains("meta nfproto != ipv4 return"), "{listed}");
    assert!(
        !listed.contains("ip6") && !listed.contains("ipv6"),
        "{listed}"
    );
}

/// Drops every capability of the calling thread only (raw capset: per-thread by nature).
fn drop_thread_capabilities() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset failed");
}

/// `f` in `ns`, on a thread of its own that drops its capabilities once inside (it cannot leave
/// again; the test thread keeps its own).
fn in_ns_without_capabilities<T: Send>(
    ns: &Netns,
    f: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            in_ns(ns, || {
                drop_thread_capabilities();
                f()
            })
        })
        .join()
        .expect("no panic")
    })
}

#[test]
fn kernel_refusal_is_a_backend_error_naming_the_cause() {
    let ns = Netns::new("nftperm");
    let plan = InterceptPlan::with_defaults(Families::BOTH);
    let err = in_ns_without_capabilities(&ns, || Nftables.apply(&plan))
        .expect_err("apply without CAP_NET_ADMIN succeeded");
    assert_eq!(err.code, Code::Backend, "{err}");
    assert!(err.msg.contains("CAP_NET_ADMIN"), "{err}");
    let err = in_ns_without_capabilities(&ns, || Nftables.remove())
        .expect_err("remove without CAP_NET_ADMIN succeeded");
    assert_eq!(err.code, Code::Backend, "{err}");
    assert_eq!(
        ns.nft_ruleset(),
        "",
        "a refused batch left something behind"
    );
}

#[test]
fn live_default_plan_redirects_both_ways() {
    let lab = Lab::new();
    let plan = InterceptPlan::with_defaults(Families::BOTH);
    in_ns(&lab.pod, || Nftables.apply(&plan)).expect("apply");
    let lo4 = std::net::Ipv4Addr::LOCALHOST;
    let lo6 = Ipv6Addr::LOCALHOST;
    assert_lands(
        &lab.pod,
        v4(PEER_V4, 8080),
        None,
        &lab.pod,
        v4(lo4, OUTBOUND_PORT),
    );
    assert_lands(
        &lab.pod,
        v6(PEER_V6, 8080),
        None,
        &lab.pod,
        v6(lo6, OUTBOUND_PORT),
    );
    assert_lands(
        &lab.peer,
        v4(POD_V4, 9080),
        None,
        &lab.pod,
        v4(POD_V4, INBOUND_PORT),
    );
    assert_lands(
        &lab.peer,
        v6(POD_V6, 9080),
        None,
        &lab.pod,
        v6(POD_V6, INBOUND_PORT),
    );
    // The proxy's own connections go where they were sent.
    let proxy = Some((PROXY_UID, 1000));
    assert_lands(
        &lab.pod,
        v4(PEER_V4, 8080),
        proxy,
        &lab.peer,
        v4(PEER_V4, 8080),
    );
    assert_lands(
        &lab.pod,
        v6(PEER_V6, 8080),
        proxy,
        &lab.peer,
        v6(PEER_V6, 8080),
    );
    // Loopback traffic is never intercepted.
    assert_lands(&lab.pod, v4(lo4, 8080), None, &lab.pod, v4(lo4, 8080));

    in_ns(&lab.pod, || Nftables.remove()).expect("remove");
    assert_lands(
        &lab.pod,
        v4(PEER_V4, 8080),
        None,
        &lab.peer,
        v4(PEER_V4, 8080),
    );
    assert_lands(
        &lab.peer,
        v4(POD_V4, 9080),
        None,
        &lab.pod,
        v4(POD_V4, 9080),
    );
}

#[test]
fn live_exclusions_and_inclusions_bypass() {
    let lab = Lab::new();
    let plan = InterceptPlan {
        proxy_gids: vec![1338],
        inbound_ports: InboundPorts::Only(ports(&["9080"])),
        exclude_outbound_ports: ports(&["8000-8100"]),
        outbound_cidrs: OutboundCidrs::AllExcept(nets(&["fd00:248::1/128"])),
        ..InterceptPlan::with_defaults(Families::BOTH)
    };
    in_ns(&lab.pod, || Nftables.apply(&plan)).expect("apply");
    let lo4 = std::net::Ipv4Addr::LOCALHOST;
    // Excluded port range and excluded CIDR go straight out; others are intercepted.
    assert_lands(
        &lab.pod,
        v4(PEER_V4, 8080),
        None,
        &lab.peer,
        v4(PEER_V4, 8080),
    );
    assert_lands(
        &lab.pod,
        v6(PEER_V6, 9999),
        None,
        &lab.peer,
        v6(PEER_V6, 9999),
    );
    assert_lands(
        &lab.pod,
        v4(PEER_V4, 9999),
        None,
        &lab.pod,
        v4(lo4, OUTBOUND_PORT),
    );
    // The proxy GID bypasses like the UID.
    let proxy_group = Some((1000, 1338));
    assert_lands(
        &lab.pod,
        v4(PEER_V4, 9999),
        proxy_group,
        &lab.peer,
        v4(PEER_V4, 9999),
    );
    // Only the included inbound port is intercepted.
    assert_lands(
        &lab.peer,
        v4(POD_V4, 9080),
        None,
        &lab.pod,
        v4(POD_V4, INBOUND_PORT),
    );
    assert_lands(
        &lab.peer,
        v4(POD_V4, 9081),
        None,
        &lab.pod,
        v4(POD_V4, 9081),
    );
}

/// Sets are constant (bound to their rules), so a changed set means a changed table: someone
/// reloaded it with an element more or less. CHECK reads every element back.
#[test]
fn check_notices_a_set_element_added_or_removed() {
    let ns = Netns::new("nftsets");
    let plan = InterceptPlan {
        exclude_outbound_ports: ports(&["53", "9000-9100"]),
        outbound_cidrs: OutboundCidrs::AllExcept(nets(&[
            "169.254.169.254/32",
            "10.96.0.0/12",
            "fd00:2::/64",
            "fd00:3::/64",
        ])),
        ..InterceptPlan::with_defaults(Families::BOTH)
    };
    in_ns(&ns, || Nftables.apply(&plan)).expect("apply");
    in_ns(&ns, || Nftables.check(&plan)).expect("check after apply");
    let installed = ns.nft_ruleset();
    let reload = |text: String| {
        nft(&ns, &["delete", "table", "inet", TABLE_NAME]);
        let script = std::env::temp_dir().join(format!("icni-sets-{}.nft", std::process::id()));
        std::fs::write(&script, text).unwrap();
        nft(&ns, &["-f", script.to_str().unwrap()]);
        std::fs::remove_file(&script).unwrap();
    };
    let assert_drift = |what: &str| {
        let err = drift_of(&ns, &plan);
        assert!(err.msg.contains(what), "expected {what:?} in: {err}");
    };

    reload(installed.replace("169.254.169.254", "169.254.169.254, 192.0.2.1"));
    assert_drift("set out_excluded_v4 has extra 192.0.2.1");
    reload(installed.replace("10.96.0.0/12, ", ""));
    assert_drift("set out_excluded_v4 lacks 10.96.0.0/12");
    reload(installed.replace("53, 9000-9100", "53, 9000-9101"));
    assert_drift("set out_excluded_ports lacks 9000-9100");
    reload(installed.replace(
        "\tchain prerouting {",
        "\tset other_v6 {\n\t\ttype ipv6_addr\n\t}\n\n\tchain prerouting {",
    ));
    assert_drift("unexpected set other_v6");
}

/// CHECK warns (and passes) about other tables that take a connection past ours: a nat chain
/// of another table on our hooks at an earlier priority, and a notrack rule. ADD still works
/// and the pod is intercepted; CHECK fails nothing for them.
#[test]
fn check_warns_about_other_tables_that_bypass_ours() {
    let lab = Lab::new();
    let conf = lab.config("1.0.0", serde_json::json!({"backend": "nftables"}));
    lab.cni("ADD", &conf).ok();
    let quiet = lab.cni("CHECK", &conf).ok();
    assert!(!quiet.stderr.contains("WARN"), "{}", quiet.stderr);
    let others = "table ip early {\n\tchain out {\n\t\ttype nat hook output priority -150; policy accept;\n\t\ttcp dport 9 accept\n\t}\n}\ntable inet untrack {\n\tchain pre {\n\t\ttype filter hook prerouting priority raw; policy accept;\n\t\ttcp dport 9 notrack\n\t}\n}\ntable ip late {\n\tchain out {\n\t\ttype nat hook output priority 100; policy accept;\n\t\ttcp dport 9 accept\n\t}\n}\n";
    let script = std::env::temp_dir().join(format!("icni-bypass-{}.nft", std::process::id()));
    std::fs::write(&script, others).unwrap();
    nft(&lab.pod, &["-f", script.to_str().unwrap()]);
    std::fs::remove_file(&script).unwrap();
    let warned = lab.cni("CHECK", &conf).ok();
    for needle in [
        "table ip early chain out (nat hook output priority -150) runs at or before",
        "table inet untrack chain pre (filter hook prerouting priority -300) turns connection tracking off",
    ] {
        assert!(warned.stderr.contains(needle), "{needle:?} not in {}", warned.stderr);
    }
    assert!(
        !warned.stderr.contains("table ip late"),
        "{}",
        warned.stderr
    );
    lab.outbound_to_proxy(v4(PEER_V4, 8080), None, OUTBOUND_PORT);
    lab.cni("DEL", &conf).ok();
}
