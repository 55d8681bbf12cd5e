//! The node agent as a process: `install --watch` with its HTTP endpoints and event relay,
//! driven through the files of a conf dir, a bin dir and a host root, and by running the plugin
//! binary as a runtime does. Root: the plugin's ADD programs a real pod netns.

mod common;

use common::{cni, require_root, Lab};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_intercept-cni");
const WAIT: Duration = Duration::from_secs(10);
const PRIMARY: &str = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge"}]}"#;

fn host_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/hosts")
        .join(name)
}

/// A running agent on directories of its own; killed on drop.
struct Agent {
    dir: tempfile::TempDir,
    child: Child,
    addr: String,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// Starts `install --watch` with `plugin_config`; the host root is a symlink (`host`) that
    /// tests can point at another fixture.
    fn start(plugin_config: Value, host: &str) -> Agent {
        Agent::start_with(plugin_config, host, &["conf", "bin"])
    }

    /// `dirs`: which of the runtime's dirs exist when it starts.
    fn start_with(plugin_config: Value, host: &str, dirs: &[&str]) -> Agent {
        // No audit of the machine's runtime from tests that are not about it.
        Agent::start_as(None, plugin_config, host, dirs, &["--repair-interval", "0"])
    }

    /// `copy`: run a copy of the binary from a dir of its own, named so (nothing next to it).
    fn start_as(
        copy: Option<&str>,
        plugin_config: Value,
        host: &str,
        dirs: &[&str],
        args: &[&str],
    ) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        for sub in dirs {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        std::os::unix::fs::symlink(host_fixture(host), dir.path().join("host")).unwrap();
        let config = dir.path().join("plugin-config.json");
        std::fs::write(&config, plugin_config.to_string()).unwrap();
        let path = |p: &str| dir.path().join(p).display().to_string();
        let binary = match copy {
            None => PathBuf::from(BIN),
            Some(sub) => {
                std::fs::create_dir(dir.path().join(sub)).unwrap();
                let binary = dir.path().join(sub).join("intercept-cni");
                std::fs::copy(BIN, &binary).unwrap();
                binary
            }
        };
        let mut child = Command::new(binary)
            .args(["install", "--watch", "--listen", "127.0.0.1:0"])
            .args(args)
            .args([
                "--cni-conf-dir",
                &path("conf"),
                "--cni-bin-dir",
                &path("bin"),
            ])
            .args(["--plugin-config", &path("plugin-config.json")])
            .args(["--events-socket", &path("events.sock")])
            .args(["--host-root", &path("host")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the agent");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&stdout);
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        // The port chosen by the kernel is in the log; the rest of the log is echoed for failures.
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("agent: {line}");
                if let Some(addr) = line.split("/metrics on ").nth(1) {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(WAIT)
            .expect("the agent reports its address");
        Agent {
            dir,
            child,
            addr,
            stdout,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Status and body of `GET path`.
    fn get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(&self.addr).expect("connect to the agent");
        write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let status = text[9..12].parse().expect("a status code");
        let body = text.split_once("\r\n\r\n").expect("a head").1.to_string();
        (status, body)
    }

    /// Waits until `/readyz` answers `status` with a body containing `needle`.
    fn ready_becomes(&self, status: u16, needle: &str) {
        let started = Instant::now();
        loop {
            let (got, body) = self.get("/readyz");
            if got == status && body.contains(needle) {
                return;
            }
            assert!(
                started.elapsed() < WAIT,
                "/readyz stayed {got} (wanted {status} with {needle:?}):\n{body}"
            );
            // Often: the watcher puts a deleted or replaced binary back within ~100 ms.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The value of an unlabelled sample in /metrics.
    fn metric(&self, name: &str) -> u64 {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
    }

    /// Waits until the unlabelled sample `name` is at least `at_least`.
    fn metric_reaches(&self, name: &str, at_least: u64) {
        let started = Instant::now();
        while self.metric(name) < at_least {
            assert!(started.elapsed() < WAIT, "{name} stayed below {at_least}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until /metrics has `line` (a sample with its value).
    fn metric_becomes(&self, line: &str) {
        let started = Instant::now();
        loop {
            let (status, body) = self.get("/metrics");
            assert_eq!(status, 200);
            if body.lines().any(|l| l == line) {
                return;
            }
            assert!(started.elapsed() < WAIT, "no {line:?} in /metrics:\n{body}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stdout_records(&self) -> Vec<Value> {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Waits for a record on stdout matching every key of `wanted`.
    fn printed(&self, wanted: &Value) -> Value {
        let started = Instant::now();
        loop {
            let records = self.stdout_records();
            let found = records
                .iter()
                .find(|r| wanted.as_object().unwrap().iter().all(|(k, v)| &r[k] == v));
            if let Some(record) = found {
                return record.clone();
            }
            assert!(
                started.elapsed() < WAIT,
                "no record like {wanted} on stdout: {records:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replaces `path` with `content` in one rename, as the runtime's agents do.
fn replace(path: &Path, content: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let temp = path.with_extension("tmp-test");
    std::fs::write(&temp, content).unwrap();
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

#[test]
fn readiness_follows_the_entry_the_binary_and_the_host_check() {
    let agent = Agent::start(json!({"backend": "nftables"}), "builtin-only");
    assert_eq!(agent.get("/healthz"), (200, "ok\n".into()));
    assert_eq!(agent.get("/nope").0, 404);
    agent.ready_becomes(503, "chained: NOT READY: no valid network config");

    let conflist = agent.path("conf/10-k8s.conflist");
    replace(&conflist, PRIMARY.as_bytes(), 0o644);
    agent.ready_becomes(
        200,
        "chained: ok: 10-k8s.conflist chains intercept-cni last",
    );
    agent.metric_becomes("intercept_cni_ready 1");

    std::fs::remove_file(&conflist).unwrap();
    agent.ready_becomes(503, "chained: NOT READY");
    agent.metric_becomes("intercept_cni_install_state{condition=\"chained\"} 0");
    replace(&conflist, PRIMARY.as_bytes(), 0o644);
    agent.ready_becomes(200, "binary: ok");

    // The watcher puts a replaced or deleted binary back within ~100 ms; until it has, /readyz
    // must never say ready (checked whenever the file differed before and after the request).
    let plugin = agent.path("bin/intercept-cni");
    let ours = std::fs::read(BIN).unwrap();
    let mut other = ours.clone();
    other[ours.len() / 2] ^= 0xff;
    let differs = || std::fs::read(&plugin).map_or(true, |b| b != ours);
    for (round, damage) in ["replace", "delete"].iter().enumerate() {
        match *damage {
            "replace" => replace(&plugin, &other, 0o755),
            _ => std::fs::remove_file(&plugin).unwrap(),
        }
        let started = Instant::now();
        loop {
            let before = differs();
            let (status, body) = agent.get("/readyz");
            if before && differs() {
                assert_eq!(
                    status, 503,
                    "{damage}: ready while the binary differs:\n{body}"
                );
                assert!(body.contains("binary: NOT READY"), "{body}");
            }
            if !differs() && status == 200 {
                break;
            }
            assert!(
                started.elapsed() < WAIT,
                "{damage}: never ready again:\n{body}"
            );
        }
        agent.metric_reaches("intercept_cni_reinstalls_total", round as u64 + 1);
    }
    // A directory swapped in at the binary's name cannot be renamed over: not ready until it
    // goes, a state that lasts however slow the machine is.
    let blocker = agent.path("bin/blocker");
    std::fs::create_dir(&blocker).unwrap();
    intercept_cni::rename::renameat2(&blocker, &plugin, intercept_cni::rename::EXCHANGE).unwrap();
    agent.ready_becomes(503, "binary: NOT READY");
    agent.metric_becomes("intercept_cni_ready 0");
    std::fs::remove_file(&blocker).unwrap();
    std::fs::remove_dir(&plugin).unwrap();
    agent.ready_becomes(200, "binary: ok");

    let host = agent.path("host");
    std::fs::remove_file(&host).unwrap();
    std::os::unix::fs::symlink(host_fixture("no-nftables"), &host).unwrap();
    agent.ready_becomes(503, "host: NOT READY: the nftables backend cannot work");
    agent.metric_becomes("intercept_cni_install_state{condition=\"host\"} 0");
    std::fs::remove_file(&host).unwrap();
    std::os::unix::fs::symlink(host_fixture("builtin-only"), &host).unwrap();
    agent.ready_becomes(200, "host: ok: nftables backend");
}

/// The host check follows the plugin config as edited (a ConfigMap update), not as it was when
/// the agent started.
#[test]
fn readiness_follows_an_edited_plugin_config() {
    let agent = Agent::start(json!({"backend": "nftables"}), "no-nftables");
    replace(
        &agent.path("conf/10-k8s.conflist"),
        PRIMARY.as_bytes(),
        0o644,
    );
    agent.ready_becomes(503, "host: NOT READY: the nftables backend cannot work");
    let legacy = json!({"backend": "iptables", "iptablesMode": "legacy"});
    replace(
        &agent.path("plugin-config.json"),
        legacy.to_string().as_bytes(),
        0o644,
    );
    agent.ready_becomes(200, "host: ok: iptables-legacy backend (configured)");
}

#[test]
fn metrics_and_stdout_show_real_plugin_invocations() {
    require_root();
    let agent = Agent::start(json!({}), "builtin-only");
    let conflist = agent.path("conf/10-k8s.conflist");
    replace(&conflist, PRIMARY.as_bytes(), 0o644);
    agent.metric_becomes("intercept_cni_install_passes_total{result=\"chained\"} 1");
    // Another agent rewrites the file without our entry: it is put back, and counted.
    replace(&conflist, PRIMARY.as_bytes(), 0o644);
    agent.metric_becomes("intercept_cni_rechains_total 1");

    let socket = agent.path("events.sock").display().to_string();
    let lab = Lab::new();
    let settings = json!({"backend": "nftables", "eventsSocket": socket});
    let conf = lab.config("1.0.0", settings.clone());
    lab.cni("ADD", &conf).ok();
    let gone = cni(
        "ADD",
        Some("/var/run/netns/intercept-cni-agent-no-such"),
        &conf,
    );
    gone.error(5);
    let mut typo = lab.config("1.0.0", settings);
    typo["inboundPort"] = json!(0);
    lab.cni("ADD", &typo).error(7);
    // Refused for its version (code 1): still reported where the config says.
    let mut future = typo.clone();
    future["cniVersion"] = json!("9.9.9");
    lab.cni("ADD", &future).error(1);

    agent.metric_becomes(
        r#"intercept_cni_plugin_invocations_total{verb="ADD",outcome="ok",code="0"} 1"#,
    );
    agent.metric_becomes(
        r#"intercept_cni_plugin_invocations_total{verb="ADD",outcome="error",code="5"} 1"#,
    );
    agent.metric_becomes(
        r#"intercept_cni_plugin_invocations_total{verb="ADD",outcome="error",code="7"} 1"#,
    );
    agent.metric_becomes(
        r#"intercept_cni_plugin_invocations_total{verb="ADD",outcome="error",code="1"} 1"#,
    );
    agent.metric_becomes(r#"intercept_cni_plugin_duration_seconds_count{verb="ADD"} 4"#);

    let ok = agent.printed(&json!({"verb": "ADD", "outcome": "ok"}));
    assert_eq!(ok["namespace"], "default");
    assert_eq!(ok["pod"], "lab");
    assert_eq!(ok["containerId"], "ctr-0123456789abcdef");
    assert_eq!(ok["code"], 0);
    assert_eq!(ok["backend"], "nftables");
    assert!(ok["durationMs"].as_f64().unwrap() > 0.0, "{ok}");
    assert!(ok["time"].as_str().unwrap().ends_with('Z'), "{ok}");
    let failed = agent.printed(&json!({"verb": "ADD", "code": 5}));
    assert_eq!(failed["outcome"], "error");
    assert!(
        failed["msg"].as_str().unwrap().contains("does not exist"),
        "{failed}"
    );
    agent.printed(&json!({"verb": "ADD", "code": 7}));

    // Anything else on the socket is counted as invalid, never printed.
    let printed = agent.stdout_records().len();
    let forger = UnixDatagram::unbound().unwrap();
    forger
        .send_to(b"{\"verb\":\"ADD\n\"}", agent.path("events.sock"))
        .unwrap();
    forger
        .send_to(b"not json", agent.path("events.sock"))
        .unwrap();
    agent.metric_becomes("intercept_cni_invalid_events_total 2");
    assert_eq!(agent.stdout_records().len(), printed);

    // DEL with the config ADD refused succeeds; the record carries the invocation's warning.
    lab.cni("DEL", &typo).ok();
    agent.metric_becomes(
        r#"intercept_cni_plugin_invocations_total{verb="DEL",outcome="ok",code="0"} 1"#,
    );
    let del = agent.printed(&json!({"verb": "DEL", "outcome": "ok"}));
    let warnings = del["warnings"].as_array().expect("warnings");
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("despite an invalid config")),
        "{del}"
    );
}

#[test]
fn without_an_agent_the_plugin_succeeds_and_touches_no_file() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.sock");
    std::fs::write(&file, "precious").unwrap();
    let lab = Lab::new();
    for socket in [file.clone(), dir.path().join("absent.sock")] {
        let settings = json!({"backend": "nftables", "eventsSocket": socket});
        lab.cni("ADD", &lab.config("1.0.0", settings)).ok();
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    let settings = json!({"backend": "nftables", "eventsSocket": "relative.sock"});
    lab.cni("ADD", &lab.config("1.0.0", settings)).error(7);
}

/// `--events-socket` naming another program's socket (containerd's stream socket, journald's
/// 0666 datagram one) never removes it: the agent relays nothing and says so. A stale socket
/// (nobody listening) and an earlier agent's live one are replaced as before.
#[test]
fn another_programs_socket_is_never_removed_for_the_events_socket() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::net::UnixListener;
    let dir = tempfile::tempdir().unwrap();
    for sub in ["conf", "bin"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    // Runs the agent on `socket` until it says whether it relays; returns that line.
    let agent_on = |socket: &Path| -> String {
        let path = |p: &str| dir.path().join(p).display().to_string();
        let mut child = Command::new(BIN)
            .args(["install", "--watch", "--events-socket"])
            .arg(socket)
            .args([
                "--cni-conf-dir",
                &path("conf"),
                "--cni-bin-dir",
                &path("bin"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let line = BufReader::new(err)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("relay"))
            .unwrap_or_default();
        let _ = child.kill();
        let _ = child.wait();
        line
    };

    let stream = dir.path().join("containerd.sock");
    let _containerd = UnixListener::bind(&stream).unwrap();
    let journald = dir.path().join("dev-log");
    let _journal = UnixDatagram::bind(&journald).unwrap();
    std::fs::set_permissions(&journald, std::fs::Permissions::from_mode(0o666)).unwrap();
    for foreign in [&stream, &journald] {
        let before = std::fs::symlink_metadata(foreign).unwrap().ino();
        let line = agent_on(foreign);
        assert!(
            line.contains("not be relayed"),
            "{}: {line}",
            foreign.display()
        );
        assert!(line.contains("another program's"), "{line}");
        let after = std::fs::symlink_metadata(foreign).unwrap().ino();
        assert_eq!(before, after, "{} was replaced", foreign.display());
    }

    // Stale (its listener gone) or an earlier agent's (0600, live): replaced.
    let stale = dir.path().join("stale.sock");
    drop(UnixDatagram::bind(&stale).unwrap());
    assert!(agent_on(&stale).contains("relaying plugin events"));
    let earlier = dir.path().join("earlier.sock");
    let _earlier = UnixDatagram::bind(&earlier).unwrap();
    std::fs::set_permissions(&earlier, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(agent_on(&earlier).contains("relaying plugin events"));
}

/// Clients trickling their request a byte at a time (slow enough for every single read, never
/// finishing) hold the agent's connection slots at most a few seconds: the probes answer again.
#[test]
fn slow_clients_cannot_starve_the_probes() {
    let agent = Agent::start(json!({"backend": "nftables"}), "builtin-only");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tricklers: Vec<_> = (0..32)
        .map(|_| {
            let addr = agent.addr.clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let Ok(mut s) = TcpStream::connect(&addr) else {
                    return;
                };
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if s.write_all(b"G").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Within the 5 s head deadline plus margin, /healthz answers despite the tricklers.
    let started = Instant::now();
    let answered = loop {
        let mut s = TcpStream::connect(&agent.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = write!(s, "GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        if text.starts_with("HTTP/1.1 200") {
            break true;
        }
        if started.elapsed() > Duration::from_secs(12) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tricklers {
        t.join().unwrap();
    }
    assert!(
        answered,
        "/healthz never answered while slow clients held the slots"
    );
}

/// The agent started before the runtime's conf and bin dirs exist (a node still coming up)
/// serves its probes, not ready and saying why, then installs once they appear.
#[test]
fn missing_cni_dirs_are_not_ready_until_they_appear() {
    let agent = Agent::start_with(json!({"backend": "nftables"}), "builtin-only", &[]);
    assert_eq!(agent.get("/healthz"), (200, "ok\n".into()));
    agent.ready_becomes(503, "chained: NOT READY: cannot list");
    std::fs::create_dir(agent.path("conf")).unwrap();
    std::fs::create_dir(agent.path("bin")).unwrap();
    let conflist = agent.path("conf/10-k8s.conflist");
    replace(&conflist, PRIMARY.as_bytes(), 0o644);
    agent.ready_becomes(
        200,
        "chained: ok: 10-k8s.conflist chains intercept-cni last",
    );
    // Watched from then on: another agent's rewrite is re-chained.
    let rechains = agent.metric("intercept_cni_rechains_total");
    replace(&conflist, PRIMARY.as_bytes(), 0o644);
    agent.metric_reaches("intercept_cni_rechains_total", rechains + 1);
    agent.ready_becomes(200, "binary: ok");
}

/// The repair runs the node tool beside the agent's executable; when it cannot (none there, or
/// no runtime at the socket) the audit is counted as failed and logged, and nothing else changes:
/// the watch loop keeps chaining, readiness stays. Audits come after every chaining and on the
/// schedule.
#[test]
fn a_repair_that_cannot_run_is_counted_and_harms_nothing() {
    const FAILED: &str = "intercept_cni_audit_runs_total{result=\"failed\"}";
    let args = [
        "--repair-interval",
        "3600",
        "--cri-socket",
        "/nonexistent/intercept-cni-test/cri.sock",
    ];
    let agent = Agent::start_as(
        Some("image"),
        json!({"backend": "nftables"}),
        "builtin-only",
        &["conf", "bin"],
        &args,
    );
    let conflist = agent.path("conf/10-k8s.conflist");
    replace(&conflist, PRIMARY.as_bytes(), 0o644);
    agent.ready_becomes(200, "chained: ok");
    // The first chaining asks for an audit at once (the interval is an hour).
    agent.metric_reaches(FAILED, 1);
    // Another agent rewrites the file: re-chained, and audited again.
    let rechains = agent.metric("intercept_cni_rechains_total");
    replace(&conflist, PRIMARY.as_bytes(), 0o644);
    agent.metric_reaches("intercept_cni_rechains_total", rechains + 1);
    agent.metric_reaches(FAILED, 2);
    agent.ready_becomes(200, "chained: ok");
    assert_eq!(agent.get("/healthz"), (200, "ok\n".into()));
    for result in ["clean", "attention", "not-chained"] {
        assert_eq!(
            agent.metric(&format!(
                "intercept_cni_audit_runs_total{{result=\"{result}\"}}"
            )),
            0
        );
    }
    assert_eq!(agent.metric("intercept_cni_pods_repaired_total"), 0);

    // On the schedule, without any change to the node.
    let scheduled = Agent::start_as(
        Some("image"),
        json!({"backend": "nftables"}),
        "builtin-only",
        &["conf", "bin"],
        &["--repair-interval", "1"],
    );
    replace(
        &scheduled.path("conf/10-k8s.conflist"),
        PRIMARY.as_bytes(),
        0o644,
    );
    scheduled.ready_becomes(200, "chained: ok");
    let rechains = scheduled.metric("intercept_cni_rechains_total");
    scheduled.metric_reaches(FAILED, 4);
    assert_eq!(scheduled.metric("intercept_cni_rechains_total"), rechains);
    scheduled.ready_becomes(200, "chained: ok");
}
