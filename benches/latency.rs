//! ADD/CHECK/DEL latency as a runtime sees it (spawn the binary with env + stdin, until it exits),
//! interleaved with the anchor's rule step (Istio's REDIRECT rule set applied by
//! `iptables-{nft,legacy}-restore`), with the bare restores our iptables backend wraps (fed what
//! our ADD feeds them for the same pod, one family and both side by side) and with a bare `true` spawn as the floor; then
//! parallel pod starts, binary size and peak RSS.
//!
//! The plugin is spawned from the host netns, as a runtime does (entering the pod netns is in its
//! figures); the anchor, the bare restores and the floor are spawned from a thread already inside
//! the pod netns, as istio-cni spawns its restore after its own setns. Every timed call gets a
//! fresh netns, all made before the first timed call and deleted after the last, so the kernel's
//! asynchronous netns clean-up does not run under the measurements; the order of the cases
//! rotates from one iteration to the next so that none always follows the same one, and the
//! DELs of an iteration come after all its other calls (see `main`).
//!
//! `scripts/bench` (root) builds the binary as it ships (static) and runs this;
//! `-- --smoke` runs a few iterations. It reports and never fails on a threshold; it exits 1 only
//! when a timed call failed, since the figures would then not be of working calls.

use intercept_cni::backend::iptables::fresh_restore_inputs;
use intercept_cni::cmd;
use intercept_cni::cni::env::{CniEnv, Command as CniCommand};
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

/// What our iptables backend feeds the IPv4 and IPv6 restores when it ADDs the benchmark's pod
/// to a fresh netns, from the plugin's own planner and renderer: the bare restores time the very
/// rules the ADD rows install.
fn our_restore_inputs(dual_stack: bool) -> [Option<String>; 2] {
    let conf = plugin_config("iptables-nft", "/run/netns/bench-render", dual_stack);
    let env: Vec<(&str, String)> = plugin_env("ADD", "/run/netns/bench-render", 0);
    let env = CniEnv::read(CniCommand::Add, |name| {
        env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.into())
    })
    .expect("the benchmark's CNI environment");
    let (_, plan) = cmd::decide(&env, conf.as_bytes(), &mut cmd::Trace::default())
        .expect("the benchmark's config");
    fresh_restore_inputs(&plan.expect("the benchmark's pod is intercepted"))
}

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

/// One timed call: wall time, success, and the child's peak RSS in KiB.
type Timed = (Duration, bool, i64);

/// One process to spawn: argv, environment (nothing else is inherited) and stdin.
struct Call {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    stdin: String,
}

impl Call {
    fn new(argv: &[&str], env: &[(&str, String)], stdin: &str) -> Call {
        Call {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            stdin: stdin.to_string(),
        }
    }
}

/// Spawns `argv` from a thread inside `ns` (from the host netns for `None`), feeding `stdin`.
fn timed_spawn(ns: Option<&str>, argv: &[&str], env: &[(&str, String)], stdin: &str) -> Timed {
    timed_spawn_all(ns, vec![Call::new(argv, env, stdin)])
}

