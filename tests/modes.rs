//! The modes beyond TCP REDIRECT, live, on every backend: DNS capture (UDP and TCP 53 land on
//! the agent's port, the proxy's own queries go out), TPROXY (inbound reaches a transparent
//! listener with the peer's address and the original destination kept, the proxy's marked
//! traffic goes past), INVALID drop (CHECK sees it go), and DEL leaving nothing behind.

mod common;

use common::*;
use serde_json::{json, Value};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::FromRawFd;
use std::sync::mpsc;
use std::time::Duration;

const DNS_PORT: u16 = 15053;
const WAIT: Duration = Duration::from_secs(3);

fn backends() -> [(&'static str, Value); 3] {
    [
        ("nftables", json!({"backend": "nftables"})),
        (
            "iptables-nft",
            json!({"backend": "iptables", "iptablesMode": "nft"}),
        ),
        (
            "iptables-legacy",
            json!({"backend": "iptables", "iptablesMode": "legacy"}),
        ),
    ]
}

fn with(backend: &Value, keys: Value) -> Value {
    let mut conf = backend.clone();
    for (k, v) in keys.as_object().unwrap() {
        conf[k] = v.clone();
    }
    conf
}

/// Drops to `user`'s credentials on this thread only (sockets made after belong to it).
fn become_user(user: User) {
    if let Some((uid, gid)) = user {
        let rc = unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) };
        assert_eq!(rc, 0, "setresgid");
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
        assert_eq!(rc, 0, "setresuid");
    }
}

/// A UDP server in `ns` (as `user`) answering one datagram with "answer"; returns whom it heard.
fn udp_server(
    ns: &Netns,
    at: SocketAddr,
    user: User,
) -> std::thread::JoinHandle<Option<SocketAddr>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = ns.run(move || {
        become_user(user);
        let sock = UdpSocket::bind(at).expect("bind the UDP server");
        sock.set_read_timeout(Some(WAIT)).unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 512];
        let (_, from) = sock.recv_from(&mut buf).ok()?;
        sock.send_to(b"answer", from).ok()?;
        Some(from)
    });
    ready_rx
        .recv_timeout(WAIT)
        .expect("UDP server did not start");
    handle
}

/// Sends a query from `ns` as `user` to `to`; returns who answered.
fn udp_query(ns: &Netns, to: SocketAddr, user: User) -> Option<SocketAddr> {
    ns.run(move || {
        become_user(user);
        let any: SocketAddr = match to {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
            SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
        };
        let sock = UdpSocket::bind(any).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        sock.send_to(b"query", to).ok()?;
        let mut buf = [0u8; 512];
        let (n, from) = sock.recv_from(&mut buf).ok()?;
        assert_eq!(&buf[..n], b"answer");
        Some(from)
    })
    .join()
    .unwrap()
}

