//! ADD/CHECK/DEL latency as a runtime sees it (spawn the binary with env + stdin, until it exits),
//! interleaved with the anchor's rule step (Istio's REDIRECT rule set applied by
//! `iptables-{nft,legacy}-restore`) and a bare `true` spawn as the floor; then parallel pod starts,
//! binary size and peak RSS. The plugin is spawned from the host netns, as a runtime does (it
//! enters the pod netns itself: that cost is in its figures); the anchor's restore and the floor
//! are spawned from a thread already inside the pod netns, as istio-cni spawns its restore after
//! its own setns, so the anchor's figures do not include entering the netns.
//!
//! `cargo bench --bench latency` (root). `-- --smoke` runs a few iterations, no thresholds.

use nix::sched::{setns, CloneFlags};
use serde_json::json;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PLUGIN: &str = env!("CARGO_BIN_EXE_intercept-cni");
const STATE_DIR: &str = "/run/intercept-cni-bench";

/// Istio's default REDIRECT-mode rule set, as its capture golden files show it.
const ISTIO_RULES: &str = "* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
";

struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("icni-bench-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip");
        assert!(ok.success(), "ip netns add {name} failed (root needed)");
        Netns { name }
    }
    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Spawns `argv` from a thread inside `ns` (from the host netns for `None`), feeding `stdin`;
/// returns wall time, success, and the child's peak RSS in KiB.
fn timed_spawn(
    ns: Option<&str>,
    argv: &[&str],
    env: &[(&str, String)],
    stdin: &str,
) -> (Duration, bool, i64) {
    let file = ns.map(|ns| File::open(ns).expect("open netns"));
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let stdin = stdin.to_string();
    std::thread::spawn(move || {
        if let Some(file) = file {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
        }
        let start = Instant::now();
        // Reaped by wait4 below, which also reports the child's peak RSS.
        #[allow(clippy::zombie_processes)]
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", argv[0]));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let mut status = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let pid = child.id() as libc::pid_t;
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        let elapsed = start.elapsed();
        assert_eq!(rc, pid, "wait4");
        let ok = std::process::ExitStatus::from_raw(status).success();
        (elapsed, ok, usage.ru_maxrss)
    })
    .join()
    .expect("spawn thread")
}

fn plugin_env(command: &str, ns: &str, id: usize) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", format!("bench-{id}")),
        ("CNI_NETNS", ns.to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", "/opt/cni/bin".to_string()),
    ]
}

fn plugin_config(backend: &str, ns: &str) -> String {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "bench",
        "type": "intercept-cni",
        "podSelection": "all",
        "stateDir": STATE_DIR,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": ns}],
            "ips": [
                {"address": "10.248.0.2/24", "interface": 0},
                {"address": "fd00:248::2/64", "interface": 0}
            ]
        }
    });
    match backend {
        "nftables" => conf["backend"] = json!("nftables"),
        "iptables-legacy" => {
            conf["backend"] = json!("iptables");
            conf["iptablesMode"] = json!("legacy");
        }
        "iptables-nft" => {
            conf["backend"] = json!("iptables");
            conf["iptablesMode"] = json!("nft");
        }
        other => panic!("unknown backend {other}"),
    }
    conf.to_string()
}

#[derive(Default)]
struct Series {
    name: String,
    samples: Vec<Duration>,
    failures: usize,
}

impl Series {
    fn new(name: &str) -> Series {
        Series {
            name: name.into(),
            ..Default::default()
        }
    }
    fn record(&mut self, (d, ok, _): (Duration, bool, i64)) {
        if ok {
            self.samples.push(d)
        } else {
            self.failures += 1
        }
    }
    fn pct(&self, p: f64) -> f64 {
        if self.samples.is_empty() {
            return f64::NAN;
        }
        let mut v: Vec<f64> = self.samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[idx]
    }
    fn row(&self) -> String {
        format!(
            "| {} | {:.3} | {:.3} | {:.3} | {} | {} |",
            self.name,
            self.pct(50.0),
            self.pct(90.0),
            self.pct(99.0),
            self.samples.len(),
            self.failures
        )
    }
}

