//! The landing matrix (issue 14): for a pod of each mesh, a table of probes (family, source
//! address, UID/GID, the interface the connection takes, destination and port) and where each
//! must land: the proxy's inbound port, its outbound port, the application (the listener at the
//! destination itself) or nowhere (refused). Every table runs with live connections through the
//! real binary on nftables, iptables-legacy and iptables-nft.
//!
//! The expectations are the meshes' own, from their coded rules: istio/istio
//! `tools/istio-iptables/pkg/capture/run.go` (expected output in
//! `cni/pkg/plugin/testdata/basic.txt.golden`), linkerd/linkerd2-proxy-init
//! `pkg/iptables/iptables.go`. Each row names the rule that decides it.

mod common;

use common::*;
use nix::sys::socket::{
    bind, connect as sys_connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType,
    SockaddrStorage,
};
use nix::sys::time::TimeVal;
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Where a connection ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lands {
    /// The proxy's inbound port (in the pod).
    Inbound,
    /// The proxy's outbound port (in the pod).
    Outbound,
    /// The listener at the destination itself.
    App,
    /// Nothing accepted it.
    Refused,
}
use Lands::*;

/// Which side makes the connection.
#[derive(Debug, Clone, Copy)]
enum From {
    Pod,
    Peer,
}

/// One row of a table.
struct Probe {
    from: From,
    /// Source address to bind (`None`: the kernel's choice).
    source: Option<IpAddr>,
    user: User,
    /// `lo` or `eth0`, as the route to `to` makes it: documentation, checked against `to`.
    via: &'static str,
    to: SocketAddr,
    lands: Lands,
    /// The mesh rule that decides it.
    why: &'static str,
}

const ROOT: User = None;
const ISTIO_PROXY: User = Some((1337, 1337));
const LINKERD_PROXY: User = Some((2102, 2102));
const APP_USER: User = Some((1000, 1000));
const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
const PASSTHROUGH: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

fn row(
    from: From,
    user: User,
    via: &'static str,
    to: SocketAddr,
    lands: Lands,
    why: &'static str,
) -> Probe {
    Probe {
        from,
        source: None,
        user,
        via,
        to,
        lands,
        why,
    }
}

fn from_source(
    source: Ipv4Addr,
    user: User,
    to: SocketAddr,
    lands: Lands,
    why: &'static str,
) -> Probe {
    Probe {
        from: From::Pod,
        source: Some(IpAddr::V4(source)),
        user,
        via: "lo",
        to,
        lands,
        why,
    }
}

/// Whether `to` is one of the pod's own addresses (or loopback): reached through lo from it.
fn in_pod(to: &SocketAddr) -> bool {
    to.ip().is_loopback() || to.ip() == IpAddr::V4(POD_V4) || to.ip() == IpAddr::V6(POD_V6)
}