fn loopback(to: SocketAddr) -> IpAddr {
    match to {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

const PROXY: User = Some((PROXY_UID, PROXY_UID));

#[test]
fn dns_capture_lands_on_the_agent_and_the_proxy_goes_out() {
    for (name, backend) in backends() {
        let lab = Lab::new();
        let conf = lab.config("1.0.0", with(&backend, json!({"dnsCapture": true})));
        lab.cni("ADD", &conf).ok();
        lab.cni("CHECK", &conf).ok();
        for server in [v4(PEER_V4, 53), v6(PEER_V6, 53)] {
            // The app's query reaches the agent (which runs as the proxy's user) and the answer
            // comes back from the address and port 53 it asked.
            let agent = udp_server(&lab.pod, SocketAddr::new(loopback(server), DNS_PORT), PROXY);
            let answered = udp_query(&lab.pod, server, None);
            assert!(
                agent.join().unwrap().is_some(),
                "{name}: {server} never reached the agent"
            );
            assert_eq!(answered, Some(server), "{name}: answer to {server}");
            // The proxy's own query goes to the server itself.
            let upstream = udp_server(&lab.peer, server, None);
            assert_eq!(udp_query(&lab.pod, server, PROXY), Some(server), "{name}");
            assert!(
                upstream.join().unwrap().is_some(),
                "{name}: proxy's query to {server}"
            );
            // TCP 53 too, with its original destination.
            lab.outbound_to_proxy(server, None, DNS_PORT);
            lab.outbound_direct(server, PROXY);
        }
        // Other ports are untouched by DNS capture.
        lab.outbound_to_proxy(v4(PEER_V4, 80), None, OUTBOUND_PORT);
        // CHECK sees the conntrack zones go; ADD puts them back.
        let flush: &[&str] = match name {
            "nftables" => &[
                "nft",
                "flush",
                "chain",
                "inet",
                "intercept-cni",
                "raw-output",
            ],
            "iptables-nft" => &["iptables-nft", "-t", "raw", "-F", "ICNI_DNS_OUT"],
            _ => &["iptables-legacy", "-t", "raw", "-F", "ICNI_DNS_OUT"],
        };
        assert!(lab.pod.exec(flush).status.success(), "{name}: {flush:?}");
        lab.cni("CHECK", &conf).error(103);
        lab.cni("ADD", &conf).ok();
        lab.cni("CHECK", &conf).ok();
        lab.cni("DEL", &conf).ok();
        let state = lab.pod.firewall_state();
        assert!(
            !state.contains("ICNI_") && !state.contains("intercept-cni"),
            "{name}: DEL left rules:\n{state}"
        );
    }
}

/// A listener on `port` that takes connections for any local address (IP_TRANSPARENT), as a
/// TPROXY proxy listens; returns the peer and local address of the connection it gets.
fn transparent_listener(
    ns: &Netns,
    v6: bool,
    port: u16,
) -> std::thread::JoinHandle<Option<(SocketAddr, SocketAddr)>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = ns.run(move || {
        let (family, level, option, addr) = match v6 {
            false => (
                libc::AF_INET,
                libc::SOL_IP,
                libc::IP_TRANSPARENT,
                format!("0.0.0.0:{port}"),
            ),
            true => (
                libc::AF_INET6,
                libc::SOL_IPV6,
                75, /* IPV6_TRANSPARENT */
                format!("[::]:{port}"),
            ),
        };
        let listener = unsafe {
            let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let one: libc::c_int = 1;
            let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            let ptr = &one as *const libc::c_int as *const libc::c_void;
            assert_eq!(
                libc::setsockopt(fd, level, option, ptr, size),
                0,
                "transparent"
            );
            assert_eq!(
                libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, ptr, size),
                0
            );
            if v6 {
                assert_eq!(
                    libc::setsockopt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, ptr, size),
                    0
                );
            }
            // Bind through std's parsing: a TcpListener over the raw socket.
            let socket = bind_and_listen(fd, &addr.parse().unwrap());
            TcpListener::from_raw_fd(socket)
        };
        listener.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < deadline {
            match listener.accept() {
                Ok((stream, peer)) => return Some((peer, stream.local_addr().unwrap())),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        None
    });
    ready_rx.recv_timeout(WAIT).expect("listener did not start");
    handle
}

/// bind(2) and listen(2) on a raw socket fd; returns the fd.
unsafe fn bind_and_listen(fd: i32, addr: &SocketAddr) -> i32 {
    let (storage, len) = sockaddr(addr);
    assert_eq!(
        libc::bind(fd, &storage as *const _ as *const libc::sockaddr, len),
        0,
        "bind {addr}"
    );
    assert_eq!(libc::listen(fd, 16), 0);
    fd
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Connects from `ns` with a socket owned by `owner` (as the proxy's is) and marked `mark`, as
/// Envoy marks its connections to the app. Only the file-system IDs change (they give the
/// socket its owner), so the thread keeps CAP_NET_ADMIN for SO_MARK, as the proxy has it.
fn connect_marked(ns: &Netns, to: SocketAddr, owner: u32, mark: u32) -> bool {
    ns.run(move || {
        unsafe {
            libc::syscall(libc::SYS_setfsgid, owner);
            libc::syscall(libc::SYS_setfsuid, owner);
        }
        let family = if to.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0);
        let ptr = &mark as *const u32 as *const libc::c_void;
        let rc = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_MARK, ptr, 4) };
        assert_eq!(rc, 0, "SO_MARK");
        let (storage, len) = sockaddr(&to);
        let rc = unsafe { libc::connect(fd, &storage as *const _ as *const libc::sockaddr, len) };
        unsafe { libc::close(fd) };
        rc == 0
    })
    .join()
    .unwrap()
}

