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
        let dir = tempfile::tempdir().unwrap();
        for sub in ["conf", "bin"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        std::os::unix::fs::symlink(host_fixture(host), dir.path().join("host")).unwrap();
        let config = dir.path().join("plugin-config.json");
        std::fs::write(&config, plugin_config.to_string()).unwrap();
        let path = |p: &str| dir.path().join(p).display().to_string();
        let mut child = Command::new(BIN)
            .args(["install", "--watch", "--listen", "127.0.0.1:0"])
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
        agent.metric_becomes(&format!("intercept_cni_reinstalls_total {}", round + 1));
    }

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

    agent.metric_becomes(
        r#"intercept_cni_plugin_invocations_total{verb="ADD",outcome="ok",code="0"} 1"#,
    );
    agent.metric_becomes(
        r#"intercept_cni_plugin_invocations_total{verb="ADD",outcome="error",code="5"} 1"#,
    );
    agent.metric_becomes(
        r#"intercept_cni_plugin_invocations_total{verb="ADD",outcome="error",code="7"} 1"#,
    );
    agent.metric_becomes(r#"intercept_cni_plugin_duration_seconds_count{verb="ADD"} 3"#);

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
