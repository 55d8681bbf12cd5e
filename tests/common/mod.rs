//! The live-traffic lab shared by the root-only integration suites: a pod netns and a peer netns
//! joined by a veth pair with IPv4 and IPv6 addresses, the plugin binary run as a runtime runs it,
//! and listeners that read the original destination of redirected connections.
//!
//! Every address used here lives only inside the two namespaces the lab creates.
#![allow(dead_code)] // each test binary uses its own subset of the lab

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{getsockopt, sockopt};
use serde_json::{json, Value};
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const POD_V4: Ipv4Addr = Ipv4Addr::new(10, 248, 0, 2);
pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(10, 248, 0, 1);
pub const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x248, 0, 0, 0, 0, 0, 2);
pub const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x248, 0, 0, 0, 0, 0, 1);
pub const PROXY_UID: u32 = 1337;
pub const INBOUND_PORT: u16 = 15006;
pub const OUTBOUND_PORT: u16 = 15001;
const WAIT: Duration = Duration::from_secs(5);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command that must succeed; the lab cannot work otherwise, so this fails the test.
pub fn must(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The root-only suites need root; in CI we are root, so not being root is a failure, not a skip.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this suite needs root (CI runs as root): run it with sudo"
    );
}

/// A named network namespace, removed on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Netns {
        require_root();
        let name = format!(
            "icni-{role}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        must("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip ARGS` inside this namespace.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        must("ip", &all)
    }

    /// Runs a program inside this namespace (through `ip netns exec`, test-side only).
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// `nft list ruleset` inside the namespace.
    /// `nft list ruleset` inside the namespace, as nft prints it.
    pub fn nft_ruleset(&self) -> String {
        let out = self.exec(&["nft", "list", "ruleset"]);
        assert!(
            out.status.success(),
            "nft list ruleset: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The nftables ruleset with tables, and chains within a table, sorted: nft lists them in
    /// creation order, which depends on history (the iptables backend creates its IPv4 and IPv6
    /// tables concurrently, and iptables keeps its nat tables across DEL). Rules keep their
    /// order: it matters.
    pub fn nft_ruleset_sorted(&self) -> String {
        let text = self.nft_ruleset();
        let mut tables: Vec<String> = blocks(text.lines(), "table ")
            .into_iter()
            .map(|table| {
                let lines: Vec<&str> = table.lines().collect();
                let (head, body) = (lines[0], &lines[1..lines.len().saturating_sub(1)]);
                let mut chains = blocks(body.iter().copied().filter(|l| !l.is_empty()), "\t");
                chains.sort();
                format!("{head}\n{}}}\n", chains.concat())
            })
            .collect();
        tables.sort();
        tables.concat()
    }

    /// Everything any packet filter holds in this namespace: nftables, and the iptables view of
    /// both variants. nft renders iptables-nft's xtables targets inconsistently (a REDIRECT shows
    /// as `redirect to :PORT` in one table and as nothing in another, depending on history), so
    /// that rendering is dropped from the nft listing; the `-save` output carries the targets.
    pub fn firewall_state(&self) -> String {
        let mut state: String = self
            .nft_ruleset_sorted()
            .lines()
            .map(|l| match l.rfind(" redirect to :") {
                Some(at) if l[at + 14..].bytes().all(|b| b.is_ascii_digit()) => {
                    format!("{}\n", &l[..at + 1])
                }
                _ => format!("{l}\n"),
            })
            .collect();
        let tools = [
            "iptables-legacy-save",
            "ip6tables-legacy-save",
            "iptables-nft-save",
            "ip6tables-nft-save",
        ];
        for tool in tools {
            let out = self.exec(&[tool]);
            // Only rule lines matter: -save prints timestamps in comments.
            let text = String::from_utf8_lossy(&out.stdout);
            state.push_str(&format!("--- {tool}\n"));
            for line in text.lines().filter(|l| !l.starts_with('#')) {
                state.push_str(line);
                state.push('\n');
            }
        }
        state
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let file = File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Splits a listing into blocks, each starting at a line that begins with `opener` followed by a
/// non-blank character (a table, or a chain/set one tab deep).
fn blocks<'a>(lines: impl Iterator<Item = &'a str>, opener: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in lines {
        let opens = line.strip_prefix(opener).is_some_and(|rest| {
            rest.starts_with(|c: char| !c.is_whitespace()) && line.ends_with('{')
        });
        match out.last_mut() {
            Some(block) if !opens => {
                block.push_str(line);
                block.push('\n');
            }
            _ => out.push(format!("{line}\n")),
        }
    }
    out
}

/// A pod netns (`eth0`) and a peer netns (`veth0`) joined by veth, dual-stack.
pub struct Lab {
    pub pod: Netns,
    pub peer: Netns,
}

impl Lab {
    pub fn new() -> Lab {
        let pod = Netns::new("pod");
        let peer = Netns::new("peer");
        let host_side = format!("icv{}", NEXT.fetch_add(1, Ordering::SeqCst));
        // Create the pair inside the pod netns, then move one end: nothing touches the host netns.
        pod.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", &host_side,
        ]);
        pod.ip(&["link", "set", &host_side, "netns", &peer.name]);
        peer.ip(&["link", "set", &host_side, "name", "veth0"]);
        pod.ip(&["addr", "add", &format!("{POD_V4}/24"), "dev", "eth0"]);
        pod.ip(&[
            "addr",
            "add",
            &format!("{POD_V6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        peer.ip(&["addr", "add", &format!("{PEER_V4}/24"), "dev", "veth0"]);
        peer.ip(&[
            "addr",
            "add",
            &format!("{PEER_V6}/64"),
            "dev",
            "veth0",
            "nodad",
        ]);
        pod.ip(&["link", "set", "eth0", "up"]);
        peer.ip(&["link", "set", "veth0", "up"]);
        Lab { pod, peer }
    }

    /// The `prevResult` the primary plugin would have handed us, in `version`'s shape.
    pub fn prev_result(&self, version: &str) -> Value {
        let per_ip = |addr: String, gw: String, fam: &str| {
            let mut ip = json!({"address": addr, "gateway": gw, "interface": 0});
            if !version.starts_with('1') {
                ip["version"] = json!(fam);
            }
            ip
        };
        json!({
            "cniVersion": version,
            "interfaces": [{"name": "eth0", "sandbox": self.pod.path()}],
            "ips": [
                per_ip(format!("{POD_V4}/24"), PEER_V4.to_string(), "4"),
                per_ip(format!("{POD_V6}/64"), PEER_V6.to_string(), "6"),
            ],
        })
    }

    /// A complete plugin config (the runtime's view: name, cniVersion, prevResult added). It
    /// intercepts every pod unless `plugin` sets another `podSelection`.
    pub fn config(&self, version: &str, plugin: Value) -> Value {
        let mut conf = json!({
            "cniVersion": version,
            "name": "mesh",
            "type": "intercept-cni",
            "podSelection": "all",
            "prevResult": self.prev_result(version),
        });
        for (k, v) in plugin.as_object().expect("plugin settings are an object") {
            conf[k] = v.clone();
        }
        conf
    }

    pub fn cni(&self, command: &str, conf: &Value) -> CniAnswer {
        cni(command, Some(&self.pod.path()), conf)
    }
}

/// What the plugin answered.
#[derive(Debug)]
pub struct CniAnswer {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniAnswer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// Asserts success and returns the answer.
    pub fn ok(self) -> CniAnswer {
        assert!(
            self.success,
            "plugin failed: stdout={} stderr={}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts a CNI error with `code` and returns its JSON.
    pub fn error(&self, code: u64) -> Value {
        assert!(
            !self.success,
            "plugin succeeded, expected error {code}: {}",
            self.stdout
        );
        let j = self.json();
        assert_eq!(j["code"], code, "wrong error code: {j}");
        assert!(
            j["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "no msg: {j}"
        );
        j
    }
}

/// Runs the plugin binary exactly as a runtime does: CNI_* environment, config on stdin.
pub fn cni(command: &str, netns: Option<&str>, conf: &Value) -> CniAnswer {
    let run = run_plugin(command, netns, conf.to_string().as_bytes());
    CniAnswer {
        success: run.code == 0,
        stdout: run.stdout,
        stderr: run.stderr,
    }
}

/// One accepted connection: who connected and where it was originally going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub peer: SocketAddr,
    pub original_dst: SocketAddr,
}

/// A listener bound inside a namespace, accepting one connection in the background.
pub struct Listener {
    handle: JoinHandle<Option<Accepted>>,
}

impl Listener {
    /// Binds `addr` inside `ns` and waits (bounded) for one connection.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Listener {
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = ns.run(move || {
            let listener = TcpListener::bind(addr).expect("bind listener");
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            let deadline = Instant::now() + WAIT;
            while Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        return Some(Accepted {
                            peer,
                            original_dst: original_dst(&stream),
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
            None
        });
        ready_rx.recv_timeout(WAIT).expect("listener did not start");
        Listener { handle }
    }

    /// The connection it got, or None when nothing arrived in time.
    pub fn accepted(self) -> Option<Accepted> {
        self.handle.join().expect("listener thread")
    }
}

/// The destination the connection had before NAT (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST).
/// Without NAT the kernel answers ENOENT; then the local address is the original destination.
pub fn original_dst(stream: &TcpStream) -> SocketAddr {
    match stream.local_addr().unwrap() {
        SocketAddr::V4(_) => match getsockopt(stream, sockopt::OriginalDst) {
            Ok(sa) => SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))),
                u16::from_be(sa.sin_port),
            ),
            Err(_) => stream.local_addr().unwrap(),
        },
        SocketAddr::V6(_) => match getsockopt(stream, sockopt::Ip6tOriginalDst) {
            Ok(sa) => SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sa.sin6_addr.s6_addr)),
                u16::from_be(sa.sin6_port),
            ),
            Err(_) => stream.local_addr().unwrap(),
        },
    }
}

/// Who makes a connection: `None` is root; `Some((uid, gid))` another user, as the proxy is.
pub type User = Option<(u32, u32)>;

/// Connects from inside `ns` to `to` as `user` (per-thread credentials). Returns whether the TCP
/// handshake completed.
pub fn connect(ns: &Netns, to: SocketAddr, user: User) -> bool {
    ns.run(move || {
        if let Some((uid, gid)) = user {
            // Raw syscalls: they change only this thread's credentials, not the test process's.
            let rc = unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) };
            assert_eq!(rc, 0, "setresgid({gid}) failed");
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
            assert_eq!(rc, 0, "setresuid({uid}) failed");
        }
        TcpStream::connect_timeout(&to, WAIT).is_ok()
    })
    .join()
    .expect("connect thread")
}

/// Asserts that a connection from `from` to `to` lands on a listener at `at` in `listen_ns`,
/// which reads `to` as the original destination.
pub fn assert_lands(from: &Netns, to: SocketAddr, user: User, listen_ns: &Netns, at: SocketAddr) {
    let listener = Listener::start(listen_ns, at);
    assert!(
        connect(from, to, user),
        "connection to {to} failed (expected at {at})"
    );
    let got = listener
        .accepted()
        .unwrap_or_else(|| panic!("connection to {to} never reached the listener at {at}"));
    assert_eq!(
        got.original_dst, to,
        "original destination lost for connection to {to}"
    );
}

pub fn v4(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

pub fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(ip), port)
}

impl Lab {
    /// The pod's outbound connection to `to` (as `user`) lands on the proxy's loopback listener
    /// at `proxy_port`, which reads `to` as the original destination.
    pub fn outbound_to_proxy(&self, to: SocketAddr, user: User, proxy_port: u16) {
        let loopback = match to {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        assert_lands(
            &self.pod,
            to,
            user,
            &self.pod,
            SocketAddr::new(loopback, proxy_port),
        );
    }

    /// The pod's outbound connection to `to` (as `user`) reaches the peer untouched.
    pub fn outbound_direct(&self, to: SocketAddr, user: User) {
        assert_lands(&self.pod, to, user, &self.peer, to);
    }

    /// The peer's connection to the pod at `to` lands on the proxy at `proxy_port`, same address.
    pub fn inbound_to_proxy(&self, to: SocketAddr, proxy_port: u16) {
        assert_lands(
            &self.peer,
            to,
            None,
            &self.pod,
            SocketAddr::new(to.ip(), proxy_port),
        );
    }

    /// The peer's connection to the pod at `to` reaches the app untouched.
    pub fn inbound_direct(&self, to: SocketAddr) {
        assert_lands(&self.peer, to, None, &self.pod, to);
    }
}

/// One plugin run with its exit status, for the suites that check the protocol's promises.
#[derive(Debug)]
pub struct PluginRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the plugin as a runtime does, with raw config bytes (which may be anything).
pub fn run_plugin(command: &str, netns: Option<&str>, stdin: &[u8]) -> PluginRun {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_intercept-cni"));
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "ctr-0123456789abcdef")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=lab")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        cmd.env("CNI_NETNS", ns);
    }
    let mut child = cmd.spawn().expect("spawn the plugin");
    // The plugin may answer before reading stdin (bad environment); runtimes ignore EPIPE too.
    let written = child.stdin.take().expect("stdin").write_all(stdin);
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
    }
    let out = child.wait_with_output().expect("wait for the plugin");
    PluginRun {
        code: out
            .status
            .code()
            .unwrap_or_else(|| panic!("plugin killed by a signal: {:?}", out.status)),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl PluginRun {
    /// Asserts the protocol's promises for `command`: exit 0 or 1; no panic, caught (code 199)
    /// or printed; on success nothing on stdout for DEL/CHECK/STATUS/GC and one JSON object
    /// otherwise; on failure one JSON error object with cniVersion, code and msg. Returns the
    /// error code when it failed.
    pub fn protocol(&self, command: &str, context: &str) -> Option<u64> {
        assert!(
            !self.stderr.contains("panicked"),
            "{context}: a panic: {}",
            self.stderr
        );
        assert!(
            self.code == 0 || self.code == 1,
            "{context}: exit {}",
            self.code
        );
        if self.code == 0 && matches!(command, "DEL" | "CHECK" | "STATUS" | "GC") {
            assert_eq!(self.stdout, "", "{context}: {command} printed on success");
            return None;
        }
        let mut lines = self.stdout.lines();
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{context}: no answer; stderr: {}", self.stderr));
        assert_eq!(lines.next(), None, "{context}: more than one line");
        let answer: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{context}: answer is not JSON ({e}): {line}"));
        assert!(answer.is_object(), "{context}: answer is not an object");
        assert!(answer["cniVersion"].is_string(), "{context}: {answer}");
        if self.code == 0 {
            return None;
        }
        let code = answer["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("{context}: error without a code: {answer}"));
        assert_ne!(code, 199, "{context}: a panic was caught: {answer}");
        assert!(
            answer["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{context}: error without a msg: {answer}"
        );
        Some(code)
    }

    /// The error's JSON, asserting it failed with `code`.
    pub fn error(&self, command: &str, code: u64) -> Value {
        assert_eq!(
            self.protocol(command, command),
            Some(code),
            "stdout={} stderr={}",
            self.stdout,
            self.stderr
        );
        serde_json::from_str(self.stdout.trim()).expect("JSON error")
    }

    /// Asserts success.
    pub fn ok(&self, command: &str) -> &Self {
        assert_eq!(
            self.protocol(command, command),
            None,
            "stdout={} stderr={}",
            self.stdout,
            self.stderr
        );
        self
    }
}
