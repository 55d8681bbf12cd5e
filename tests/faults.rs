//! Root only: the plugin under faults, through the real binary. The netns is not a namespace or
//! vanishes while ADD runs; the backend's binaries are missing; the kernel refuses a rule; the
//! plugin is SIGKILLed in the middle of ADD. Each time: a clear error (or success), and the
//! netns fully programmed or untouched, or brought there by the next ADD.

mod common;

use common::{cni, must, run_plugin, Lab, Netns};
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MODES: [&str; 2] = ["nft", "legacy"];

fn iptables(mode: &str) -> Value {
    json!({"backend": "iptables", "iptablesMode": mode})
}

/// Every backend, by the name its log lines use, with its config settings.
fn backends() -> [(&'static str, Value); 3] {
    [
        ("nftables", json!({"backend": "nftables"})),
        ("iptables-nft", iptables("nft")),
        ("iptables-legacy", iptables("legacy")),
    ]
}

/// Deterministic delays (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// The plugin started as a runtime starts it, in a process group of its own so the test can
/// tell when the iptables tools it started (and that outlive it when it is killed) are done.
fn spawn_add(netns: &str, conf: &Value) -> std::process::Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_intercept-cni"))
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "ctr-faults")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", netns)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn the plugin");
    // Killed before it read its input, the plugin leaves a broken pipe: fine.
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes());
    child
}

/// Waits until every process of the group `pgid` has exited. The test process is a child
/// subreaper (see `add_after_a_sigkilled_add_converges`), so the tools a killed plugin leaves
/// behind become its children and can be waited for.
fn wait_for_group(pgid: i32) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match waitpid(
            nix::unistd::Pid::from_raw(-pgid),
            Some(WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::StillAlive) => {
                assert!(
                    Instant::now() < deadline,
                    "process group {pgid} never ended"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => return,
            Err(e) => panic!("waitpid: {e}"),
        }
    }
}

#[test]
fn a_file_that_is_not_a_network_namespace_is_a_clear_error() {
    let lab = Lab::new();
    let plain = tempfile::NamedTempFile::new().expect("temp file");
    // A plain file (as a bind-mount target is once unmounted) and a namespace of another kind.
    let paths = [plain.path().to_str().expect("utf-8"), "/proc/self/ns/mnt"];
    for (path, (_, settings)) in paths.iter().flat_map(|p| backends().map(|b| (*p, b))) {
        let conf = lab.config("1.0.0", settings);
        for command in ["ADD", "CHECK"] {
            let r = run_plugin(command, Some(path), conf.to_string().as_bytes());
            let e = r.error(command, 5);
            let msg = e["msg"].as_str().unwrap_or_default();
            assert!(msg.contains(path), "{msg}");
            assert!(msg.contains("not a network namespace"), "{msg}");
        }
        run_plugin("DEL", Some(path), conf.to_string().as_bytes()).ok("DEL");
    }
}