#[test]
fn tproxy_keeps_the_peers_address_and_the_original_destination() {
    for (name, backend) in backends() {
        let lab = Lab::new();
        let conf = lab.config(
            "1.0.0",
            with(&backend, json!({"interceptionMode": "TPROXY"})),
        );
        lab.cni("ADD", &conf).ok();
        lab.cni("CHECK", &conf).ok();
        for (v6, pod, peer) in [
            (false, v4(POD_V4, 8080), IpAddr::V4(PEER_V4)),
            (true, v6(POD_V6, 8080), IpAddr::V6(PEER_V6)),
        ] {
            let proxy = transparent_listener(&lab.pod, v6, INBOUND_PORT);
            assert!(connect(&lab.peer, pod, None), "{name}: connection to {pod}");
            let (from, local) = proxy
                .join()
                .unwrap()
                .unwrap_or_else(|| panic!("{name}: {pod} never reached the proxy"));
            assert_eq!(from.ip(), peer, "{name}: the peer's address was not kept");
            assert_eq!(local, pod, "{name}: the original destination was not kept");
        }
        // The proxy's connection to its own pod, marked as Envoy marks its connections to the
        // app (1337), reaches the app. (Where unmarked connections over lo land is the nat
        // rules' business: the landing matrix.)
        {
            let app = Listener::start(&lab.pod, v4(POD_V4, 8083));
            assert!(
                connect_marked(&lab.pod, v4(POD_V4, 8083), PROXY_UID, 1337),
                "{name}"
            );
            assert!(
                app.accepted().is_some(),
                "{name}: the marked connection was diverted"
            );
        }
        // Outbound stays REDIRECT.
        lab.outbound_to_proxy(v4(PEER_V4, 80), None, OUTBOUND_PORT);

        // The routing is part of CHECK, and DEL takes it away.
        lab.pod
            .ip(&["rule", "del", "fwmark", "1337", "table", "133"]);
        let drift = lab.cni("CHECK", &conf).error(103);
        assert!(
            drift["msg"].as_str().unwrap().contains("fwmark"),
            "{name}: {drift}"
        );
        lab.cni("ADD", &conf).ok();
        lab.cni("CHECK", &conf).ok();
        lab.cni("DEL", &conf).ok();
        for family in ["-4", "-6"] {
            let rules = lab.pod.ip(&[family, "rule", "show"]);
            assert!(!rules.contains("lookup 133"), "{name}: {rules}");
            let routes = lab.pod.ip(&[family, "route", "show", "table", "133"]);
            assert!(routes.trim().is_empty(), "{name}: {routes}");
        }
        let state = lab.pod.firewall_state();
        assert!(
            !state.contains("ICNI_") && !state.contains("intercept-cni"),
            "{name}: DEL left rules:\n{state}"
        );
    }
}

#[test]
fn invalid_drop_is_checked_and_a_repeated_add_without_modes_removes_them() {
    for (name, backend) in backends() {
        let lab = Lab::new();
        let all = with(
            &backend,
            json!({"dropInvalid": true, "dnsCapture": true, "interceptionMode": "TPROXY"}),
        );
        let conf = lab.config("1.0.0", all);
        lab.cni("ADD", &conf).ok();
        lab.cni("CHECK", &conf).ok();
        // The plan without the drop: CHECK names what is there and should not be.
        let without = lab.config(
            "1.0.0",
            with(
                &backend,
                json!({"dnsCapture": true, "interceptionMode": "TPROXY"}),
            ),
        );
        lab.cni("CHECK", &without).error(103);
        // A plain ADD over it leaves only the plain rules.
        let plain = lab.config("1.0.0", backend.clone());
        lab.cni("ADD", &plain).ok();
        lab.cni("CHECK", &plain).ok();
        let state = lab.pod.firewall_state();
        for mode_chain in ["ICNI_DNS", "ICNI_PRE", "raw-output", "mangle-prerouting"] {
            assert!(
                !state.contains(mode_chain),
                "{name}: {mode_chain} left:\n{state}"
            );
        }
        lab.cni("DEL", &plain).ok();
    }
}

#[test]
fn hostile_mode_values_are_refused_before_anything_is_applied() {
    let lab = Lab::new();
    let before = lab.pod.firewall_state();
    for keys in [
        json!({"interceptionMode": "tproxy"}),
        json!({"interceptionMode": "TPROXY; ip rule flush"}),
        json!({"dnsCapture": "true"}),
        json!({"dropInvalid": 1}),
    ] {
        let conf = lab.config("1.0.0", keys.clone());
        lab.cni("ADD", &conf).error(7);
    }
    let istio = |config: &str| {
        lab.config(
            "1.0.0",
            json!({"runtimeConfig": {"io.kubernetes.cri.pod-annotations": {
                "sidecar.istio.io/status": "{}",
                "proxy.istio.io/config": config,
            }}}),
        )
    };
    for config in [
        "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\nINVALID_DROP: x\n",
        "proxyMetadata: {ISTIO_META_DNS_CAPTURE: [true]}",
        &format!(
            "proxyMetadata:\n  INVALID_DROP: \"{}\"\n",
            "1".repeat(20_000)
        ),
    ] {
        lab.cni("ADD", &istio(config)).error(7);
    }
    assert_eq!(
        lab.pod.firewall_state(),
        before,
        "a refused ADD changed the netns"
    );
    let rules = lab.pod.ip(&["rule", "show"]);
    assert!(!rules.contains("lookup 133"), "{rules}");
}