/// Listens on `addrs` inside `ns` until one accepts (reporting `what`) or `stop` is set.
fn listen(
    ns: &Netns,
    addrs: Vec<(SocketAddr, Lands)>,
    tx: mpsc::Sender<Lands>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = ns.run(move || {
        let listeners: Vec<(TcpListener, Lands)> = addrs
            .into_iter()
            .map(|(addr, what)| {
                // A port the previous probe's connections still hold frees up shortly.
                let started = Instant::now();
                let l = loop {
                    match TcpListener::bind(addr) {
                        Ok(l) => break l,
                        Err(e) if started.elapsed() > Duration::from_secs(5) => {
                            panic!("bind {addr}: {e}")
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                };
                l.set_nonblocking(true).unwrap();
                (l, what)
            })
            .collect();
        ready_tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            for (l, what) in &listeners {
                if let Ok((stream, _)) = l.accept() {
                    let _ = tx.send(*what);
                    drop(stream);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("listeners did not start");
    handle
}

/// Connects from the current thread (already in the right netns) as `user`, from `source`.
fn dial(source: Option<IpAddr>, user: User, to: SocketAddr) -> Option<OwnedFd> {
    if let Some((uid, gid)) = user {
        // Raw syscalls: they change only this thread's credentials.
        let rc = unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) };
        assert_eq!(rc, 0, "setresgid({gid})");
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
        assert_eq!(rc, 0, "setresuid({uid})");
    }
    let family = match to {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    // Bounds connect(): a dropped SYN must not stall the suite.
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(3, 0)).unwrap();
    if let Some(src) = source {
        bind(
            fd.as_raw_fd(),
            &SockaddrStorage::from(SocketAddr::new(src, 0)),
        )
        .unwrap();
    }
    sys_connect(fd.as_raw_fd(), &SockaddrStorage::from(to))
        .ok()
        .map(|_| fd)
}

/// Runs one probe and says where it landed.
fn probe(lab: &Lab, proxy: (u16, u16), p: &Probe) -> Lands {
    let (inbound, outbound) = proxy;
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    // The proxy listens on every address of the pod, both families (a dual-stack socket).
    let mut pod_addrs = vec![
        (SocketAddr::new("::".parse().unwrap(), inbound), Inbound),
        (SocketAddr::new("::".parse().unwrap(), outbound), Outbound),
    ];
    let mut peer_addrs = Vec::new();
    let proxy_port = p.to.port() == inbound || p.to.port() == outbound;
    match (in_pod(&p.to), proxy_port) {
        (true, false) => pod_addrs.push((p.to, App)),
        (true, true) => {} // the proxy's own listener is the application there
        (false, _) => peer_addrs.push((p.to, App)),
    }
    let mut threads = vec![listen(&lab.pod, pod_addrs, tx.clone(), stop.clone())];
    if !peer_addrs.is_empty() {
        threads.push(listen(&lab.peer, peer_addrs, tx.clone(), stop.clone()));
    }
    let ns = match p.from {
        From::Pod => &lab.pod,
        From::Peer => &lab.peer,
    };
    let (source, user, to) = (p.source, p.user, p.to);
    let connected = ns.run(move || dial(source, user, to)).join().unwrap();
    let landed = match connected {
        Some(_) => rx.recv_timeout(Duration::from_secs(3)).unwrap_or(Refused),
        None => rx
            .recv_timeout(Duration::from_millis(100))
            .unwrap_or(Refused),
    };
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    landed
}

/// Runs `table` against a pod set up by `conf`, then checks CHECK passes and DEL leaves nothing.
fn run_table(lab: &Lab, conf: &Value, proxy: (u16, u16), table: &[Probe]) {
    lab.cni("ADD", conf).ok();
    lab.cni("CHECK", conf).ok();
    let mut wrong = Vec::new();
    for p in table {
        let via = match p.from {
            From::Pod if in_pod(&p.to) => "lo",
            _ => "eth0",
        };
        assert_eq!(
            p.via, via,
            "row {:?} {}: wrong interface column",
            p.to, p.why
        );
        let got = probe(lab, proxy, p);
        if got != p.lands {
            wrong.push(format!(
                "{:?} as {:?} from {:?} via {} to {}: landed {got:?}, the mesh lands it {:?} ({})",
                p.from, p.user, p.source, p.via, p.to, p.lands, p.why
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    lab.cni("DEL", conf).ok();
    // (iptables-legacy keeps an emptied nat table once it has been loaded.)
    let after = lab.pod.firewall_state();
    assert!(
        !after.contains("ICNI_") && !after.contains("intercept-cni"),
        "DEL left rules behind: {after}"
    );
}

fn conf(lab: &Lab, backend: Value, keys: Value, annotations: Value) -> Value {
    let mut conf = lab.config("1.0.0", backend);
    conf.as_object_mut().unwrap().remove("podSelection");
    for (k, v) in keys.as_object().unwrap() {
        conf[k] = v.clone();
    }
    conf["runtimeConfig"] = json!({ "io.kubernetes.cri.pod-annotations": annotations });
    conf
}

const ISTIO_STATUS: &str = r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":[],"imagePullSecrets":null,"revision":"default"}"#;

fn istio_pod(extra: Value) -> Value {
    let mut a = json!({ "sidecar.istio.io/status": ISTIO_STATUS });
    for (k, v) in extra.as_object().unwrap() {
        a[k] = v.clone();
    }
    a
}

/// A default Istio sidecar pod, as istio-cni programs it (basic.txt.golden).
fn istio_default(backend: Value) {
    let lab = Lab::new();
    let table = [
        row(
            From::Peer,
            ROOT,
            "eth0",
            v4(POD_V4, 8080),
            Inbound,
            "ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        ),
        row(
            From::Peer,
            ROOT,
            "eth0",
            v4(POD_V4, 15008),
            App,
            "ISTIO_INBOUND --dport 15008 RETURN (tunnel)",
        ),
        row(
            From::Peer,
            ROOT,
            "eth0",
            v4(POD_V4, 15020),
            App,
            "excludeInboundPorts 15020,15021,15090 always",
        ),
        row(
            From::Peer,
            ROOT,
            "eth0",
            v4(POD_V4, 15021),
            App,
            "excludeInboundPorts 15020,15021,15090 always",
        ),
        row(
            From::Peer,
            ROOT,
            "eth0",
            v4(POD_V4, 15001),
            Inbound,
            "no RETURN for the outbound port",
        ),
        row(
            From::Pod,
            APP_USER,
            "eth0",
            v4(PEER_V4, 8080),
            Outbound,
            "ISTIO_OUTPUT -j ISTIO_REDIRECT",
        ),
        row(
            From::Pod,
            ROOT,
            "eth0",
            v4(PEER_V4, 8080),
            Outbound,
            "ISTIO_OUTPUT -j ISTIO_REDIRECT",
        ),
        row(
            From::Pod,
            APP_USER,
            "eth0",
            v4(PEER_V4, 15020),
            App,
            "excludeOutboundPorts defaults to 15020",
        ),
        row(
            From::Pod,
            APP_USER,
            "lo",
            v4(POD_V4, 8080),
            App,
            "-o lo ! --uid-owner 1337 RETURN",
        ),
        row(
            From::Pod,
            APP_USER,
            "lo",
            v4(LOCALHOST, 8080),
            App,
            "-o lo ! --uid-owner 1337 RETURN",
        ),
        row(
            From::Pod,
            ISTIO_PROXY,
            "lo",
            v4(POD_V4, 8080),
            Inbound,
            "-o lo ! -d 127.0.0.1 --uid-owner 1337 -j ISTIO_IN_REDIRECT",
        ),
        row(
            From::Pod,
            ISTIO_PROXY,
            "lo",
            v4(POD_V4, 15008),
            App,
            "... ! --dport 15008 ...",
        ),
        row(
            From::Pod,
            ISTIO_PROXY,
            "lo",
            v4(LOCALHOST, 8080),
            App,
            "--uid-owner 1337 RETURN",
        ),
        row(
            From::Pod,
            ISTIO_PROXY,
            "eth0",
            v4(PEER_V4, 8080),
            App,
            "--uid-owner 1337 RETURN",
        ),
        row(
            From::Pod,
            Some((4000, 1337)),
            "eth0",
            v4(PEER_V4, 8080),
            App,
            "--gid-owner 1337 RETURN",
        ),
        row(
            From::Pod,
            Some((4000, 1337)),
            "lo",
            v4(POD_V4, 8080),
            App,
            "-o lo ! --uid-owner 1337 RETURN, before the GID's lo redirect",
        ),
        from_source(
            PASSTHROUGH,
            ISTIO_PROXY,
            v4(POD_V4, 8080),
            App,
            "-o lo -s 127.0.0.6/32 RETURN (inbound passthrough)",
        ),
        from_source(
            LOCALHOST,
            ISTIO_PROXY,
            v4(PASSTHROUGH, 15002),
            Inbound,
            "istio-validation probe: ISTIO_IN_REDIRECT",
        ),
        // Not IPv6-first and no dual-stack: istio-cni programs IPv4 only.
        row(
            From::Peer,
            ROOT,
            "eth0",
            v6(POD_V6, 8080),
            App,
            "no ip6tables rules without dual-stack",
        ),
        row(
            From::Pod,
            APP_USER,
            "eth0",
            v6(PEER_V6, 8080),
            App,
            "no ip6tables rules without dual-stack",
        ),
    ];
    let conf = conf(&lab, backend, json!({}), istio_pod(json!({})));
    run_table(&lab, &conf, (INBOUND_PORT, OUTBOUND_PORT), &table);
}

/// Istio's knobs: loopback in includeOutboundIPRanges, includeOutboundPorts, dual-stack.
fn istio_tuned(backend: Value) {
    let lab = Lab::new();
    let table = [
        row(
            From::Pod,
            APP_USER,
            "lo",
            v4(Ipv4Addr::new(127, 0, 0, 2), 8080),
            Outbound,
            "loopback included: no lo RETURN, -d 127.0.0.0/8 -j ISTIO_REDIRECT",
        ),
        row(
            From::Pod,
            APP_USER,
            "lo",
            v4(LOCALHOST, 8080),
            App,
            "-d 127.0.0.1/32 RETURN",
        ),
        row(
            From::Pod,
            APP_USER,
            "eth0",
            v4(PEER_V4, 8080),
            App,
            "outside includeOutboundIPRanges",
        ),
        row(
            From::Pod,
            APP_USER,
            "eth0",
            v4(PEER_V4, 9999),
            Outbound,
            "includeOutboundPorts -j ISTIO_REDIRECT",
        ),
        row(
            From::Peer,
            ROOT,
            "eth0",
            v6(POD_V6, 8080),
            Inbound,
            "dual-stack: ip6tables ISTIO_IN_REDIRECT",
        ),
        row(
            From::Pod,
            APP_USER,
            "eth0",
            v6(PEER_V6, 9999),
            Outbound,
            "dual-stack: includeOutboundPorts",
        ),
        row(
            From::Pod,
            ISTIO_PROXY,
            "lo",
            v6(POD_V6, 8080),
            Inbound,
            "-o lo ! -d ::1 --uid-owner 1337 -j ISTIO_IN_REDIRECT",
        ),
        row(
            From::Pod,
            APP_USER,
            "lo",
            v6(POD_V6, 8080),
            Outbound,
            "loopback included: no lo RETURN; the pod's address is in the list",
        ),
    ];
    let annotations = istio_pod(json!({
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "127.0.0.0/8,fd00:248::2/128",
        "traffic.sidecar.istio.io/includeOutboundPorts": "9999",
    }));
    let conf = conf(&lab, backend, json!({"dualStack": true}), annotations);
    run_table(&lab, &conf, (INBOUND_PORT, OUTBOUND_PORT), &table);
}

/// An IPv6-first pod: istio-cni programs both families without dual-stack (getLocalIP).
fn istio_ipv6_first(backend: Value) {
    let lab = Lab::new();
    let table = [
        row(
            From::Peer,
            ROOT,
            "eth0",
            v6(POD_V6, 8080),
            Inbound,
            "ip6tables ISTIO_IN_REDIRECT",
        ),
        row(
            From::Peer,
            ROOT,
            "eth0",
            v4(POD_V4, 8080),
            Inbound,
            "iptables ISTIO_IN_REDIRECT",
        ),
        row(
            From::Pod,
            APP_USER,
            "eth0",
            v6(PEER_V6, 8080),
            Outbound,
            "ip6tables ISTIO_REDIRECT",
        ),
        row(
            From::Pod,
            ISTIO_PROXY,
            "lo",
            v6(POD_V6, 8080),
            Inbound,
            "-o lo ! -d ::1 --uid-owner 1337 -j ISTIO_IN_REDIRECT",
        ),
        row(
            From::Pod,
            APP_USER,
            "lo",
            v6(POD_V6, 8080),
            App,
            "-o lo ! --uid-owner 1337 RETURN",
        ),
    ];
    let mut conf = conf(&lab, backend, json!({}), istio_pod(json!({})));
    let ips = conf["prevResult"]["ips"].as_array_mut().unwrap();
    ips.reverse();
    run_table(&lab, &conf, (INBOUND_PORT, OUTBOUND_PORT), &table);
}

/// excludeInterfaces: nothing through the pod's eth0 is redirected, either way.
fn istio_excluded_interface(backend: Value) {
    let lab = Lab::new();
    let table = [
        row(
            From::Peer,
            ROOT,
            "eth0",
            v4(POD_V4, 8080),
            App,
            "PREROUTING -i eth0 RETURN",
        ),
        row(
            From::Pod,
            APP_USER,
            "eth0",
            v4(PEER_V4, 8080),
            App,
            "OUTPUT -o eth0 RETURN",
        ),
        row(
            From::Pod,
            ISTIO_PROXY,
            "lo",
            v4(POD_V4, 8080),
            Inbound,
            "lo is not excluded",
        ),
    ];
    let annotations = istio_pod(json!({"traffic.sidecar.istio.io/excludeInterfaces": "eth0"}));
    let conf = conf(&lab, backend, json!({}), annotations);
    run_table(&lab, &conf, (INBOUND_PORT, OUTBOUND_PORT), &table);
}

/// DNS capture (dns.txt.golden): the lo rules spare TCP 53 for the DNS rules, but only the UID
/// rule spares it from the inbound port; a GID member's query to a resolver on lo meets the GID's
/// `ISTIO_IN_REDIRECT` rule.
fn istio_dns(backend: Value) {
    let lab = Lab::new();
    let resolver = Ipv4Addr::new(127, 0, 0, 53);
    let table = [
        row(
            From::Pod,
            Some((4000, 1337)),
            "lo",
            v4(resolver, 53),
            Inbound,
            "-o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 --gid-owner 1337 -j ISTIO_IN_REDIRECT",
        ),
        row(
            From::Pod,
            ISTIO_PROXY,
            "lo",
            v4(resolver, 53),
            App,
            "! --dports 53,15008 --uid-owner 1337, then --uid-owner 1337 RETURN",
        ),
        row(
            From::Pod,
            Some((4000, 1337)),
            "lo",
            v4(POD_V4, 8080),
            App,
            "-o lo -p tcp ! --dport 53 ! --uid-owner 1337 RETURN comes first",
        ),
        row(
            From::Pod,
            APP_USER,
            "lo",
            v4(POD_V4, 8080),
            App,
            "-o lo -p tcp ! --dport 53 ! --uid-owner 1337 RETURN",
        ),
    ];
    let conf = conf(
        &lab,
        backend,
        json!({"dnsCapture": true}),
        istio_pod(json!({})),
    );
    run_table(&lab, &conf, (INBOUND_PORT, OUTBOUND_PORT), &table);
}

/// A KubeVirt pod: a VM behind `net1` in the pod. What it sends arrives on net1 and goes to the
/// outbound port (istio-iptables' `-I PREROUTING 1 -i net1 -j ISTIO_REDIRECT`), whatever its
/// destination, while the pod's own traffic keeps the usual rules.
fn istio_reroute_interface(backend: Value) {
    let lab = Lab::new();
    let vm = Netns::new("vm");
    lab.pod.ip(&[
        "link", "add", "net1", "type", "veth", "peer", "name", "vmside",
    ]);
    lab.pod.ip(&["link", "set", "vmside", "netns", &vm.name]);
    lab.pod.ip(&["addr", "add", "10.249.0.1/24", "dev", "net1"]);
    lab.pod.ip(&["link", "set", "net1", "up"]);
    vm.ip(&["addr", "add", "10.249.0.2/24", "dev", "vmside"]);
    vm.ip(&["link", "set", "vmside", "up"]);
    vm.ip(&["route", "add", "default", "via", "10.249.0.1"]);
    let annotations = istio_pod(json!({"istio.io/reroute-virtual-interfaces": "net1"}));
    let conf = conf(&lab, backend, json!({}), annotations);
    lab.cni("ADD", &conf).ok();
    lab.cni("CHECK", &conf).ok();
    for (to, want) in [
        (v4(PEER_V4, 8080), Outbound),
        (v4(Ipv4Addr::new(192, 0, 2, 10), 443), Outbound),
    ] {
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let addrs = vec![
            (
                SocketAddr::new("::".parse().unwrap(), INBOUND_PORT),
                Inbound,
            ),
            (
                SocketAddr::new("::".parse().unwrap(), OUTBOUND_PORT),
                Outbound,
            ),
        ];
        let listener = listen(&lab.pod, addrs, tx, stop.clone());
        let connected = vm.run(move || dial(None, None, to)).join().unwrap();
        let got = match connected {
            Some(_) => rx.recv_timeout(Duration::from_secs(3)).unwrap_or(Refused),
            None => Refused,
        };
        stop.store(true, Ordering::SeqCst);
        listener.join().unwrap();
        assert_eq!(got, want, "VM behind net1 to {to}");
    }
    let p = row(
        From::Peer,
        ROOT,
        "eth0",
        v4(POD_V4, 8080),
        Inbound,
        "eth0 is not rerouted",
    );
    assert_eq!(probe(&lab, (INBOUND_PORT, OUTBOUND_PORT), &p), Inbound);
    lab.cni("DEL", &conf).ok();
}

/// Pods istio-cni leaves alone: a gateway, and a pod that runs istio-init itself.
fn istio_skipped_pods(backend: Value) {
    let lab = Lab::new();
    let before = lab.pod.firewall_state();
    for annotations in [
        istio_pod(json!({"inject.istio.io/templates": "gateway"})),
        json!({"sidecar.istio.io/status": r#"{"initContainers":["istio-init"],"containers":["istio-proxy"]}"#}),
    ] {
        let conf = conf(&lab, backend.clone(), json!({}), annotations);
        lab.cni("ADD", &conf).ok();
        assert_eq!(lab.pod.firewall_state(), before, "a skipped pod got rules");
        let p = row(
            From::Pod,
            APP_USER,
            "eth0",
            v4(PEER_V4, 8080),
            App,
            "not intercepted",
        );
        assert_eq!(probe(&lab, (INBOUND_PORT, OUTBOUND_PORT), &p), App);
        lab.cni("DEL", &conf).ok();
    }
}

/// A default Linkerd pod, as linkerd-cni programs it (IPv4 only, its chart's default).
fn linkerd_default(backend: Value) {
    let lab = Lab::new();
    let table = [
        row(
            From::Peer,
            ROOT,
            "eth0",
            v4(POD_V4, 8080),
            Inbound,
            "PROXY_INIT_REDIRECT -p tcp REDIRECT 4143",
        ),
        row(
            From::Peer,
            ROOT,
            "eth0",
            v4(POD_V4, 4140),
            Inbound,
            "no RETURN for the outbound port",
        ),
        row(
            From::Peer,
            ROOT,
            "eth0",
            v4(POD_V4, 4191),
            App,
            "inbound-ports-to-ignore 4191,4190",
        ),
        row(
            From::Peer,
            ROOT,
            "eth0",
            v4(POD_V4, 9080),
            App,
            "skip-inbound-ports appended",
        ),
        row(
            From::Pod,
            APP_USER,
            "eth0",
            v4(PEER_V4, 8080),
            Outbound,
            "PROXY_INIT_OUTPUT -p tcp REDIRECT 4140",
        ),
        row(
            From::Pod,
            APP_USER,
            "eth0",
            v4(PEER_V4, 3306),
            App,
            "skip-outbound-ports",
        ),
        row(
            From::Pod,
            APP_USER,
            "lo",
            v4(POD_V4, 8080),
            App,
            "-o lo RETURN",
        ),
        row(
            From::Pod,
            LINKERD_PROXY,
            "lo",
            v4(POD_V4, 8080),
            App,
            "--uid-owner 2102 RETURN",
        ),
        row(
            From::Pod,
            LINKERD_PROXY,
            "eth0",
            v4(PEER_V4, 8080),
            App,
            "--uid-owner 2102 RETURN",
        ),
        row(
            From::Peer,
            ROOT,
            "eth0",
            v6(POD_V6, 8080),
            App,
            "ipv6 off by default",
        ),
    ];
    let annotations = json!({
        "linkerd.io/proxy-version": "stable-2.14.10",
        "config.linkerd.io/skip-inbound-ports": "9080",
        "config.linkerd.io/skip-outbound-ports": "3306",
    });
    let conf = conf(&lab, backend, json!({}), annotations);
    run_table(&lab, &conf, (4143, 4140), &table);
}

/// A plain `intercept-cni.io/` pod: the safe semantics (README, "Pod selection").
fn own_pod(backend: Value) {
    let lab = Lab::new();
    let table = [
        row(
            From::Peer,
            ROOT,
            "eth0",
            v4(POD_V4, 8080),
            Inbound,
            "everything arriving",
        ),
        row(
            From::Peer,
            ROOT,
            "eth0",
            v4(POD_V4, OUTBOUND_PORT),
            Inbound,
            "a peer dialling the outbound port",
        ),
        row(
            From::Peer,
            ROOT,
            "eth0",
            v6(POD_V6, 8080),
            Inbound,
            "both of the pod's families",
        ),
        row(
            From::Pod,
            APP_USER,
            "eth0",
            v4(PEER_V4, 8080),
            Outbound,
            "everything leaving",
        ),
        row(
            From::Pod,
            APP_USER,
            "eth0",
            v6(PEER_V6, 8080),
            Outbound,
            "everything leaving",
        ),
        row(
            From::Pod,
            APP_USER,
            "lo",
            v4(POD_V4, 8080),
            App,
            "nothing through lo",
        ),
        row(
            From::Pod,
            ISTIO_PROXY,
            "lo",
            v4(POD_V4, 8080),
            App,
            "nothing the proxy sends",
        ),
        row(
            From::Pod,
            ISTIO_PROXY,
            "eth0",
            v4(PEER_V4, 8080),
            App,
            "nothing the proxy sends",
        ),
        row(
            From::Pod,
            Some((1000, 1338)),
            "eth0",
            v4(PEER_V4, 8080),
            App,
            "the second proxy GID",
        ),
    ];
    let annotations = json!({
        "intercept-cni.io/enabled": "true",
        "intercept-cni.io/proxy-gid": "1337,1338",
    });
    let conf = conf(&lab, backend, json!({}), annotations);
    run_table(&lab, &conf, (INBOUND_PORT, OUTBOUND_PORT), &table);
}

macro_rules! per_backend {
    ($($backend:ident => $conf:expr;)*) => {$(
        mod $backend {
            use super::*;
            fn b() -> Value { $conf }
            #[test] fn istio_default() { super::istio_default(b()) }
            #[test] fn istio_tuned() { super::istio_tuned(b()) }
            #[test] fn istio_ipv6_first() { super::istio_ipv6_first(b()) }
            #[test] fn istio_reroute_interface() { super::istio_reroute_interface(b()) }
            #[test] fn istio_excluded_interface() { super::istio_excluded_interface(b()) }
            #[test] fn istio_skipped_pods() { super::istio_skipped_pods(b()) }
            #[test] fn istio_dns() { super::istio_dns(b()) }
            #[test] fn linkerd_default() { super::linkerd_default(b()) }
            #[test] fn own_pod() { super::own_pod(b()) }
        }
    )*};
}

per_backend! {
    nftables => json!({"backend": "nftables"});
    iptables_legacy => json!({"backend": "iptables", "iptablesMode": "legacy"});
    iptables_nft => json!({"backend": "iptables", "iptablesMode": "nft"});
}
