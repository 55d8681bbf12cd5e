//! Root only: the iptables backend in real named network namespaces, for both variants, down to
//! live connections whose original destination is read back with SO_ORIGINAL_DST.

mod common;

use intercept_cni::backend::iptables::Iptables;
use intercept_cni::backend::{Backend, BackendOptions, IptablesMode};
use intercept_cni::cni::error::Code;
use intercept_cni::netns::PodNetns;
use intercept_cni::plan::{Families, InterceptPlan};
use nix::sys::socket::{getsockopt, sockopt};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const IP: &str = "/usr/sbin/ip";
const PYTHON: &str = "/usr/bin/python3";
const PROXY_UID: u32 = 1337;

/// A named netns (`ip netns add`), deleted when dropped, even when the test fails.
struct TestNetns {
    name: String,
    pod: PodNetns,
}

impl TestNetns {
    fn new() -> TestNetns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "icni-ipt-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        run_ok(Command::new(IP).args(["netns", "add", &name]));
        let path = PathBuf::from("/run/netns").join(&name);
        let pod = match PodNetns::open(&path) {
            Ok(Some(pod)) => pod,
            other => {
                let _ = Command::new(IP).args(["netns", "del", &name]).status();
                panic!("cannot open {}: {:?}", path.display(), other.err());
            }
        };
        TestNetns { name, pod }
    }

    /// Runs a command inside the netns with `ip netns exec`.
    fn exec(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(IP);
        cmd.args(["netns", "exec", &self.name]).args(args);
        run_ok(&mut cmd)
    }

    /// `*-save -t nat` of one variant and family, without the timestamped comment lines.
    fn save(&self, mode: IptablesMode, ipv6: bool) -> String {
        let tool = format!(
            "/usr/sbin/{}-{}-save",
            if ipv6 { "ip6tables" } else { "iptables" },
            mode_name(mode)
        );
        let out = self.exec(&[&tool, "-t", "nat"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    fn save_both(&self, mode: IptablesMode) -> String {
        self.save(mode, false) + &self.save(mode, true)
    }

    /// Which legacy tables the kernel has instantiated in this netns (listing creates none).
    fn legacy_tables(&self) -> String {
        let out = self.exec(&[
            "/usr/bin/cat",
            "/proc/net/ip_tables_names",
            "/proc/net/ip6_tables_names",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn nft_tables(&self) -> String {
        let out = self.exec(&["/usr/sbin/nft", "list", "tables"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new(IP).args(["netns", "del", &self.name]).status();
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn mode_name(mode: IptablesMode) -> &'static str {
    match mode {
        IptablesMode::Legacy => "legacy",
        IptablesMode::Nft => "nft",
    }
}

fn other(mode: IptablesMode) -> IptablesMode {
    match mode {
        IptablesMode::Legacy => IptablesMode::Nft,
        IptablesMode::Nft => IptablesMode::Legacy,
    }
}

fn backend(mode: IptablesMode) -> Iptables {
    Iptables::new(mode, &BackendOptions::default())
}

fn defaults() -> InterceptPlan {
    InterceptPlan::with_defaults(Families::BOTH)
}

fn count_lines(text: &str, line: &str) -> usize {
    text.lines().filter(|l| *l == line).count()
}

fn apply_check_and_idempotence(mode: IptablesMode) {
    let ns = TestNetns::new();
    let b = backend(mode);
    let plan = defaults();
    ns.pod.run(|| b.apply(&plan)).unwrap();
    ns.pod.run(|| b.check(&plan)).unwrap();
    let first = ns.save_both(mode);
    ns.pod.run(|| b.apply(&plan)).unwrap();
    let second = ns.save_both(mode);
    assert_eq!(first, second, "a second apply changed the tables");
    for (jump, per_family) in [
        ("-A PREROUTING -p tcp -j ICNI_INBOUND", 1),
        ("-A OUTPUT -p tcp -j ICNI_OUTBOUND", 1),
    ] {
        assert_eq!(count_lines(&second, jump), 2 * per_family, "{second}");
    }
    assert!(
        second.contains("-A ICNI_OUTBOUND -o lo -j RETURN"),
        "{second}"
    );
    ns.pod.run(|| b.check(&plan)).unwrap();
}

fn tampering_is_reported_then_repaired(mode: IptablesMode) {
    let ns = TestNetns::new();
    let b = backend(mode);
    let plan = defaults();
    ns.pod.run(|| b.apply(&plan)).unwrap();
    let iptables = format!("/usr/sbin/iptables-{}", mode_name(mode));
    ns.exec(&[&iptables, "-t", "nat", "-F", "ICNI_OUTBOUND"]);
    let err = ns.pod.run(|| b.check(&plan)).unwrap_err();
    assert_eq!(err.code, Code::Drift);
    assert!(err.msg.contains("IPv4 chain ICNI_OUTBOUND"), "{}", err.msg);

    ns.pod.run(|| b.apply(&plan)).unwrap();
    ns.pod.run(|| b.check(&plan)).unwrap();
    let ip6tables = format!("/usr/sbin/ip6tables-{}", mode_name(mode));
    ns.exec(&[
        &ip6tables,
        "-t",
        "nat",
        "-I",
        "OUTPUT",
        "-p",
        "tcp",
        "-j",
        "ICNI_OUTBOUND",
    ]);
    let err = ns.pod.run(|| b.check(&plan)).unwrap_err();
    assert_eq!(err.code, Code::Drift);
    assert!(err.msg.contains("IPv6 OUTPUT has 2 jumps"), "{}", err.msg);

    // Another plan is drift too: the rules no longer say what ADD would install now.
    let mut changed = defaults();
    changed.outbound_port = 15002;
    ns.pod.run(|| b.apply(&plan)).unwrap();
    let err = ns.pod.run(|| b.check(&changed)).unwrap_err();
    assert!(err.msg.contains("15002"), "{}", err.msg);
}

fn remove_cleans_both_families_and_repeats(mode: IptablesMode) {
    let ns = TestNetns::new();
    let b = backend(mode);
    assert!(!ns.pod.run(|| b.installed()).unwrap());
    ns.pod.run(|| b.apply(&defaults())).unwrap();
    // What `intercept-cni audit` reads to report rules the policy did not ask for.
    assert!(ns.pod.run(|| b.installed()).unwrap());
    ns.pod.run(|| b.remove()).unwrap();
    let after = ns.save_both(mode);
    assert!(!after.contains("ICNI_"), "{after}");
    assert!(!ns.pod.run(|| b.installed()).unwrap());
    ns.pod.run(|| b.remove()).unwrap();
    let err = ns.pod.run(|| b.check(&defaults())).unwrap_err();
    assert_eq!(err.code, Code::Drift);
    assert!(err.msg.contains("missing"), "{}", err.msg);
}

fn remove_after_mode_change(mode: IptablesMode) {
    let ns = TestNetns::new();
    ns.pod.run(|| backend(mode).apply(&defaults())).unwrap();
    ns.pod.run(|| backend(other(mode)).remove()).unwrap();
    let after = ns.save_both(mode);
    assert!(!after.contains("ICNI_"), "{after}");
}

fn other_variant_is_untouched(mode: IptablesMode) {
    // A fresh netns: neither creating, checking nor removing ours creates the other's tables.
    let ns = TestNetns::new();
    let b = backend(mode);
    ns.pod.run(|| b.apply(&defaults())).unwrap();
    ns.pod.run(|| b.check(&defaults())).unwrap();
    ns.pod.run(|| b.remove()).unwrap();
    match mode {
        IptablesMode::Legacy => assert_eq!(ns.nft_tables(), ""),
        IptablesMode::Nft => assert!(!ns.legacy_tables().contains("nat")),
    }

    // The other variant's own rules survive all three, byte for byte.
    let ns = TestNetns::new();
    let theirs = format!("/usr/sbin/iptables-{}", mode_name(other(mode)));
    ns.exec(&[&theirs, "-t", "nat", "-N", "OTHER_MESH"]);
    ns.exec(&[
        &theirs,
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-j",
        "OTHER_MESH",
    ]);
    ns.exec(&[
        &theirs,
        "-t",
        "nat",
        "-A",
        "OTHER_MESH",
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        "4140",
    ]);
    let before = ns.save_both(other(mode));
    ns.pod.run(|| b.apply(&defaults())).unwrap();
    ns.pod.run(|| b.check(&defaults())).unwrap();
    ns.pod.run(|| b.remove()).unwrap();
    assert_eq!(before, ns.save_both(other(mode)));
}

fn families_follow_the_plan(mode: IptablesMode) {
    let ns = TestNetns::new();
    let b = backend(mode);
    ns.pod.run(|| b.apply(&defaults())).unwrap();
    let v4_only = InterceptPlan::with_defaults(Families {
        ipv4: true,
        ipv6: false,
    });
    // IPv6 rules from the earlier ADD are drift for an IPv4-only plan, and a new ADD drops them.
    let err = ns.pod.run(|| b.check(&v4_only)).unwrap_err();
    assert!(err.msg.contains("IPv6 chain"), "{}", err.msg);
    ns.pod.run(|| b.apply(&v4_only)).unwrap();
    ns.pod.run(|| b.check(&v4_only)).unwrap();
    assert!(!ns.save(mode, true).contains("ICNI_"));
    assert!(ns.save(mode, false).contains("ICNI_OUTBOUND"));
}

/// Accepts one connection within `wait`, or none.
fn accept_within(listener: &TcpListener, wait: Duration) -> Option<TcpStream> {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Some(stream),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn original_destination(stream: &TcpStream) -> SocketAddr {
    match stream.local_addr().unwrap() {
        SocketAddr::V4(_) => {
            let sa = getsockopt(stream, sockopt::OriginalDst).unwrap();
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))),
                u16::from_be(sa.sin_port),
            )
        }
        SocketAddr::V6(_) => {
            let sa = getsockopt(stream, sockopt::Ip6tOriginalDst).unwrap();
            SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)),
                u16::from_be(sa.sin6_port),
            )
        }
    }
}

/// Connects from a child process running as `uid` (inside the netns of the calling thread).
fn connect_as(uid: u32, to: SocketAddr) -> bool {
    let script = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()";
    Command::new(PYTHON)
        .args(["-c", script, &to.ip().to_string(), &to.port().to_string()])
        .current_dir(Path::new("/"))
        .uid(uid)
        .gid(uid)
        .status()
        .map(|s| s.success())
        .unwrap_or_else(|e| panic!("cannot run {PYTHON}: {e}"))
}

fn live_outbound_redirect(mode: IptablesMode) {
    let ns = TestNetns::new();
    ns.exec(&[IP, "link", "set", "lo", "up"]);
    // This kernel has no dummy driver: a veth pair with both ends in the netns gives the
    // addresses a link; packets to other addresses on it go nowhere.
    ns.exec(&[
        IP, "link", "add", "icni0", "type", "veth", "peer", "name", "icni1",
    ]);
    ns.exec(&[IP, "link", "set", "icni0", "up"]);
    ns.exec(&[IP, "link", "set", "icni1", "up"]);
    ns.exec(&[IP, "addr", "add", "10.232.0.2/24", "dev", "icni0"]);
    ns.exec(&[IP, "addr", "add", "fd00:232::2/64", "dev", "icni0", "nodad"]);
    let b = backend(mode);
    ns.pod.run(|| b.apply(&defaults())).unwrap();

    for (proxy, local, remote) in [
        ("127.0.0.1:15001", "10.232.0.2:8080", "10.232.0.99:8080"),
        ("[::1]:15001", "[fd00:232::2]:8080", "[fd00:232::99]:8080"),
    ] {
        let (proxy, local, remote): (SocketAddr, SocketAddr, SocketAddr) = (
            proxy.parse().unwrap(),
            local.parse().unwrap(),
            remote.parse().unwrap(),
        );
        let (outbound, app) = ns
            .pod
            .run(|| {
                Ok((
                    TcpListener::bind(proxy).unwrap(),
                    TcpListener::bind(local).unwrap(),
                ))
            })
            .unwrap();

        // An ordinary process: a remote destination lands on the proxy...
        let to = remote;
        {
            let client = ns
                .pod
                .run(|| Ok(TcpStream::connect_timeout(&to, Duration::from_secs(3))))
                .unwrap()
                .unwrap_or_else(|e| panic!("{mode:?}: connect to {to} not redirected: {e}"));
            let accepted = accept_within(&outbound, Duration::from_secs(3))
                .unwrap_or_else(|| panic!("{mode:?}: proxy got no connection for {to}"));
            assert_eq!(original_destination(&accepted), to);
            drop(client);
        }

        // ...while the pod's own address, reached through lo, is direct (as under both meshes),
        // and so is anything the proxy's own UID sends.
        let direct = ns
            .pod
            .run(|| Ok(TcpStream::connect_timeout(&local, Duration::from_secs(3))))
            .unwrap()
            .unwrap_or_else(|e| panic!("{mode:?}: connect to {local} failed: {e}"));
        assert!(accept_within(&app, Duration::from_secs(3)).is_some());
        drop(direct);
        let reached = ns.pod.run(|| Ok(connect_as(PROXY_UID, local))).unwrap();
        assert!(reached, "{mode:?}: uid {PROXY_UID} could not reach {local}");
        assert!(accept_within(&app, Duration::from_secs(3)).is_some());
        assert!(accept_within(&outbound, Duration::from_millis(200)).is_none());
    }
}

fn missing_binaries_are_named(mode: IptablesMode) {
    let empty = tempfile::tempdir().unwrap();
    let b = Iptables::new(
        mode,
        &BackendOptions {
            iptables_path: Some(empty.path().to_path_buf()),
        },
    );
    let ns = TestNetns::new();
    let err = ns.pod.run(|| b.apply(&defaults())).unwrap_err();
    assert_eq!(err.code, Code::InvalidConfig);
    assert!(
        err.msg.contains(&format!("iptables-{}-", mode_name(mode))),
        "{}",
        err.msg
    );
    let err = ns.pod.run(|| b.remove()).unwrap_err();
    assert!(
        err.msg.contains("-restore") || err.msg.contains("-save"),
        "{}",
        err.msg
    );
}

/// A netns with no nat table yet holds nothing of ours, so ADD goes straight to restore: with
/// `-save` standing in as `false`, the first ADD succeeds; once the table exists, -save runs.
fn fresh_netns_add_skips_save(mode: IptablesMode) {
    let dir = tempfile::tempdir().unwrap();
    for family in ["iptables", "ip6tables"] {
        let restore = format!("{family}-{}-restore", mode_name(mode));
        std::os::unix::fs::symlink(
            Path::new("/usr/sbin").join(&restore),
            dir.path().join(&restore),
        )
        .unwrap();
        let save = format!("{family}-{}-save", mode_name(mode));
        std::os::unix::fs::symlink("/usr/bin/false", dir.path().join(save)).unwrap();
    }
    let b = Iptables::new(
        mode,
        &BackendOptions {
            iptables_path: Some(dir.path().to_path_buf()),
        },
    );
    let ns = TestNetns::new();
    ns.pod.run(|| b.apply(&defaults())).unwrap();
    let installed = ns.save_both(mode);
    assert_eq!(
        count_lines(&installed, "-A OUTPUT -p tcp -j ICNI_OUTBOUND"),
        2,
        "{installed}"
    );
    let err = ns.pod.run(|| b.apply(&defaults())).unwrap_err();
    assert!(err.msg.contains("-save -t nat failed"), "{}", err.msg);
}

/// The netns of `live_outbound_redirect`: a veth pair with both ends inside gives addresses.
fn with_addresses() -> TestNetns {
    let ns = TestNetns::new();
    ns.exec(&[IP, "link", "set", "lo", "up"]);
    ns.exec(&[
        IP, "link", "add", "icni0", "type", "veth", "peer", "name", "icni1",
    ]);
    ns.exec(&[IP, "link", "set", "icni0", "up"]);
    ns.exec(&[IP, "link", "set", "icni1", "up"]);
    ns.exec(&[IP, "addr", "add", "10.232.0.2/24", "dev", "icni0"]);
    ns
}

/// Whether an ordinary process's connection to 10.232.0.99:8080 lands on the proxy.
fn outbound_intercepted(ns: &TestNetns) -> bool {
    let to: SocketAddr = "10.232.0.99:8080".parse().unwrap();
    let proxy = ns
        .pod
        .run(|| Ok(TcpListener::bind("127.0.0.1:15001").unwrap()))
        .unwrap();
    let client = ns
        .pod
        .run(|| Ok(TcpStream::connect_timeout(&to, Duration::from_millis(500))))
        .unwrap();
    let got = accept_within(&proxy, Duration::from_millis(500));
    drop(client);
    got.is_some_and(|s| original_destination(&s) == to)
}

/// A rule inserted before our jump (RETURN, ACCEPT, an identity DNAT) takes the connection
/// past us: CHECK reports it, and ADD moves our jump in front again, leaving that rule alone.
fn a_rule_before_our_jump_is_drift_and_add_repairs_it(mode: IptablesMode) {
    let ns = with_addresses();
    let b = backend(mode);
    let plan = defaults();
    ns.pod.run(|| b.apply(&plan)).unwrap();
    assert!(
        outbound_intercepted(&ns),
        "{mode:?}: not intercepted at all"
    );
    let iptables = format!("/usr/sbin/iptables-{}", mode_name(mode));
    let ip6tables = format!("/usr/sbin/ip6tables-{}", mode_name(mode));
    for (tool, chain, rule) in [
        (&iptables, "OUTPUT", &["-p", "tcp", "-j", "RETURN"][..]),
        (&iptables, "OUTPUT", &["-j", "ACCEPT"][..]),
        (
            &iptables,
            "OUTPUT",
            &[
                "-p",
                "tcp",
                "-d",
                "10.232.0.99",
                "-j",
                "DNAT",
                "--to-destination",
                "10.232.0.99",
            ][..],
        ),
        (&ip6tables, "PREROUTING", &["-p", "tcp", "-j", "RETURN"][..]),
    ] {
        let mut args = vec![tool.as_str(), "-t", "nat", "-I", chain, "1"];
        args.extend_from_slice(rule);
        ns.exec(&args);
        if chain == "OUTPUT" {
            assert!(
                !outbound_intercepted(&ns),
                "{mode:?} {rule:?}: not bypassed"
            );
        }
        let err = ns.pod.run(|| b.check(&plan)).unwrap_err();
        assert_eq!(err.code, Code::Drift);
        assert!(
            err.msg.contains(&format!("{chain} rule 1"))
                && err.msg.contains("takes effect before the jump"),
            "{mode:?} {rule:?}: {}",
            err.msg
        );
        ns.pod.run(|| b.apply(&plan)).unwrap();
        ns.pod.run(|| b.check(&plan)).unwrap();
        let v6 = tool.contains("ip6");
        let saved = ns.save(mode, v6);
        let first = saved
            .lines()
            .find(|l| l.starts_with(&format!("-A {chain} ")));
        assert!(
            first
                .is_some_and(|l| l.ends_with("-p tcp -j ICNI_OUTBOUND")
                    || l.ends_with("-p tcp -j ICNI_INBOUND")),
            "{mode:?}: our jump is not first:\n{saved}"
        );
        assert_eq!(
            saved
                .lines()
                .filter(|l| l.starts_with(&format!("-A {chain} ")))
                .count(),
            2,
            "{saved}"
        );
        assert!(outbound_intercepted(&ns), "{mode:?} {rule:?}: not repaired");
        ns.exec(&[tool, "-t", "nat", "-D", chain, "2"]);
    }
    // A rule that decides nothing (LOG) may stay in front; ADD does not move past it.
    ns.exec(&[&iptables, "-t", "nat", "-I", "OUTPUT", "1", "-j", "LOG"]);
    ns.pod.run(|| b.check(&plan)).unwrap();
}

/// Extra jumps to our chains, however they look (a comment with spaces and quotes, a goto, a
/// jump from another chain), never wedge ADD or DEL: ADD removes them and keeps one jump per
/// hook, DEL removes them all with our chains.
fn odd_jumps_to_our_chains_never_wedge_add_or_del(mode: IptablesMode) {
    let ns = TestNetns::new();
    let b = backend(mode);
    let plan = defaults();
    let plant = || {
        for family in ["iptables", "ip6tables"] {
            let tool = format!("/usr/sbin/{family}-{}", mode_name(mode));
            for args in [
                &[
                    "-A",
                    "OUTPUT",
                    "-m",
                    "comment",
                    "--comment",
                    "hello world",
                    "-j",
                    "ICNI_OUTBOUND",
                ][..],
                &[
                    "-I",
                    "PREROUTING",
                    "1",
                    "-m",
                    "comment",
                    "--comment",
                    "a \"-j\" ICNI_INBOUND",
                    "-g",
                    "ICNI_INBOUND",
                ][..],
                &["-A", "USER_HOP", "-j", "ICNI_OUTBOUND"][..],
                &["-A", "OUTPUT", "-j", "USER_HOP"][..],
            ] {
                let mut all = vec![tool.as_str(), "-t", "nat"];
                all.extend_from_slice(args);
                ns.exec(&all);
            }
        }
    };
    ns.pod.run(|| b.apply(&plan)).unwrap();
    for family in ["iptables", "ip6tables"] {
        let tool = format!("/usr/sbin/{family}-{}", mode_name(mode));
        ns.exec(&[&tool, "-t", "nat", "-N", "USER_HOP"]);
    }
    plant();
    let err = ns.pod.run(|| b.check(&plan)).unwrap_err();
    assert_eq!(err.code, Code::Drift);
    ns.pod.run(|| b.apply(&plan)).unwrap();
    let saved = ns.save_both(mode);
    for jump in [
        "-A OUTPUT -p tcp -j ICNI_OUTBOUND",
        "-A PREROUTING -p tcp -j ICNI_INBOUND",
    ] {
        assert_eq!(count_lines(&saved, jump), 2, "{saved}");
    }
    assert!(
        !saved.contains("hello world") && !saved.contains("-g ICNI_INBOUND"),
        "{saved}"
    );
    plant();
    ns.pod.run(|| b.remove()).unwrap();
    let after = ns.save_both(mode);
    assert!(
        !after.contains("ICNI_"),
        "{mode:?}: left after DEL:\n{after}"
    );
    ns.pod.run(|| b.remove()).unwrap();
}

/// A jump to our chain written with `nft` in a shape iptables-nft-save cannot print (a set
/// lookup, `meta mark set`) makes -save fail: DEL still removes everything of ours (over
/// netlink), and ADD repairs the table.
#[test]
fn an_nft_native_jump_iptables_cannot_read_never_wedges_del_or_add() {
    let ns = TestNetns::new();
    let b = backend(IptablesMode::Nft);
    let plan = defaults();
    let plant = || {
        for family in ["ip", "ip6"] {
            let addr = if family == "ip" { "1.2.3.4" } else { "fd00::4" };
            let rule = format!(
                "add rule {family} nat OUTPUT meta mark set 0x1 {family} daddr . tcp dport {{ {addr} . 80 }} jump ICNI_OUTBOUND"
            );
            run_ok(Command::new(IP).args(["netns", "exec", &ns.name, "/usr/sbin/nft", &rule]));
        }
    };
    ns.pod.run(|| b.apply(&plan)).unwrap();
    plant();
    ns.pod.run(|| b.remove()).unwrap();
    let left = ns.nft_tables()
        + &String::from_utf8_lossy(&ns.exec(&["/usr/sbin/nft", "list", "ruleset"]).stdout);
    assert!(!left.contains("ICNI_"), "left after DEL:\n{left}");
    ns.pod.run(|| b.apply(&plan)).unwrap();
    plant();
    ns.pod.run(|| b.apply(&plan)).unwrap();
    ns.pod.run(|| b.check(&plan)).unwrap();
    ns.pod.run(|| b.remove()).unwrap();
}

macro_rules! for_both_modes {
    ($($name:ident),* $(,)?) => {
        mod legacy {
            $(#[test] fn $name() { super::$name(super::IptablesMode::Legacy) })*
        }
        mod nft {
            $(#[test] fn $name() { super::$name(super::IptablesMode::Nft) })*
        }
    };
}

for_both_modes!(
    apply_check_and_idempotence,
    tampering_is_reported_then_repaired,
    remove_cleans_both_families_and_repeats,
    remove_after_mode_change,
    other_variant_is_untouched,
    families_follow_the_plan,
    live_outbound_redirect,
    missing_binaries_are_named,
    fresh_netns_add_skips_save,
    a_rule_before_our_jump_is_drift_and_add_repairs_it,
    odd_jumps_to_our_chains_never_wedge_add_or_del,
);

/// `iptablesMode: auto` follows the rules already in the namespace it runs in (the host's in
/// production), then the kernel-support hook, then nft.
#[test]
fn auto_mode_follows_existing_rules() {
    use intercept_cni::backend::iptables::detect_mode;
    let options = BackendOptions::default();
    let only_legacy = |m: IptablesMode| m == IptablesMode::Legacy;

    let ns = TestNetns::new();
    let (mode, why) = ns
        .pod
        .run(|| Ok(detect_mode(&options, only_legacy)))
        .unwrap();
    assert_eq!(mode, IptablesMode::Legacy, "{why}");
    let (mode, _) = ns.pod.run(|| Ok(detect_mode(&options, |_| false))).unwrap();
    assert_eq!(mode, IptablesMode::Nft);

    for used in [IptablesMode::Legacy, IptablesMode::Nft] {
        let ns = TestNetns::new();
        let iptables = format!("/usr/sbin/iptables-{}", mode_name(used));
        ns.exec(&[
            &iptables, "-t", "filter", "-A", "INPUT", "-p", "tcp", "-j", "ACCEPT",
        ]);
        // The kernel hook prefers the other variant; the rules already there still win.
        let (mode, why) = ns
            .pod
            .run(|| Ok(detect_mode(&options, |m| m != used)))
            .unwrap();
        assert_eq!(mode, used, "{why}");
        assert!(why.contains("1 iptables-"), "{why}");
    }
}

/// A table the kernel will not let iptables-nft change (a native nftables `nat` table with a
/// base chain at another priority): the error carries the tool's stderr and a module hint, and
/// the family that had already been applied is rolled back, so nothing is half-applied.
#[test]
fn nft_rejection_is_reported_and_nothing_is_half_applied() {
    let ns = TestNetns::new();
    let native = "table ip6 nat { chain PREROUTING { type nat hook prerouting priority -150; policy accept; }; }";
    ns.exec(&["/usr/sbin/nft", "add", native]);
    let native_table = || {
        ns.exec(&["/usr/sbin/nft", "list", "table", "ip6", "nat"])
            .stdout
    };
    let before = native_table();
    let b = backend(IptablesMode::Nft);
    let err = ns.pod.run(|| b.apply(&defaults())).unwrap_err();
    assert_eq!(err.code, Code::Backend);
    assert!(err.msg.contains("ip6tables-nft-restore"), "{}", err.msg);
    assert!(err.msg.contains("nft_chain_nat"), "{}", err.msg);
    assert!(err.details.contains("PREROUTING"), "{}", err.details);
    // IPv4 succeeded alongside; it was undone. The refused table is as it was.
    assert!(!ns.save_both(IptablesMode::Nft).contains("ICNI_"));
    assert_eq!(native_table(), before);
}

/// iptables-legacy-restore creates the per-netns lock files; DEL's removal deletes them, so
/// pods that come and go leave no files in /run/intercept-cni.
#[test]
fn remove_deletes_the_netns_lock_file() {
    use std::os::unix::fs::MetadataExt;
    let ns = TestNetns::new();
    let ino = std::fs::metadata(Path::new("/run/netns").join(&ns.name))
        .unwrap()
        .ino();
    // One per family, so the two restores do not wait for each other.
    let locks = ["xtables", "xtables6"]
        .map(|name| PathBuf::from(format!("/run/intercept-cni/{name}-{ino}.lock")));
    let b = backend(IptablesMode::Legacy);
    ns.pod.run(|| b.apply(&defaults())).unwrap();
    for lock in &locks {
        assert!(lock.exists(), "{} after apply", lock.display());
    }
    ns.pod.run(|| b.remove()).unwrap();
    for lock in &locks {
        assert!(!lock.exists(), "{} after remove", lock.display());
    }
    ns.pod.run(|| b.remove()).unwrap();
}

/// A namespace deleted before its DEL keeps its lock files (DEL cannot tell which are its);
/// GC, run through the binary like a runtime does, removes them and leaves a live pod's alone.
#[test]
fn gc_sweeps_the_lock_files_of_namespaces_that_are_gone() {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let locks_of = |ns: &TestNetns| {
        let ino = std::fs::metadata(Path::new("/run/netns").join(&ns.name))
            .unwrap()
            .ino();
        let locks = ["xtables", "xtables6"]
            .map(|name| PathBuf::from(format!("/run/intercept-cni/{name}-{ino}.lock")));
        (ino, locks)
    };
    let b = backend(IptablesMode::Legacy);
    let live = TestNetns::new();
    let gone = TestNetns::new();
    for ns in [&live, &gone] {
        ns.pod.run(|| b.apply(&defaults())).unwrap();
    }
    let (_, live_locks) = locks_of(&live);
    let (gone_ino, gone_locks) = locks_of(&gone);
    drop(gone); // `ip netns del`, and the test's handle closed: nothing holds it any more.
    for lock in live_locks.iter().chain(&gone_locks) {
        assert!(lock.exists(), "{} after apply", lock.display());
    }

    let conf = r#"{"cniVersion":"1.1.0","name":"gc","type":"intercept-cni","cni.dev/valid-attachments":[]}"#;
    let mut gc = Command::new(env!("CARGO_BIN_EXE_intercept-cni"))
        .env_clear()
        .env("CNI_COMMAND", "GC")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the plugin");
    gc.stdin.take().unwrap().write_all(conf.as_bytes()).unwrap();
    let out = gc.wait_with_output().unwrap();
    assert!(out.status.success() && out.stdout.is_empty(), "GC: {out:?}");

    for lock in &live_locks {
        assert!(
            lock.exists(),
            "{} of a live netns was removed",
            lock.display()
        );
    }
    // Another test may have been given the same inode number since (they are recycled); its
    // files are then live ones, rightly kept.
    let reused = intercept_cni::netns::live_namespaces()
        .unwrap()
        .contains(&gone_ino);
    for lock in &gone_locks {
        assert!(reused || !lock.exists(), "{} left by GC", lock.display());
    }
    live.pod.run(|| b.remove()).unwrap();
}

/// CHECK warns (and passes) about rules elsewhere that take a connection past our jumps: a
/// notrack rule in this variant's raw table, and another table's nat chain hooked before ours.
/// iptables-nft's own nat table is judged by position (drift), not warned about.
#[test]
fn check_warns_about_bypasses_elsewhere() {
    for mode in ["nft", "legacy"] {
        let lab = common::Lab::new();
        let conf = lab.config(
            "1.0.0",
            serde_json::json!({"backend": "iptables", "iptablesMode": mode}),
        );
        lab.cni("ADD", &conf).ok();
        let quiet = lab.cni("CHECK", &conf).ok();
        assert!(!quiet.stderr.contains("WARN"), "{mode}: {}", quiet.stderr);
        let tool = format!("/usr/sbin/iptables-{mode}");
        common::must(
            "ip",
            &[
                "netns",
                "exec",
                &lab.pod.name,
                &tool,
                "-t",
                "raw",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "--dport",
                "9",
                "-j",
                "CT",
                "--notrack",
            ],
        );
        common::must(
            "ip",
            &["netns", "exec", &lab.pod.name, "nft", "add table ip early; add chain ip early out { type nat hook output priority -150; }; add rule ip early out tcp dport 9 accept"],
        );
        let warned = lab.cni("CHECK", &conf).ok();
        for needle in [
            "IPv4 raw table rule `-A OUTPUT -p tcp -m tcp --dport 9 -j CT --notrack` turns connection tracking off",
            "table ip early chain out (nat hook output priority -150) runs at or before",
        ] {
            assert!(warned.stderr.contains(needle), "{mode}: {needle:?} not in {}", warned.stderr);
        }
        assert!(
            !warned.stderr.contains("table ip nat "),
            "{mode}: {}",
            warned.stderr
        );
        if mode == "nft" {
            common::must(
                "ip",
                &[
                    "netns",
                    "exec",
                    &lab.pod.name,
                    "iptables-legacy",
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "--dport",
                    "9",
                    "-j",
                    "RETURN",
                ],
            );
            let warned = lab.cni("CHECK", &conf).ok();
            let needle = "IPv4 iptables-legacy nat rule 1 of OUTPUT `-p tcp -m tcp --dport 9 -j RETURN` runs beside ours";
            assert!(
                warned.stderr.contains(needle),
                "{needle:?} not in {}",
                warned.stderr
            );
        }
        lab.cni("DEL", &conf).ok();
    }
}