/// An Istio pod asks for DNS capture in `proxy.istio.io/config`, as Istio users do: the app's
/// queries (UDP and TCP, also to the pod's own address) reach the agent, and the proxy's TCP to
/// port 53 of its own pod is left alone while its other connections to the pod go to the
/// inbound port (istio-iptables' `! --dports 53,15008`).
#[test]
fn istio_pod_asks_for_dns_capture_in_its_proxy_config() {
    for (name, backend) in backends() {
        let lab = Lab::new();
        let annotations = json!({
            "sidecar.istio.io/status": "{}",
            "proxy.istio.io/config": "holdApplicationUntilProxyStarts: true\nproxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
        });
        let keys = with(
            &backend,
            json!({
                "podSelection": "annotated",
                "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations},
            }),
        );
        let conf = lab.config("1.0.0", keys);
        lab.cni("ADD", &conf).ok();
        lab.cni("CHECK", &conf).ok();
        let server = v4(PEER_V4, 53);
        let agent = udp_server(&lab.pod, v4(Ipv4Addr::LOCALHOST, DNS_PORT), PROXY);
        assert_eq!(udp_query(&lab.pod, server, None), Some(server), "{name}");
        assert!(agent.join().unwrap().is_some(), "{name}");
        lab.outbound_to_proxy(server, None, DNS_PORT);
        // Both ends just closed: let the agent's port leave FIN_WAIT before listening again.
        std::thread::sleep(Duration::from_millis(100));
        lab.outbound_to_proxy(v4(POD_V4, 53), None, DNS_PORT);
        assert_lands(&lab.pod, v4(POD_V4, 53), PROXY, &lab.pod, v4(POD_V4, 53));
        lab.outbound_to_proxy(v4(POD_V4, 8080), PROXY, INBOUND_PORT);
        lab.outbound_direct(server, PROXY);
        lab.cni("DEL", &conf).ok();
    }
}

/// Ones' complement sum of 16-bit words, as the TCP checksum wants it.
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// From the peer, sends the pod a TCP segment without any flag (conntrack calls it INVALID) to a
/// closed port; returns whether the pod answered with a RST, as its stack does when the packet
/// reaches it.
fn null_segment_gets_a_reset(lab: &Lab) -> bool {
    lab.peer
        .run(|| {
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
            assert!(fd >= 0, "raw socket");
            // Generous: under load the RST can take a while, and a late one must not read as
            // dropped (the negative case just waits this long once).
            let timeout = libc::timeval {
                tv_sec: 1,
                tv_usec: 0,
            };
            let ptr = &timeout as *const libc::timeval as *const libc::c_void;
            let size = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
            unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, ptr, size) };
            let (sport, dport) = (40_000u16, 9u16);
            let mut tcp = [0u8; 20];
            tcp[0..2].copy_from_slice(&sport.to_be_bytes());
            tcp[2..4].copy_from_slice(&dport.to_be_bytes());
            tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
            tcp[12] = 5 << 4; // header length, no flags at all
            tcp[14..16].copy_from_slice(&1024u16.to_be_bytes());
            let pseudo = [
                &PEER_V4.octets()[..],
                &POD_V4.octets()[..],
                &[0, libc::IPPROTO_TCP as u8, 0, 20][..],
            ]
            .concat();
            let sum = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            let (to, len) = sockaddr(&v4(POD_V4, 0));
            let sent = unsafe {
                libc::sendto(
                    fd,
                    tcp.as_ptr() as *const libc::c_void,
                    tcp.len(),
                    0,
                    &to as *const _ as *const libc::sockaddr,
                    len,
                )
            };
            assert_eq!(sent, 20, "send the segment");
            let mut reset = false;
            let mut buf = [0u8; 1500];
            for _ in 0..20 {
                let n =
                    unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
                if n <= 0 {
                    break;
                }
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                let seg = &buf[ihl..n as usize];
                let from = u16::from_be_bytes([seg[0], seg[1]]);
                let to = u16::from_be_bytes([seg[2], seg[3]]);
                if (from, to) == (dport, sport) && seg[13] & 0x04 != 0 {
                    reset = true;
                    break;
                }
            }
            unsafe { libc::close(fd) };
            reset
        })
        .join()
        .unwrap()
}

/// Istio's INVALID_DROP: a segment conntrack finds INVALID never reaches the pod's stack (which
/// would answer it with a RST); without the mode it does.
#[test]
fn invalid_packets_are_dropped_on_arrival() {
    for (name, backend) in backends() {
        let lab = Lab::new();
        let plain = lab.config("1.0.0", backend.clone());
        lab.cni("ADD", &plain).ok();
        assert!(
            (0..3).any(|_| null_segment_gets_a_reset(&lab)),
            "{name}: no RST without the drop"
        );
        let conf = lab.config("1.0.0", with(&backend, json!({"dropInvalid": true})));
        lab.cni("ADD", &conf).ok();
        lab.cni("CHECK", &conf).ok();
        assert!(
            !null_segment_gets_a_reset(&lab),
            "{name}: the INVALID segment got through"
        );
        // Valid traffic still flows.
        lab.inbound_to_proxy(v4(POD_V4, 8080), INBOUND_PORT);
        lab.cni("DEL", &conf).ok();
    }
}