/// The netns is deleted (unmounted and unlinked) at random moments while ADD runs. ADD holds
/// the namespace open once it has it, so it finishes there (the namespace dies with it) or
/// fails clearly because it never got it; either way, no panic and one answer.
#[test]
fn the_netns_vanishing_during_add_is_survived() {
    let mut rng = Rng(0x5EED_0001);
    let confs: Vec<(&str, Value)> = {
        let lab = Lab::new();
        backends()
            .into_iter()
            .map(|(name, settings)| (name, lab.config("1.0.0", settings)))
            .collect()
    };
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for round in 0..30 {
        let (name, conf) = &confs[round % confs.len()];
        let ns = Netns::new("vanish");
        let child = spawn_add(&ns.path(), conf);
        std::thread::sleep(Duration::from_micros(rng.below(4_000)));
        must("ip", &["netns", "del", &ns.name]);
        // Deleted already: the guard has nothing left to do.
        let ns_path = ns.path();
        std::mem::forget(ns);
        let out = child.wait_with_output().expect("wait");
        let r = common::PluginRun {
            code: out.status.code().expect("exit code"),
            stdout: String::from_utf8(out.stdout).expect("utf-8"),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        let code = r.protocol("ADD", &format!("{name} round {round}"));
        assert!(
            matches!(code, None | Some(5)),
            "round {round}: {} {}",
            r.stdout,
            r.stderr
        );
        *outcomes.entry(format!("{name} {code:?}")).or_default() += 1;
        assert!(!std::path::Path::new(&ns_path).exists());
    }
    eprintln!("vanishing netns outcomes: {outcomes:?}");
}

#[test]
fn missing_backend_binaries_are_named_and_the_netns_is_untouched() {
    let lab = Lab::new();
    for mode in MODES {
        lab.cni("ADD", &lab.config("1.0.0", iptables(mode))).ok();
    }
    let before = lab.pod.firewall_state();
    assert!(before.contains("ICNI_"));
    let empty = tempfile::tempdir().expect("temp dir");
    let dir = empty.path().to_str().expect("utf-8");
    for mode in MODES {
        let mut settings = iptables(mode);
        settings["iptablesPath"] = json!(dir);
        let conf = lab.config("1.0.0", settings);
        // DEL with such a config succeeds (teardown must not wedge) and changes nothing.
        let r = run_plugin("DEL", Some(&lab.pod.path()), conf.to_string().as_bytes());
        r.ok("DEL");
        assert_eq!(lab.pod.firewall_state(), before, "DEL {mode}");
        for command in ["ADD", "CHECK"] {
            let r = run_plugin(command, Some(&lab.pod.path()), conf.to_string().as_bytes());
            let e = r.error(command, 7);
            let msg = e["msg"].as_str().unwrap_or_default();
            assert!(msg.contains(dir), "{command}: {msg}");
            assert!(
                msg.contains(&format!("iptables-{mode}-")),
                "{command}: {msg}"
            );
            assert_eq!(lab.pod.firewall_state(), before, "{command} {mode}");
        }
    }
}

/// ADD starts each restore before its input is ready (the input needs -save on a netns with
/// rules): when working it out fails, the waiting restore is stopped, never fed, so nothing
/// changes.
#[test]
fn a_restore_started_before_its_input_failed_is_stopped_unfed() {
    let lab = Lab::new();
    let only_restore = tempfile::tempdir().expect("temp dir");
    let dir = only_restore.path().to_str().expect("utf-8");
    for mode in MODES {
        for family in ["iptables", "ip6tables"] {
            let name = format!("{family}-{mode}-restore");
            std::os::unix::fs::symlink(
                format!("/usr/sbin/{name}"),
                only_restore.path().join(&name),
            )
            .expect("symlink");
        }
    }
    let before = lab.pod.firewall_state();
    for mode in MODES {
        let mut settings = iptables(mode);
        settings["iptablesPath"] = json!(dir);
        let r = run_plugin(
            "ADD",
            Some(&lab.pod.path()),
            lab.config("1.0.0", settings).to_string().as_bytes(),
        );
        let e = r.error("ADD", 7);
        let msg = e["msg"].as_str().unwrap_or_default();
        assert!(msg.contains(&format!("-{mode}-save")), "{msg}");
        assert_eq!(lab.pod.firewall_state(), before, "{mode}");
    }
}

/// iptables-nft cannot change a native `ip6 nat` table whose base chain has another priority:
/// the IPv4 restore has succeeded by then and must be undone, so the netns is as it was.
#[test]
fn a_rule_the_kernel_refuses_leaves_the_netns_untouched() {
    let lab = Lab::new();
    let native = "table ip6 nat { chain PREROUTING { type nat hook prerouting priority -150; policy accept; }; }";
    let out = lab.pod.exec(&["nft", "add", native]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let native_table = || lab.pod.exec(&["nft", "list", "table", "ip6", "nat"]).stdout;
    let native_before = native_table();
    let r = run_plugin(
        "ADD",
        Some(&lab.pod.path()),
        lab.config("1.0.0", iptables("nft")).to_string().as_bytes(),
    );
    let e = r.error("ADD", 100);
    let msg = e["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("ip6tables-nft-restore"), "{msg}");
    assert!(msg.contains("nothing was changed"), "{msg}");
    // What iptables-nft made for IPv4 is undone; the shared `ip nat` table it created stays,
    // empty, as after any DEL (it is iptables's, not the plugin's).
    let after = lab.pod.firewall_state();
    assert_eq!(plugin_lines(&after), Vec::<&str>::new(), "{after}");
    assert_eq!(native_table(), native_before);
}

/// A table the kernel will not let the plugin touch: its own table name, created by another
/// netlink socket as that socket's own (`flags owner`). The one-batch ADD is refused whole:
/// nothing in the netns changes, and once the owner is gone ADD succeeds.
#[test]
fn an_nftables_batch_the_kernel_refuses_changes_nothing() {
    let lab = Lab::new();
    lab.pod.exec(&[
        "nft",
        "add",
        "table ip other { chain c { type filter hook input priority 0; tcp dport 22 accept; }; }",
    ]);
    let mut owner = Command::new("ip")
        .args(["netns", "exec", &lab.pod.name, "nft", "-i"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nft -i");
    let mut owner_input = owner.stdin.take().expect("stdin");
    owner_input
        .write_all(b"add table inet intercept-cni { flags owner; }\n")
        .expect("write to nft");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab.pod.nft_ruleset().contains("intercept-cni") {
        assert!(Instant::now() < deadline, "the owned table never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = lab.pod.firewall_state();
    let conf = lab.config("1.0.0", json!({"backend": "nftables"}));
    let r = run_plugin("ADD", Some(&lab.pod.path()), conf.to_string().as_bytes());
    let e = r.error("ADD", 100);
    assert!(
        e["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("owns the table"),
        "{e}"
    );
    assert_eq!(lab.pod.firewall_state(), before);

    drop(owner_input);
    owner.wait().expect("nft -i exits");
    lab.cni("ADD", &conf).ok();
    lab.cni("CHECK", &conf).ok();
    assert!(lab.pod.firewall_state().contains("table ip other"));
}

/// The lines that would redirect anything: the plugin's chains and any jump or redirect.
fn plugin_lines(state: &str) -> Vec<&str> {
    state
        .lines()
        .filter(|l| {
            l.contains("ICNI_")
                || l.contains("intercept")
                || l.contains("redirect")
                || l.contains("jump")
        })
        .collect()
}

/// SIGKILL at random moments of ADD (the iptables tools it started run on to their end), then
/// a new ADD: the netns ends up exactly as after one clean ADD, for every backend. nftables
/// never shows half an ADD even when killed; iptables may (one restore per family) until the
/// next ADD.
#[test]
fn add_after_a_sigkilled_add_converges() {
    nix::sys::prctl::set_child_subreaper(true).expect("become a child subreaper");
    let mut rng = Rng(0x5EED_0002);
    for (mode, settings) in backends() {
        let lab = Lab::new();
        let conf = lab.config("1.0.0", settings);
        // Each round starts after a DEL, which leaves iptables's shared nat tables (empty)
        // behind; the reference has the same history, so chains list in the same order.
        let reference = {
            let clean = Netns::new("ref");
            for command in ["ADD", "DEL", "ADD"] {
                cni(command, Some(&clean.path()), &conf).ok();
            }
            clean.firewall_state()
        };
        // Kills land within the quickest of a few clean ADDs, so most hit one mid-way.
        let add_time = (0..3)
            .map(|_| {
                lab.cni("DEL", &conf).ok();
                let started = Instant::now();
                lab.cni("ADD", &conf).ok();
                started.elapsed().as_micros() as u64
            })
            .min()
            .unwrap_or(1000);
        assert_eq!(lab.pod.firewall_state(), reference, "{mode}: clean ADD");
        lab.cni("DEL", &conf).ok();
        let untouched = lab.pod.firewall_state();
        let mut interrupted = 0;
        let mut partial = 0;
        for round in 0..20 {
            lab.cni("DEL", &conf).ok();
            let child = spawn_add(&lab.pod.path(), &conf);
            let pgid = child.id() as i32;
            std::thread::sleep(Duration::from_micros(rng.below(add_time * 9 / 10)));
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let out = child.wait_with_output().expect("wait");
            if out.status.code().is_none() {
                interrupted += 1;
            }
            wait_for_group(pgid);
            let left = lab.pod.firewall_state();
            if left != untouched && left != reference {
                partial += 1;
                // One netlink batch: the kernel applies all of it or none, killed or not.
                assert_ne!(mode, "nftables", "round {round}: half a batch: {left}");
            }
            lab.cni("ADD", &conf).ok();
            assert_eq!(
                lab.pod.firewall_state(),
                reference,
                "{mode} round {round}: not converged"
            );
            lab.cni("CHECK", &conf).ok();
        }
        eprintln!("{mode}: {interrupted} of 20 ADDs killed, {partial} left partial rules");
        assert!(interrupted >= 5, "{mode}: too few ADDs were interrupted");
    }
}

/// Runs the plugin with `CNI_NETNS=netns`, failing the test (not hanging it) when it does not
/// answer within 10 s. `enter`: a netns file the plugin is started inside of.
fn run_bounded(
    command: &str,
    netns: &str,
    conf: &Value,
    enter: Option<std::fs::File>,
) -> common::PluginRun {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_intercept-cni"));
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "ctr-faults")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_NETNS", netns)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(file) = enter {
        // SAFETY: only setns runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
    }
    let mut child = cmd.spawn().expect("spawn the plugin");
    let _ = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes());
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("{command} on {netns}: no answer after 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("output");
    common::PluginRun {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A FIFO, a device or a directory as `CNI_NETNS` is never opened for reading as if it were a
/// namespace: ADD and CHECK answer code 5 at once naming what it is, DEL succeeds (nothing of
/// ours can be there), and nobody hangs.
#[test]
fn a_fifo_or_device_as_netns_is_refused_without_hanging() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let fifo = dir.path().join("netns-fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let fifo = fifo.to_str().unwrap().to_string();
    let dir_path = dir.path().to_str().unwrap().to_string();
    let socket = dir.path().join("netns-socket");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let socket = socket.to_str().unwrap().to_string();
    // The pod's real netns file with a trailing slash: a path through a file.
    let through_file = format!("{}/", lab.pod.path());
    for (path, what) in [
        (fifo.as_str(), "FIFO"),
        ("/dev/zero", "device"),
        (dir_path.as_str(), "directory"),
        (socket.as_str(), "socket"),
        (through_file.as_str(), "a path through a file"),
    ] {
        for (_, settings) in backends() {
            let conf = lab.config("1.0.0", settings);
            for command in ["ADD", "CHECK"] {
                let r = run_bounded(command, path, &conf, None);
                let e = r.error(command, 5);
                let msg = e["msg"].as_str().unwrap_or_default();
                assert!(
                    msg.contains("not a network namespace") && msg.contains(what),
                    "{msg}"
                );
            }
            run_bounded("DEL", path, &conf, None).ok("DEL");
        }
    }
}

/// Deletes our table from the host's netns should a broken build have put one there.
struct HostTableGuard;

impl Drop for HostTableGuard {
    fn drop(&mut self) {
        let listed = Command::new("nft")
            .args(["list", "table", "inet", "intercept-cni"])
            .output();
        if listed.is_ok_and(|o| o.status.success()) {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", "intercept-cni"])
                .status();
        }
    }
}

/// A plugin started from inside another netns still recognises the node's: the host netns (PID
/// 1's, or the initial one) is refused with code 102 even though it is not the plugin's own.
#[test]
fn the_hosts_netns_is_refused_from_inside_another_netns() {
    let lab = Lab::new();
    // Should the refusal fail, the rules would touch nothing real: one unused inbound port and
    // outbound only to TEST-NET-1.
    let conf = lab.config(
        "1.0.0",
        json!({
            "backend": "nftables",
            "includeInboundPorts": ["9"],
            "includeOutboundCIDRs": ["192.0.2.0/24"],
        }),
    );
    let _guard = HostTableGuard;
    let host = format!("/proc/{}/ns/net", std::process::id());
    for command in ["ADD", "CHECK"] {
        let inside = std::fs::File::open(lab.pod.path()).expect("pod netns");
        let r = run_bounded(command, &host, &conf, Some(inside));
        let e = r.error(command, 102);
        assert!(
            e["msg"].as_str().unwrap_or_default().contains("host"),
            "{e}"
        );
    }
    let inside = std::fs::File::open(lab.pod.path()).expect("pod netns");
    run_bounded("DEL", &host, &conf, Some(inside)).ok("DEL");
    let listed = Command::new("nft")
        .args(["list", "table", "inet", "intercept-cni"])
        .output()
        .expect("nft");
    assert!(!listed.status.success(), "the host's netns was programmed");
}