fn tool(name: &str) -> Option<String> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| std::path::Path::new(p).exists())
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let (warmup, iterations, parallel) = if smoke { (1, 3, 5) } else { (5, 60, 50) };
    assert!(
        nix::unistd::geteuid().is_root(),
        "the benchmark needs root (network namespaces)"
    );
    std::fs::create_dir_all(STATE_DIR).unwrap();

    let backends = ["nftables", "iptables-legacy", "iptables-nft"];
    let mut add: Vec<Series> = backends
        .iter()
        .map(|b| Series::new(&format!("ADD {b}")))
        .collect();
    let mut check: Vec<Series> = backends
        .iter()
        .map(|b| Series::new(&format!("CHECK {b}")))
        .collect();
    let mut del: Vec<Series> = backends
        .iter()
        .map(|b| Series::new(&format!("DEL {b}")))
        .collect();
    let anchors = ["iptables-nft-restore", "iptables-legacy-restore"];
    let mut anchor: Vec<Series> = anchors
        .iter()
        .map(|a| Series::new(&format!("anchor: Istio rules via {a} --noflush")))
        .collect();
    let mut floor = Series::new("floor: spawn `true`");
    let true_bin = tool("true").expect("true");

    for i in 0..warmup + iterations {
        let keep = i >= warmup;
        for (b, backend) in backends.iter().enumerate() {
            let ns = Netns::new(&format!("{backend}-{i}"));
            let conf = plugin_config(backend, &ns.path());
            let a = timed_spawn(None, &[PLUGIN], &plugin_env("ADD", &ns.path(), i), &conf);
            let c = timed_spawn(None, &[PLUGIN], &plugin_env("CHECK", &ns.path(), i), &conf);
            let d = timed_spawn(None, &[PLUGIN], &plugin_env("DEL", &ns.path(), i), &conf);
            if keep {
                add[b].record(a);
                check[b].record(c);
                del[b].record(d);
            }
        }
        for (k, restore) in anchors.iter().enumerate() {
            let ns = Netns::new(&format!("anchor-{k}-{i}"));
            let bin = tool(restore).unwrap_or_else(|| panic!("{restore} not installed"));
            let r = timed_spawn(Some(&ns.path()), &[&bin, "--noflush"], &[], ISTIO_RULES);
            if keep {
                anchor[k].record(r);
            }
        }
        let ns = Netns::new(&format!("floor-{i}"));
        let f = timed_spawn(Some(&ns.path()), &[&true_bin], &[], "");
        if keep {
            floor.record(f);
        }
    }

    println!(
        "intercept-cni benchmark: {iterations} iterations after {warmup} warm-up, fresh netns each"
    );
    println!();
    println!("| case | p50 ms | p90 ms | p99 ms | n | failed |");
    println!("|---|---|---|---|---|---|");
    for s in add
        .iter()
        .chain(&check)
        .chain(&del)
        .chain(&anchor)
        .chain(std::iter::once(&floor))
    {
        println!("{}", s.row());
    }
    println!();
    let f50 = floor.pct(50.0);
    for (b, series) in add.iter().enumerate() {
        for a in &anchor {
            println!(
                "{} / {}: {:.2}x whole-process, {:.2}x above the spawn floor (p50)",
                backends[b],
                a.name.trim_start_matches("anchor: "),
                series.pct(50.0) / a.pct(50.0),
                (series.pct(50.0) - f50) / (a.pct(50.0) - f50)
            );
        }
    }

    let failed: usize = add
        .iter()
        .chain(&check)
        .chain(&del)
        .chain(&anchor)
        .map(|s| s.failures)
        .sum();
    parallel_starts(parallel);
    footprint();
    // Not a threshold: a failing call means the figures are not of working ADDs.
    if failed > 0 {
        eprintln!("{failed} timed calls failed; the figures above are not trustworthy");
        std::process::exit(1);
    }
}

/// N pods starting at once: every ADD in parallel, then every DEL.
fn parallel_starts(n: usize) {
    println!();
    for backend in ["nftables", "iptables-legacy", "iptables-nft"] {
        let namespaces: Vec<Netns> = (0..n)
            .map(|i| Netns::new(&format!("par-{backend}-{i}")))
            .collect();
        for command in ["ADD", "DEL"] {
            let start = Instant::now();
            let handles: Vec<_> = namespaces
                .iter()
                .enumerate()
                .map(|(i, ns)| {
                    let path = ns.path();
                    let conf = plugin_config(backend, &path);
                    std::thread::spawn(move || {
                        timed_spawn(None, &[PLUGIN], &plugin_env(command, &path, i), &conf)
                    })
                })
                .collect();
            let mut series = Series::new(&format!("parallel {command} {backend}"));
            for h in handles {
                series.record(h.join().unwrap());
            }
            let wall = start.elapsed().as_secs_f64();
            println!(
                "parallel {command} x{n} {backend}: {:.1} ms wall, {:.0} pods/s, p50 {:.2} ms, p99 {:.2} ms, {} failed",
                wall * 1e3,
                n as f64 / wall,
                series.pct(50.0),
                series.pct(99.0),
                series.failures
            );
        }
    }
}

fn footprint() {
    println!();
    let size = std::fs::metadata(PLUGIN).map(|m| m.len()).unwrap_or(0);
    println!(
        "binary size: {size} bytes ({:.2} MiB)",
        size as f64 / (1024.0 * 1024.0)
    );
    let ns = Netns::new("rss");
    let conf = plugin_config("nftables", &ns.path());
    let (_, ok, rss) = timed_spawn(None, &[PLUGIN], &plugin_env("ADD", &ns.path(), 0), &conf);
    println!(
        "peak RSS during ADD (nftables): {rss} KiB ({:.2} MiB){}",
        rss as f64 / 1024.0,
        if ok { "" } else { " [ADD FAILED]" }
    );
}