/// Spawns every call at once from a thread inside `ns` and times until the last exits; the
/// peak RSS reported is the largest.
fn timed_spawn_all(ns: Option<&str>, calls: Vec<Call>) -> Timed {
    let file = ns.map(|ns| File::open(ns).expect("open netns"));
    std::thread::spawn(move || {
        if let Some(file) = file {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
        }
        let start = Instant::now();
        let children: Vec<_> = calls
            .iter()
            .map(|call| {
                // Reaped by wait4 below, which also reports the child's peak RSS.
                #[allow(clippy::zombie_processes)]
                let mut child = Command::new(&call.argv[0])
                    .args(&call.argv[1..])
                    .env_clear()
                    .envs(call.env.iter().cloned())
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("spawn {}: {e}", call.argv[0]));
                let mut pipe = child.stdin.take().unwrap();
                pipe.write_all(call.stdin.as_bytes()).unwrap();
                drop(pipe);
                child
            })
            .collect();
        let mut all_ok = true;
        let mut peak_rss = 0;
        for child in children {
            let mut status = 0;
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            let pid = child.id() as libc::pid_t;
            let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            assert_eq!(rc, pid, "wait4");
            all_ok &= std::process::ExitStatus::from_raw(status).success();
            peak_rss = peak_rss.max(usage.ru_maxrss);
        }
        (start.elapsed(), all_ok, peak_rss)
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

fn plugin_config(backend: &str, ns: &str, dual_stack: bool) -> String {
    plugin_config_sized(backend, ns, dual_stack, 0)
}

/// `n` IPv4 and `n` IPv6 CIDRs, every other /24 or /48 so that none merge.
fn policy_cidrs(n: usize) -> (Vec<String>, Vec<String>) {
    let v4 = (0..n)
        .map(|i| {
            format!(
                "{}.{}.{}.0/24",
                100 + 2 * i / 65536,
                2 * i / 256 % 256,
                2 * i % 256
            )
        })
        .collect();
    let v6 = (0..n).map(|i| format!("fd10:{:x}::/48", 2 * i)).collect();
    (v4, v6)
}

/// `n` port ranges of two ports, every fourth port from 20000 (clear of the proxy's ports).
fn policy_ports(n: usize) -> Vec<(usize, usize)> {
    (0..n).map(|i| (20000 + 4 * i, 20001 + 4 * i)).collect()
}

/// The plugin's config excluding `n` CIDRs per family and `n` outbound port ranges.
fn plugin_config_sized(backend: &str, ns: &str, dual_stack: bool, n: usize) -> String {
    let mut ips = vec![json!({"address": "10.248.0.2/24", "interface": 0})];
    if dual_stack {
        ips.push(json!({"address": "fd00:248::2/64", "interface": 0}));
    }
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "bench",
        "type": "intercept-cni",
        "podSelection": "all",
        "stateDir": STATE_DIR,
        // A default Istio sidecar pod (istio-cni's rule set); dual-stack when it has IPv6.
        "dualStack": dual_stack,
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {
            "sidecar.istio.io/status": r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"]}"#
        }},
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": ns}],
            "ips": ips
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
    if n > 0 {
        let (mut cidrs, v6) = policy_cidrs(n);
        if dual_stack {
            cidrs.extend(v6);
        }
        let ports: Vec<String> = policy_ports(n)
            .iter()
            .map(|(a, b)| format!("{a}-{b}"))
            .collect();
        conf["excludeOutboundCIDRs"] = json!(cidrs);
        conf["excludeOutboundPorts"] = json!(ports);
    }
    conf.to_string()
}

/// Istio's rules for one family with the same exclusions as `plugin_config_sized(.., n)`: one
/// `RETURN` rule per CIDR and per port range in ISTIO_OUTPUT, as istio-iptables writes them.
fn istio_rules_sized(n: usize, v6: bool) -> String {
    let mut rules = if v6 {
        ISTIO_RULES
            .replace("127.0.0.6/32", "::6/128")
            .replace("127.0.0.1/32", "::1/128")
    } else {
        ISTIO_RULES.to_string()
    };
    // Before the final jump to the redirect, where istio-iptables appends its exclusions.
    let at = rules.find("-A ISTIO_OUTPUT -j ISTIO_REDIRECT").unwrap();
    let mut extra = String::new();
    let (v4_cidrs, v6_cidrs) = policy_cidrs(n);
    for (a, b) in policy_ports(n) {
        extra.push_str(&format!(
            "-A ISTIO_OUTPUT -p tcp --dport {a}:{b} -j RETURN\n"
        ));
    }
    for cidr in if v6 { v6_cidrs } else { v4_cidrs } {
        extra.push_str(&format!("-A ISTIO_OUTPUT -d {cidr} -j RETURN\n"));
    }
    rules.insert_str(at, &extra);
    rules
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
    fn record(&mut self, (d, ok, _): Timed) {
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
    fn p50(&self) -> f64 {
        self.pct(50.0)
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

fn tool(name: &str) -> String {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| panic!("{name} not installed"))
}

const BACKENDS: [&str; 3] = ["nftables", "iptables-legacy", "iptables-nft"];
const MODES: [&str; 2] = ["nft", "legacy"];

/// One thing timed in every iteration, on a netns of its own.
#[derive(Clone, Copy)]
enum Case {
    /// ADD, CHECK and DEL of one pod: backend index, dual-stack or IPv4 only.
    Plugin(usize, bool),
    /// Istio's rules through `iptables-<mode>-restore`: mode index.
    Anchor(usize),
    /// Our default rules through the bare restore(s): mode index, both families side by side.
    Bare(usize, bool),
    Floor,
    /// Our binary answering VERSION: its process start and exit, with no work.
    Version,
}

struct Results {
    add: Vec<Series>,
    check: Vec<Series>,
    del: Vec<Series>,
    anchor: Vec<Series>,
    bare: Vec<Series>,
    floor: Series,
    version: Series,
}

fn stack(dual: bool) -> &'static str {
    if dual {
        "dual-stack"
    } else {
        "IPv4"
    }
}

impl Results {
    fn new() -> Results {
        let per_plugin = |verb: &str| {
            let mut v = Vec::new();
            for dual in [true, false] {
                for b in BACKENDS {
                    v.push(Series::new(&format!("{verb} {b} ({})", stack(dual))));
                }
            }
            v
        };
        let mut bare = Vec::new();
        for dual in [true, false] {
            for mode in MODES {
                let what = if dual {
                    format!("ip(6)tables-{mode}-restore, side by side")
                } else {
                    format!("iptables-{mode}-restore")
                };
                bare.push(Series::new(&format!("bare: our rules via {what}")));
            }
        }
        Results {
            add: per_plugin("ADD"),
            check: per_plugin("CHECK"),
            del: per_plugin("DEL"),
            anchor: MODES
                .iter()
                .map(|m| Series::new(&format!("anchor: Istio rules via iptables-{m}-restore")))
                .collect(),
            bare,
            floor: Series::new("floor: spawn `true`"),
            version: Series::new("our process alone: VERSION (start, answer, exit)"),
        }
    }

    fn plugin_index(backend: usize, dual: bool) -> usize {
        backend + if dual { 0 } else { BACKENDS.len() }
    }

    fn bare_index(mode: usize, dual: bool) -> usize {
        mode + if dual { 0 } else { MODES.len() }
    }

    fn all(&self) -> impl Iterator<Item = &Series> {
        self.add
            .iter()
            .chain(&self.check)
            .chain(&self.del)
            .chain(&self.anchor)
            .chain(&self.bare)
            .chain([&self.floor, &self.version])
    }
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for dual in [true, false] {
        for b in 0..BACKENDS.len() {
            cases.push(Case::Plugin(b, dual));
        }
        for m in 0..MODES.len() {
            cases.push(Case::Bare(m, dual));
        }
    }
    for m in 0..MODES.len() {
        cases.push(Case::Anchor(m));
    }
    cases.push(Case::Floor);
    cases.push(Case::Version);
    cases
}

/// The bare restores' inputs: `[dual-stack, IPv4 only]`, each IPv4's and IPv6's.
type BareInputs = [[Option<String>; 2]; 2];

fn run_case(
    case: Case,
    ns: &str,
    id: usize,
    inputs: &BareInputs,
    results: &mut Results,
    keep: bool,
) {
    match case {
        Case::Plugin(b, dual) => {
            let conf = plugin_config(BACKENDS[b], ns, dual);
            let call = |verb| timed_spawn(None, &[PLUGIN], &plugin_env(verb, ns, id), &conf);
            let (a, c) = (call("ADD"), call("CHECK"));
            if keep {
                let i = Results::plugin_index(b, dual);
                results.add[i].record(a);
                results.check[i].record(c);
            }
        }
        Case::Anchor(m) => {
            let restore = tool(&format!("iptables-{}-restore", MODES[m]));
            let r = timed_spawn(Some(ns), &[&restore, "--noflush"], &[], ISTIO_RULES);
            if keep {
                results.anchor[m].record(r);
            }
        }
        Case::Bare(m, dual) => {
            let calls = ["iptables", "ip6tables"]
                .iter()
                .zip(&inputs[usize::from(!dual)])
                .filter_map(|(tool_prefix, input)| {
                    let restore = tool(&format!("{tool_prefix}-{}-restore", MODES[m]));
                    Some(Call::new(&[&restore, "--noflush"], &[], input.as_deref()?))
                })
                .collect();
            let r = timed_spawn_all(Some(ns), calls);
            if keep {
                results.bare[Results::bare_index(m, dual)].record(r);
            }
        }
        Case::Version => {
            let env = [("CNI_COMMAND", "VERSION".to_string())];
            let r = timed_spawn(None, &[PLUGIN], &env, r#"{"cniVersion":"1.0.0"}"#);
            if keep {
                results.version.record(r);
            }
        }
        Case::Floor => {
            let r = timed_spawn(Some(ns), &[&tool("true")], &[], "");
            if keep {
                results.floor.record(r);
            }
        }
    }
}

/// DEL for a pod that `run_case` added.
fn run_del(case: Case, ns: &str, id: usize, results: &mut Results, keep: bool) {
    if let Case::Plugin(b, dual) = case {
        let conf = plugin_config(BACKENDS[b], ns, dual);
        let d = timed_spawn(None, &[PLUGIN], &plugin_env("DEL", ns, id), &conf);
        if keep {
            results.del[Results::plugin_index(b, dual)].record(d);
        }
    }
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let (warmup, iterations, parallel) = if smoke { (1, 3, 5) } else { (5, 60, 50) };
    assert!(
        nix::unistd::geteuid().is_root(),
        "the benchmark needs root (network namespaces)"
    );
    std::fs::create_dir_all(STATE_DIR).unwrap();
    println!("intercept-cni benchmark: {}", describe_binary());

    let cases = cases();
    let inputs = [our_restore_inputs(true), our_restore_inputs(false)];
    let namespaces: Vec<Vec<Netns>> = (0..warmup + iterations)
        .map(|i| {
            (0..cases.len())
                .map(|c| Netns::new(&format!("{i}-{c}")))
                .collect()
        })
        .collect();
    let mut results = Results::new();
    for (i, spaces) in namespaces.iter().enumerate() {
        let order: Vec<usize> = (0..cases.len()).map(|k| (i + k) % cases.len()).collect();
        for &c in &order {
            run_case(
                cases[c],
                &spaces[c].path(),
                i,
                &inputs,
                &mut results,
                i >= warmup,
            );
        }
        // Deleting hooked tables leaves the kernel work to finish after DEL returns (grace
        // periods, freeing); the DELs come after every other case, and the next iteration
        // after a pause, so that this work does not land on some cases and not on others.
        for &c in &order {
            run_del(cases[c], &spaces[c].path(), i, &mut results, i >= warmup);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(namespaces);

    println!(
        "{iterations} iterations after {warmup} warm-up, a fresh netns for every case, case order rotating"
    );
    println!();
    println!("| case | p50 ms | p90 ms | p99 ms | n | failed |");
    println!("|---|---|---|---|---|---|");
    for s in results.all() {
        println!("{}", s.row());
    }
    let mut failed: usize = results.all().map(|s| s.failures).sum();
    println!();
    let rss = footprint();
    parallel_starts(parallel);
    let sizes = size_table(smoke);
    failed += sizes.failures;
    failed += if smoke { burst(16, 8) } else { burst(110, 16) };
    targets(&results, rss, &sizes);
    // Not a threshold: a failing call means the figures are not of working calls.
    if failed > 0 {
        eprintln!("{failed} timed calls failed; the figures above are not trustworthy");
        std::process::exit(1);
    }
}

/// The issue's targets, each with its figure and whether this run met it.
fn targets(r: &Results, rss_kib: i64, sizes: &SizeFigures) {
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    let floor = r.floor.p50();
    let nft_add = r.add[Results::plugin_index(0, true)].p50();
    println!();
    println!("targets (p50):");
    println!(
        "- nftables ADD (dual-stack) {nft_add:.3} ms, target <= 1.5 ms: {}",
        verdict(nft_add <= 1.5)
    );
    for (m, anchor) in r.anchor.iter().enumerate() {
        let whole = nft_add / anchor.p50();
        let above = (nft_add - floor) / (anchor.p50() - floor);
        let binding = MODES[m] == "nft";
        println!(
            "- nftables ADD / Istio rules via iptables-{}-restore: {whole:.2}x whole-process{}, {above:.2}x above the floor{}",
            MODES[m],
            if binding { format!(" (target <= 0.5: {})", verdict(whole <= 0.5)) } else { String::new() },
            if binding { format!(" (target <= 0.25: {})", verdict(above <= 0.25)) } else { String::new() },
        );
    }
    for dual in [true, false] {
        for (m, mode) in MODES.iter().enumerate() {
            let b = BACKENDS
                .iter()
                .position(|b| *b == format!("iptables-{mode}"))
                .unwrap();
            let ours = r.add[Results::plugin_index(b, dual)].p50();
            let bare = r.bare[Results::bare_index(m, dual)].p50();
            let anchor = r.anchor[m].p50();
            println!(
                "- iptables-{mode} ADD ({}) {ours:.3} ms = bare restore(s) of the same rules {bare:.3} ms {:+.3} ms (target <= +1 ms: {}); Istio's rules via the bare restore {anchor:.3} ms {:+.3} ms",
                stack(dual),
                ours - bare,
                verdict(ours - bare <= 1.0),
                ours - anchor,
            );
        }
    }
    println!(
        "- peak RSS during ADD {:.2} MiB, target <= 8 MiB: {}",
        rss_kib as f64 / 1024.0,
        verdict(rss_kib <= 8 * 1024)
    );
    println!(
        "- nftables ADD with 1000 CIDRs per family + 1000 port ranges / Istio's rules with the same exclusions via iptables-nft-restore: {:.2}x (target <= 0.5: {})",
        sizes.nft_vs_istio_1000,
        verdict(sizes.nft_vs_istio_1000 <= 0.5)
    );
    let (rss, n) = sizes.rss_largest;
    println!(
        "- peak RSS during nftables ADD at {n} CIDRs per family: {:.2} MiB, target <= 8 MiB (at 10000): {}",
        rss as f64 / 1024.0,
        verdict(rss <= 8 * 1024)
    );
}

/// Policy sizes of the cost-versus-policy-size table: CIDRs per family, and as many port ranges.
const SIZES: [usize; 5] = [0, 10, 100, 1000, 10000];

/// What the targets need from the size table.
struct SizeFigures {
    /// nftables ADD / Istio's rules via iptables-nft-restore at 1000, p50s.
    nft_vs_istio_1000: f64,
    /// Peak RSS (KiB) of an nftables ADD at the largest size, and that size.
    rss_largest: (i64, usize),
    failures: usize,
}

/// Cost versus policy size: ADD and CHECK (dual-stack) of each backend excluding `n` CIDRs per
/// family and `n` port ranges, against Istio's rules with the same exclusions through each
/// restore (both families side by side). Fresh netns per call, order rotating, DELs after.
fn size_table(smoke: bool) -> SizeFigures {
    let sizes: &[usize] = if smoke { &[0, 1000] } else { &SIZES };
    let mut figures = SizeFigures {
        nft_vs_istio_1000: f64::NAN,
        rss_largest: (0, 0),
        failures: 0,
    };
    println!();
    println!("cost versus policy size (dual-stack; n CIDRs per family + n outbound port ranges; p50 ms):");
    println!();
    println!("| n | nftables ADD | nftables CHECK | iptables-nft ADD | iptables-nft CHECK | iptables-legacy ADD | iptables-legacy CHECK | Istio via iptables-nft-restore | Istio via iptables-legacy-restore | nftables ADD / Istio nft |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    const ANCHORS: usize = 2;
    for &n in sizes {
        let (warmup, iterations) = match (smoke, n) {
            (true, _) => (0, 1),
            (false, 10000) => (1, 5),
            (false, _) => (2, 15),
        };
        let mut add: Vec<Series> = BACKENDS.iter().map(|b| Series::new(b)).collect();
        let mut check: Vec<Series> = BACKENDS.iter().map(|b| Series::new(b)).collect();
        let mut anchor: Vec<Series> = MODES.iter().map(|m| Series::new(m)).collect();
        let cases = BACKENDS.len() + ANCHORS;
        for i in 0..warmup + iterations {
            let keep = i >= warmup;
            let spaces: Vec<Netns> = (0..cases)
                .map(|c| Netns::new(&format!("size{n}-{i}-{c}")))
                .collect();
            for k in 0..cases {
                let c = (i + k) % cases;
                let ns = spaces[c].path();
                if c < BACKENDS.len() {
                    let conf = plugin_config_sized(BACKENDS[c], &ns, true, n);
                    let call =
                        |verb| timed_spawn(None, &[PLUGIN], &plugin_env(verb, &ns, i), &conf);
                    let (a, k) = (call("ADD"), call("CHECK"));
                    if BACKENDS[c] == "nftables" && n == *sizes.last().unwrap() {
                        figures.rss_largest = (figures.rss_largest.0.max(a.2), n);
                    }
                    if keep {
                        add[c].record(a);
                        check[c].record(k);
                    }
                } else {
                    let m = c - BACKENDS.len();
                    let calls = [false, true]
                        .iter()
                        .map(|&v6| {
                            let ip = if v6 { "ip6tables" } else { "iptables" };
                            let restore = tool(&format!("{ip}-{}-restore", MODES[m]));
                            Call::new(&[&restore, "--noflush"], &[], &istio_rules_sized(n, v6))
                        })
                        .collect();
                    let r = timed_spawn_all(Some(&ns), calls);
                    if keep {
                        anchor[m].record(r);
                    }
                }
            }
            for (c, backend) in BACKENDS.iter().enumerate() {
                let ns = spaces[c].path();
                let conf = plugin_config_sized(backend, &ns, true, n);
                let (_, ok, _) = timed_spawn(None, &[PLUGIN], &plugin_env("DEL", &ns, i), &conf);
                figures.failures += usize::from(!ok);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let p = |s: &Series| {
            if s.failures > 0 {
                format!("{:.3} ({} failed)", s.p50(), s.failures)
            } else {
                format!("{:.3}", s.p50())
            }
        };
        let ratio = add[0].p50() / anchor[0].p50();
        if n == 1000 {
            figures.nft_vs_istio_1000 = ratio;
        }
        figures.failures += add
            .iter()
            .chain(&check)
            .chain(&anchor)
            .map(|s| s.failures)
            .sum::<usize>();
        println!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {ratio:.2} |",
            p(&add[0]),
            p(&check[0]),
            p(&add[2]),
            p(&check[2]),
            p(&add[1]),
            p(&check[1]),
            p(&anchor[0]),
            p(&anchor[1]),
        );
    }
    figures
}

/// Whether the plugin left anything of its own in `ns` after DEL.
fn leftovers(backend: &str, ns: &Netns) -> bool {
    let run = |argv: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(argv)
            .output()
            .expect("ip netns exec")
    };
    if backend == "nftables" {
        let out = run(&["nft", "list", "tables"]);
        return String::from_utf8_lossy(&out.stdout).contains("intercept-cni");
    }
    let mode = backend.trim_start_matches("iptables-");
    ["iptables", "ip6tables"].iter().any(|ip| {
        let out = run(&[&format!("{ip}-{mode}-save"), "-t", "nat"]);
        String::from_utf8_lossy(&out.stdout).contains("ICNI_")
    })
}

/// A node's worth of pods: `pods` ADDs (dual-stack, default policy), `concurrency` at a time
/// as a runtime's workers would, then their DELs the same way; per backend, per-call p50/p99,
/// pods/s, and whether any netns kept something. Returns the failed calls and leftovers.
fn burst(pods: usize, concurrency: usize) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    println!();
    println!("{pods} pods, {concurrency} at a time (dual-stack, default policy):");
    println!();
    println!("| backend | verb | p50 ms | p99 ms | pods/s | failed |");
    println!("|---|---|---|---|---|---|");
    let mut bad = 0;
    for backend in BACKENDS {
        let namespaces: Vec<Netns> = (0..pods)
            .map(|i| Netns::new(&format!("burst-{backend}-{i}")))
            .collect();
        for command in ["ADD", "DEL"] {
            let next = AtomicUsize::new(0);
            let series = Mutex::new(Series::new(command));
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..concurrency {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(ns) = namespaces.get(i) else { break };
                        let path = ns.path();
                        let conf = plugin_config(backend, &path, true);
                        let r = timed_spawn(None, &[PLUGIN], &plugin_env(command, &path, i), &conf);
                        series.lock().unwrap().record(r);
                    });
                }
            });
            let wall = start.elapsed().as_secs_f64();
            let series = series.into_inner().unwrap();
            bad += series.failures;
            println!(
                "| {backend} | {command} | {:.2} | {:.2} | {:.0} | {} |",
                series.pct(50.0),
                series.pct(99.0),
                pods as f64 / wall,
                series.failures
            );
        }
        let left = namespaces
            .iter()
            .filter(|ns| leftovers(backend, ns))
            .count();
        if left > 0 {
            println!("{backend}: {left} netns kept rules after DEL");
        }
        bad += left;
    }
    bad
}

/// N pods starting at once: every ADD in parallel, then every DEL.
fn parallel_starts(n: usize) {
    println!();
    for backend in BACKENDS {
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
                    let conf = plugin_config(backend, &path, true);
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

/// Binary size and the peak RSS of an ADD (KiB, returned).
fn footprint() -> i64 {
    let size = std::fs::metadata(PLUGIN).map(|m| m.len()).unwrap_or(0);
    println!(
        "binary size: {size} bytes ({:.2} MiB)",
        size as f64 / (1024.0 * 1024.0)
    );
    let ns = Netns::new("rss");
    let conf = plugin_config("nftables", &ns.path(), true);
    let (_, ok, rss) = timed_spawn(None, &[PLUGIN], &plugin_env("ADD", &ns.path(), 0), &conf);
    println!(
        "peak RSS during ADD (nftables): {rss} KiB ({:.2} MiB){}",
        rss as f64 / 1024.0,
        if ok { "" } else { " [ADD FAILED]" }
    );
    rss
}

/// The binary's path and whether it is the static build that ships (no ELF interpreter).
fn describe_binary() -> String {
    let linking = match std::fs::read(PLUGIN)
        .ok()
        .as_deref()
        .and_then(has_interpreter)
    {
        Some(false) => "statically linked, as it ships",
        Some(true) => "DYNAMICALLY linked: not the shipped build (use scripts/bench)",
        None => "unreadable",
    };
    format!("{PLUGIN} ({linking})")
}

/// Whether a 64-bit little-endian ELF image has a PT_INTERP program header.
fn has_interpreter(elf: &[u8]) -> Option<bool> {
    let word = |at: usize, len: usize| -> Option<u64> {
        let bytes = elf.get(at..at + len)?;
        Some(
            bytes
                .iter()
                .rev()
                .fold(0, |acc, b| acc << 8 | u64::from(*b)),
        )
    };
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let (phoff, phentsize, phnum) = (word(0x20, 8)?, word(0x36, 2)?, word(0x38, 2)?);
    const PT_INTERP: u64 = 3;
    (0..phnum)
        .map(|i| word((phoff + i * phentsize) as usize, 4))
        .collect::<Option<Vec<_>>>()
        .map(|types| types.contains(&PT_INTERP))
}
