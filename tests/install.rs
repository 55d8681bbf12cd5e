//! The node installer run as the real binary against temp conf and bin dirs seeded from
//! `testdata/install/`: one-shot install and uninstall, and `--watch` with other agents rewriting
//! the dir and a SIGTERM at the end.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_intercept-cni");
const CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/install")
        .join(name)
}

/// A node's CNI dirs in a temp dir.
struct Node {
    root: tempfile::TempDir,
    conf: PathBuf,
    bin: PathBuf,
}

impl Node {
    fn with(fixtures: &[&str]) -> Node {
        let root = tempfile::tempdir().unwrap();
        let conf = root.path().join("net.d");
        let bin = root.path().join("bin");
        fs::create_dir(&conf).unwrap();
        fs::create_dir(&bin).unwrap();
        for name in fixtures {
            fs::copy(testdata(name), conf.join(name)).unwrap();
        }
        Node { root, conf, bin }
    }

    fn dirs(&self) -> Vec<String> {
        vec![
            "--cni-conf-dir".into(),
            self.conf.display().to_string(),
            "--cni-bin-dir".into(),
            self.bin.display().to_string(),
        ]
    }

    fn run(&self, subcommand: &str, extra: &[&str]) -> Output {
        let out = Command::new(BIN)
            .arg(subcommand)
            .args(self.dirs())
            .args(extra)
            .output()
            .unwrap();
        assert_no_temp_files(&self.conf);
        assert_no_temp_files(&self.bin);
        out
    }

    fn install(&self, extra: &[&str]) {
        let out = self.run("install", extra);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    fn uninstall(&self) {
        let out = self.run("uninstall", &[]);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    fn read(&self, name: &str) -> Vec<u8> {
        fs::read(self.conf.join(name)).unwrap()
    }

    /// The file's JSON with the installer's stamp left out of our entries.
    fn json(&self, name: &str) -> Value {
        let mut doc: Value = serde_json::from_slice(&self.read(name)).unwrap();
        if let Some(plugins) = doc["plugins"].as_array_mut() {
            for plugin in plugins.iter_mut().filter(|p| is_ours(p)) {
                plugin.as_object_mut().unwrap().remove("installer");
            }
        }
        doc
    }

    fn plugins(&self, name: &str) -> Vec<Value> {
        self.json(name)["plugins"].as_array().unwrap().clone()
    }

    fn names(&self) -> Vec<String> {
        names(&self.conf)
    }

    fn binary(&self) -> PathBuf {
        self.bin.join("intercept-cni")
    }

    /// Every file of both dirs, by path, with its bytes; a running watcher's lock aside.
    fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        [&self.conf, &self.bin]
            .iter()
            .flat_map(|dir| fs::read_dir(dir).unwrap())
            .map(|e| e.unwrap().path())
            .filter(|p| !p.to_string_lossy().ends_with(".lock"))
            .map(|p| {
                let bytes = fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect()
    }

    /// Starts `install --watch`, its log going to a file that `eventually` shows on failure.
    fn spawn_watch(&self) -> Watcher {
        self.spawn_watch_with(&[])
    }

    fn spawn_watch_with(&self, extra: &[&str]) -> Watcher {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.watch_log())
            .unwrap();
        let child = Command::new(BIN)
            .arg("install")
            .args(self.dirs())
            .arg("--watch")
            // No events socket: tests stay off the host's /var/run.
            .arg("--events-socket=")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Watcher(Some(child))
    }

    fn watch_log(&self) -> PathBuf {
        self.root.path().join("watch.log")
    }

    /// Polls `condition` for up to 10 s.
    fn eventually(&self, what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            if Instant::now() > deadline {
                let log = fs::read_to_string(self.watch_log()).unwrap_or_default();
                panic!("timed out waiting for: {what}\nwatcher log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A running `install --watch`, killed if the test fails before stopping it.
struct Watcher(Option<Child>);

impl Watcher {
    fn signal(&mut self, signal: Signal) -> std::process::ExitStatus {
        let mut child = self.0.take().unwrap();
        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("watcher did not exit after {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn assert_no_temp_files(dir: &Path) {
    let temps: Vec<String> = names(dir)
        .into_iter()
        .filter(|n| n.contains("intercept-cni-tmp"))
        .collect();
    assert!(
        temps.is_empty(),
        "temp files left in {}: {temps:?}",
        dir.display()
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn default_entry() -> Value {
    json!({"type": "intercept-cni", "capabilities": {CAPABILITY: true}})
}

fn fixture_json(name: &str) -> Value {
    serde_json::from_slice(&fs::read(testdata(name)).unwrap()).unwrap()
}

fn keys(value: &Value) -> Vec<String> {
    value.as_object().unwrap().keys().cloned().collect()
}

fn is_ours(plugin: &Value) -> bool {
    plugin["type"] == "intercept-cni"
}

/// True once `name` is a valid conflist whose last plugin is ours and holds it once.
fn chained_last(node: &Node, name: &str) -> bool {
    let Ok(bytes) = fs::read(node.conf.join(name)) else {
        return false;
    };
    let Ok(doc) = serde_json::from_slice::<Value>(&bytes) else {
        return false;
    };
    let Some(plugins) = doc["plugins"].as_array() else {
        return false;
    };
    plugins.iter().filter(|p| is_ours(p)).count() == 1 && plugins.last().is_some_and(is_ours)
}

/// An agent replacing its file the careful way: temp file, then rename.
fn agent_writes(node: &Node, name: &str, content: &[u8]) {
    let temp = node.conf.join(format!("{name}.agent-tmp"));
    fs::write(&temp, content).unwrap();
    fs::rename(&temp, node.conf.join(name)).unwrap();
}

#[test]
fn single_conf_becomes_a_conflist_with_our_entry() {
    let node = Node::with(&["10-bridge.conf", "99-loopback.conf"]);
    fs::set_permissions(
        node.conf.join("10-bridge.conf"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    node.install(&[]);

    assert_eq!(node.names(), ["10-bridge.conflist", "99-loopback.conf"]);
    let conf = fixture_json("10-bridge.conf");
    let list = node.json("10-bridge.conflist");
    assert_eq!(
        list,
        json!({"cniVersion": "1.0.0", "name": "bridge-net", "plugins": [conf, default_entry()]})
    );
    let mode = fs::metadata(node.conf.join("10-bridge.conflist"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the .conf's mode is kept");
    assert_eq!(
        node.read("99-loopback.conf"),
        fs::read(testdata("99-loopback.conf")).unwrap()
    );

    assert_eq!(fs::read(node.binary()).unwrap(), fs::read(BIN).unwrap());
    let mode = fs::metadata(node.binary()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
}

#[test]
fn conflist_gets_our_entry_appended_last_in_its_key_order() {
    let node = Node::with(&["10-calico.conflist"]);
    node.install(&[]);

    let original = fixture_json("10-calico.conflist");
    let installed = node.json("10-calico.conflist");
    assert_eq!(keys(&installed), keys(&original));
    let mut expected = original["plugins"].as_array().unwrap().clone();
    expected.push(default_entry());
    assert_eq!(node.plugins("10-calico.conflist"), expected);
    for (got, want) in installed["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&expected)
    {
        assert_eq!(keys(got), keys(want), "plugin key order kept");
    }
}

#[test]
fn install_twice_leaves_every_file_byte_identical() {
    for fixtures in [
        &["10-calico.conflist", "99-loopback.conf"][..],
        &["10-bridge.conf"][..],
    ] {
        let node = Node::with(fixtures);
        let config = testdata("plugin-config.json");
        let config = config.to_str().unwrap();
        node.install(&["--plugin-config", config]);
        let first = node.snapshot();
        let inodes: Vec<u64> = first
            .keys()
            .map(|p| fs::metadata(p).unwrap().ino())
            .collect();
        node.install(&["--plugin-config", config]);
        assert_eq!(node.snapshot(), first);
        let again: Vec<u64> = first
            .keys()
            .map(|p| fs::metadata(p).unwrap().ino())
            .collect();
        assert_eq!(again, inodes, "nothing was even rewritten");
    }
}

#[test]
fn plugin_config_is_our_entry_with_the_capability() {
    let node = Node::with(&["10-flannel.conflist"]);
    node.install(&[
        "--plugin-config",
        testdata("plugin-config.json").to_str().unwrap(),
    ]);
    let entry = node.plugins("10-flannel.conflist").pop().unwrap();
    let mut expected = json!({"type": "intercept-cni"});
    for (k, v) in fixture_json("plugin-config.json").as_object().unwrap() {
        expected[k] = v.clone();
    }
    expected["capabilities"] = json!({CAPABILITY: true});
    assert_eq!(entry, expected);
    assert_eq!(keys(&entry), keys(&expected));
}

#[test]
fn broken_files_are_skipped_and_other_networks_untouched() {
    let fixtures = [
        "00-list-in-conf.conf",
        "05-broken.conflist",
        "10-flannel.conflist",
        "10-calico.conflist",
        "99-loopback.conf",
    ];
    let node = Node::with(&fixtures);
    node.install(&[]);
    // "10-c" < "10-f": calico is the active network.
    assert!(chained_last(&node, "10-calico.conflist"));
    for name in fixtures.iter().filter(|n| **n != "10-calico.conflist") {
        assert_eq!(
            node.read(name),
            fs::read(testdata(name)).unwrap(),
            "{name} untouched"
        );
    }
    assert_eq!(node.names().len(), fixtures.len());
}

#[test]
fn containerd_style_file_choice() {
    let dir = testdata("choice");
    let fixtures = names(&dir);
    let node = Node::with(&[]);
    for name in &fixtures {
        fs::copy(dir.join(name), node.conf.join(name)).unwrap();
    }
    node.install(&[]);
    // 00-empty has no plugins, 01-no-type no type, 02-* are not config names, and bytewise
    // "10-K" sorts before "10-c".
    for name in &fixtures {
        let unchanged = fs::read(dir.join(name)).unwrap() == node.read(name);
        assert_eq!(unchanged, name != "10-Kindnet.conflist", "{name}");
    }
    assert!(chained_last(&node, "10-Kindnet.conflist"));
}

#[test]
fn uninstall_removes_only_our_entry_and_our_binary() {
    let node = Node::with(&["10-calico.conflist", "10-bridge.conf", "99-loopback.conf"]);
    fs::write(node.bin.join("bridge"), "another plugin").unwrap();
    node.install(&[]);
    assert!(chained_last(&node, "10-bridge.conflist"));
    node.uninstall();

    assert!(!node.binary().exists());
    assert_eq!(names(&node.bin), ["bridge"]);
    // The converted network is the primary's .conf again, byte for byte.
    assert_eq!(
        node.names(),
        ["10-bridge.conf", "10-calico.conflist", "99-loopback.conf"]
    );
    for name in ["10-bridge.conf", "10-calico.conflist", "99-loopback.conf"] {
        assert_eq!(node.read(name), fs::read(testdata(name)).unwrap(), "{name}");
    }
    // Uninstalling again finds nothing to do.
    let before = node.snapshot();
    node.uninstall();
    assert_eq!(node.snapshot(), before);
}

#[test]
fn uninstall_also_cleans_a_network_that_is_no_longer_first() {
    let node = Node::with(&["10-calico.conflist"]);
    node.install(&[]);
    fs::copy(testdata("10-bridge.conf"), node.conf.join("05-bridge.conf")).unwrap();
    node.install(&[]);
    assert!(chained_last(&node, "05-bridge.conflist"));
    assert!(chained_last(&node, "10-calico.conflist"));
    node.uninstall();
    assert_eq!(
        node.json("10-calico.conflist"),
        fixture_json("10-calico.conflist")
    );
    assert_eq!(
        node.read("05-bridge.conf"),
        fs::read(testdata("10-bridge.conf")).unwrap()
    );
    assert_eq!(node.names(), ["05-bridge.conf", "10-calico.conflist"]);
}

#[test]
fn one_shot_without_a_network_fails_clearly_and_changes_nothing() {
    let node = Node::with(&["05-broken.conflist"]);
    let out = node.run("install", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no valid CNI network config"),
        "{}",
        stderr(&out)
    );
    assert!(!node.binary().exists());
    assert_eq!(
        node.read("05-broken.conflist"),
        fs::read(testdata("05-broken.conflist")).unwrap()
    );
}

#[test]
fn bad_command_lines_and_plugin_configs_are_refused() {
    let node = Node::with(&["10-calico.conflist"]);
    let out = node.run("install", &["--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--help"), "{}", stderr(&out));
    let bad = node.conf.join("../bad-plugin.json");
    fs::write(&bad, r#"{"type": "bridge"}"#).unwrap();
    let out = node.run("install", &["--plugin-config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("expected \"intercept-cni\""),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        node.read("10-calico.conflist"),
        fs::read(testdata("10-calico.conflist")).unwrap()
    );
    assert!(!node.binary().exists());
}

/// A `stateDir` the plugin refuses (every ADD would fail with code 7) is never chained: an
/// existing directory that is not private (`/proc`, `/`, another program's), a symlink, a file.
/// Judged by looking only: nothing is created or chmodded. A missing or private one is fine.
#[test]
fn a_plugin_config_with_a_state_dir_the_plugin_refuses_is_never_chained() {
    use std::os::unix::fs::PermissionsExt;
    let node = Node::with(&["10-calico.conflist"]);
    let theirs = node.root.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    fs::set_permissions(&theirs, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(theirs.join("data"), "").unwrap();
    let link = node.root.path().join("link");
    std::os::unix::fs::symlink(&theirs, &link).unwrap();
    let config = node.root.path().join("plugin.json");
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode();
    for state_dir in [
        Path::new("/proc"),
        Path::new("/"),
        &theirs,
        &link,
        &theirs.join("data"),
    ] {
        let before = mode(state_dir);
        fs::write(&config, json!({"stateDir": state_dir}).to_string()).unwrap();
        let out = node.run("install", &["--plugin-config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{}", state_dir.display());
        assert!(
            stderr(&out).contains("stateDir"),
            "{}: {}",
            state_dir.display(),
            stderr(&out)
        );
        assert_eq!(mode(state_dir), before, "{}", state_dir.display());
        assert!(our_entry(&node, "10-calico.conflist").is_none());
    }
    let missing = node.root.path().join("state/intercept");
    fs::write(&config, json!({"stateDir": missing}).to_string()).unwrap();
    node.install(&["--plugin-config", config.to_str().unwrap()]);
    assert!(!missing.exists(), "the installer created the state dir");
    assert!(chained_last(&node, "10-calico.conflist"));
}

/// A network nested deeper than serde_json's 128 levels is loaded by runtimes (Go's limit is
/// 10000): it is the active one, chained and restored byte for byte, not skipped in favour of
/// the next file, which the runtime never reads. Deeper than 10000, both skip it.
#[test]
fn a_deeply_nested_network_is_chained_where_the_runtime_reads_it() {
    let node = Node::with(&["10-calico.conflist"]);
    let nested = |levels: usize| {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"deep","plugins":[{{"type":"bridge","x":{}{}}}]}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        )
    };
    fs::write(node.conf.join("05-deep.conflist"), nested(300)).unwrap();
    node.install(&[]);
    // Too deep for serde_json here too: our entry is the last plugin, after the deep one.
    let text = String::from_utf8(node.read("05-deep.conflist")).unwrap();
    let ours = text.find(r#""type":"intercept-cni""#).expect("our entry");
    assert!(ours > text.rfind(&"]".repeat(300)).unwrap(), "{text}");
    assert!(text.ends_with("}]}"), "{text}");
    assert!(our_entry(&node, "10-calico.conflist").is_none());
    node.uninstall();
    assert_eq!(node.read("05-deep.conflist"), nested(300).as_bytes());

    fs::write(node.conf.join("05-deep.conflist"), nested(10_001)).unwrap();
    node.install(&[]);
    assert!(chained_last(&node, "10-calico.conflist"));
    assert_eq!(node.read("05-deep.conflist"), nested(10_001).as_bytes());
}

#[test]
fn watch_puts_the_entry_back_after_another_agent_rewrites_the_file() {
    let node = Node::with(&["10-calico.conflist", "99-loopback.conf"]);
    let mut watcher = node.spawn_watch();
    node.eventually("first install", || {
        chained_last(&node, "10-calico.conflist")
    });

    // The primary agent restarts and writes its file again, atomically...
    agent_writes(
        &node,
        "10-calico.conflist",
        &fs::read(testdata("10-calico.conflist")).unwrap(),
    );
    node.eventually("re-insertion after rename", || {
        chained_last(&node, "10-calico.conflist")
    });
    // ...or in place.
    fs::write(
        node.conf.join("10-calico.conflist"),
        fs::read(testdata("10-calico.conflist")).unwrap(),
    )
    .unwrap();
    node.eventually("re-insertion after write", || {
        chained_last(&node, "10-calico.conflist")
    });
    assert_eq!(
        node.read("99-loopback.conf"),
        fs::read(testdata("99-loopback.conf")).unwrap()
    );

    assert!(watcher.signal(Signal::SIGTERM).success());
}

/// A conf dir or bin dir removed and made again while watched (a node agent resetting its
/// dirs) is watched again: the primary's later rewrite is re-chained and a deleted binary comes
/// back, instead of the watcher exiting (bin) or silently no longer seeing the dir (conf).
#[test]
fn watch_follows_a_conf_or_bin_dir_removed_and_made_again() {
    let node = Node::with(&["10-calico.conflist"]);
    let mut watcher = node.spawn_watch();
    node.eventually("first install", || {
        chained_last(&node, "10-calico.conflist")
    });
    let primary = fs::read(testdata("10-calico.conflist")).unwrap();

    fs::remove_dir_all(&node.conf).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    fs::create_dir(&node.conf).unwrap();
    fs::write(node.conf.join("10-calico.conflist"), &primary).unwrap();
    node.eventually("chained into the new conf dir", || {
        chained_last(&node, "10-calico.conflist")
    });
    // Its own lock is back in the new dir: other installers see a live one.
    node.eventually("lock in the new conf dir", || {
        fs::read_dir(&node.conf)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".lock"))
    });
    agent_writes(&node, "10-calico.conflist", &primary);
    node.eventually("re-chained after the primary's rewrite", || {
        chained_last(&node, "10-calico.conflist")
    });

    fs::remove_dir_all(&node.bin).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    fs::create_dir(&node.bin).unwrap();
    node.eventually("binary in the new bin dir", || node.binary().exists());
    fs::remove_file(node.binary()).unwrap();
    node.eventually("binary back after a delete", || node.binary().exists());

    assert!(
        watcher.signal(Signal::SIGTERM).success(),
        "{}",
        watch_log(&node)
    );
}

#[test]
fn watch_follows_a_new_file_that_becomes_first() {
    let node = Node::with(&["10-calico.conflist"]);
    let mut watcher = node.spawn_watch_with(&["--uninstall-on-exit"]);
    node.eventually("first install", || {
        chained_last(&node, "10-calico.conflist")
    });

    agent_writes(
        &node,
        "05-flannel.conflist",
        &fs::read(testdata("10-flannel.conflist")).unwrap(),
    );
    node.eventually("entry in the new first file", || {
        chained_last(&node, "05-flannel.conflist")
    });

    // A single-plugin file that sorts first is converted.
    agent_writes(
        &node,
        "01-bridge.conf",
        &fs::read(testdata("10-bridge.conf")).unwrap(),
    );
    node.eventually("conversion of the new first .conf", || {
        chained_last(&node, "01-bridge.conflist") && !node.conf.join("01-bridge.conf").exists()
    });
    // The agent writes its .conf again next to our conflist: converted again, in place.
    agent_writes(
        &node,
        "01-bridge.conf",
        &fs::read(testdata("10-bridge.conf")).unwrap(),
    );
    node.eventually("second conversion", || {
        !node.conf.join("01-bridge.conf").exists()
    });
    assert!(chained_last(&node, "01-bridge.conflist"));

    assert!(watcher.signal(Signal::SIGTERM).success());
    for name in ["05-flannel.conflist", "10-calico.conflist"] {
        assert!(!node.plugins(name).iter().any(is_ours), "{name} cleaned");
    }
    assert_eq!(
        node.read("01-bridge.conf"),
        fs::read(testdata("10-bridge.conf")).unwrap()
    );
    assert!(!node.conf.join("01-bridge.conflist").exists());
}

#[test]
fn watch_ignores_its_own_writes() {
    let node = Node::with(&["10-bridge.conf"]);
    let mut watcher = node.spawn_watch();
    node.eventually("first install", || {
        chained_last(&node, "10-bridge.conflist")
    });
    let path = node.conf.join("10-bridge.conflist");
    let before = fs::metadata(&path).unwrap();
    // Long past the settle time: a watcher reacting to its own write would have rewritten.
    std::thread::sleep(Duration::from_millis(600));
    let after = fs::metadata(&path).unwrap();
    assert_eq!(
        (after.ino(), after.mtime_nsec()),
        (before.ino(), before.mtime_nsec())
    );
    assert!(watcher.signal(Signal::SIGTERM).success());
}

#[test]
fn sigterm_leaves_the_node_intercepting() {
    let node = Node::with(&["10-calico.conflist", "10-flannel.conflist"]);
    let mut watcher = node.spawn_watch();
    node.eventually("first install", || {
        chained_last(&node, "10-calico.conflist")
    });
    let before = node.snapshot();
    // A rolling update: the old agent stops before the new one starts.
    assert_eq!(watcher.signal(Signal::SIGTERM).code(), Some(0));
    assert_eq!(node.snapshot(), before, "entry and binary stay");
    assert!(chained_last(&node, "10-calico.conflist"));
    assert_eq!(fs::read(node.binary()).unwrap(), fs::read(BIN).unwrap());
    // The next agent takes the entry over (its stamp), then `uninstall` removes it for good.
    let mut next = node.spawn_watch();
    node.eventually("the new agent's entry", || node.snapshot() != before);
    assert!(chained_last(&node, "10-calico.conflist"));
    assert_eq!(next.signal(Signal::SIGTERM).code(), Some(0));
    node.uninstall();
    assert!(!node.binary().exists());
    assert_eq!(
        node.read("10-calico.conflist"),
        fs::read(testdata("10-calico.conflist")).unwrap()
    );
}

#[test]
fn uninstall_on_exit_removes_entry_and_binary_and_exits_zero() {
    let node = Node::with(&["10-calico.conflist", "10-flannel.conflist"]);
    let mut watcher = node.spawn_watch_with(&["--uninstall-on-exit"]);
    node.eventually("first install", || {
        chained_last(&node, "10-calico.conflist")
    });
    assert!(node.binary().exists());

    let status = watcher.signal(Signal::SIGTERM);
    assert_eq!(status.code(), Some(0));
    assert!(!node.binary().exists());
    assert_eq!(
        node.read("10-calico.conflist"),
        fs::read(testdata("10-calico.conflist")).unwrap()
    );
    assert_eq!(
        node.read("10-flannel.conflist"),
        fs::read(testdata("10-flannel.conflist")).unwrap()
    );
    assert_eq!(node.names(), ["10-calico.conflist", "10-flannel.conflist"]);
    assert_no_temp_files(&node.conf);
    assert_no_temp_files(&node.bin);
}

#[test]
fn watch_waits_for_a_first_network_and_stops_on_sigint() {
    let node = Node::with(&["05-broken.conflist"]);
    let mut watcher = node.spawn_watch_with(&["--uninstall-on-exit"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !node.binary().exists(),
        "nothing installed without a network"
    );

    agent_writes(
        &node,
        "10-flannel.conflist",
        &fs::read(testdata("10-flannel.conflist")).unwrap(),
    );
    node.eventually("install once a network appears", || {
        chained_last(&node, "10-flannel.conflist") && node.binary().exists()
    });
    assert_eq!(
        node.read("05-broken.conflist"),
        fs::read(testdata("05-broken.conflist")).unwrap()
    );

    assert_eq!(watcher.signal(Signal::SIGINT).code(), Some(0));
    assert!(!node.binary().exists());
    assert_eq!(
        node.json("10-flannel.conflist"),
        fixture_json("10-flannel.conflist")
    );
}

#[test]
fn entrypoint_script_takes_dirs_from_env_and_execs_the_watcher() {
    let node = Node::with(&["10-flannel.conflist"]);
    // The image's binary path, pointed at the binary under test.
    let script =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("install/install-cni.sh"))
            .unwrap()
            .replace("/usr/local/bin/intercept-cni", BIN);
    let script_path = node.root.path().join("install-cni.sh");
    fs::write(&script_path, script).unwrap();
    let child = Command::new("/bin/sh")
        .arg(&script_path)
        .env("CNI_CONF_DIR", &node.conf)
        .env("CNI_BIN_DIR", &node.bin)
        .env("PLUGIN_CONFIG", testdata("plugin-config.json"))
        .env("GENERATION", "5")
        .stdout(Stdio::null())
        .stderr(fs::File::create(node.watch_log()).unwrap())
        .spawn()
        .unwrap();
    let mut watcher = Watcher(Some(child));
    node.eventually("install through the script", || {
        chained_last(&node, "10-flannel.conflist")
    });
    let entry = node.plugins("10-flannel.conflist").pop().unwrap();
    assert_eq!(entry["podSelection"], "annotated");
    let stamped = our_entry(&node, "10-flannel.conflist").unwrap();
    assert_eq!(stamped["installer"]["generation"], 5);
    // Only an exec'd installer gets the SIGTERM and exits 0; entry and binary stay.
    assert_eq!(watcher.signal(Signal::SIGTERM).code(), Some(0));
    assert!(node.binary().exists());
    assert!(chained_last(&node, "10-flannel.conflist"));
}

/// Runs `command` to its end, killing it and failing after `secs`: a hang is a failure, not a
/// stuck test run.
fn output_within(command: &mut Command, secs: u64) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {secs} s; stderr: {}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A ConfigMap volume as the kubelet lays it out: `NAME -> ..data/NAME`, `..data -> ..vN`;
/// an update writes a new `..vN` and renames a new `..data` link over the old one.
struct ConfigMap {
    dir: PathBuf,
    version: u32,
}

impl ConfigMap {
    fn new(dir: PathBuf, name: &str, content: &str) -> ConfigMap {
        fs::create_dir(&dir).unwrap();
        let mut map = ConfigMap { dir, version: 0 };
        map.update(name, content);
        std::os::unix::fs::symlink(format!("..data/{name}"), map.dir.join(name)).unwrap();
        map
    }

    fn update(&mut self, name: &str, content: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        fs::create_dir(self.dir.join(&version)).unwrap();
        fs::write(self.dir.join(&version).join(name), content).unwrap();
        std::os::unix::fs::symlink(&version, self.dir.join("..data_tmp")).unwrap();
        fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// Our entry in `name`, stamp included.
fn our_entry(node: &Node, name: &str) -> Option<Value> {
    let doc: Value = serde_json::from_slice(&fs::read(node.conf.join(name)).ok()?).ok()?;
    doc["plugins"]
        .as_array()?
        .iter()
        .find(|p| is_ours(p))
        .cloned()
}

fn watch_log(node: &Node) -> String {
    fs::read_to_string(node.watch_log()).unwrap_or_default()
}

/// The primary agent's conflist with a marker of which of its writes it is.
fn calico_with_marker(marker: u32) -> Vec<u8> {
    let mut doc = fixture_json("10-calico.conflist");
    doc["plugins"][0]["mtu"] = json!(marker);
    serde_json::to_vec_pretty(&doc).unwrap()
}

/// Issue 13, point 4: another agent writing about when the watcher writes must never lose its
/// write, and the watcher must then chain into that write.
#[test]
fn a_second_writer_is_never_lost_and_the_watcher_converges() {
    let node = Node::with(&["10-calico.conflist"]);
    let mut watcher = node.spawn_watch();
    node.eventually("first install", || {
        chained_last(&node, "10-calico.conflist")
    });
    let target = node.conf.join("10-calico.conflist");
    for trial in 0..40u32 {
        let (first, second) = (2 * trial + 1000, 2 * trial + 1001);
        let conf = node.conf.clone();
        // The other agent: a write, then another one about when the watcher acts on the first.
        let writer = std::thread::spawn(move || {
            let write = |marker: u32| {
                let path = conf.join("10-calico.conflist");
                if marker % 4 < 2 {
                    fs::write(&path, calico_with_marker(marker)).unwrap();
                } else {
                    let temp = conf.join("calico.agent-tmp");
                    fs::write(&temp, calico_with_marker(marker)).unwrap();
                    fs::rename(&temp, &path).unwrap();
                }
            };
            write(first);
            std::thread::sleep(Duration::from_millis(85 + u64::from(trial % 8) * 5));
            write(second);
        });
        writer.join().unwrap();
        node.eventually(&format!("trial {trial}: the second write, chained"), || {
            let Ok(doc) = serde_json::from_slice::<Value>(&fs::read(&target).unwrap()) else {
                return false;
            };
            doc["plugins"][0]["mtu"] == second && chained_last(&node, "10-calico.conflist")
        });
    }
    assert_no_temp_files(&node.conf);
    assert!(watcher.signal(Signal::SIGTERM).success());
}

/// Issue 13, point 5: a network that is a symlink (a ConfigMap-mounted conf dir) is refused,
/// and the link and its target stay as they are.
#[test]
fn a_symlinked_network_is_refused_and_the_link_kept() {
    let node = Node::with(&[]);
    let map = ConfigMap::new(
        node.conf.join("..cm"),
        "10-calico.conflist",
        &String::from_utf8(fs::read(testdata("10-calico.conflist")).unwrap()).unwrap(),
    );
    std::os::unix::fs::symlink(
        "..cm/10-calico.conflist",
        node.conf.join("10-calico.conflist"),
    )
    .unwrap();
    let out = node.run("install", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("symbolic link"), "{}", stderr(&out));
    let link = fs::symlink_metadata(node.conf.join("10-calico.conflist")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(
        fs::read(map.path("10-calico.conflist")).unwrap(),
        fs::read(testdata("10-calico.conflist")).unwrap()
    );
    assert!(!node.binary().exists());
    // uninstall leaves a link alone too.
    node.uninstall();
    assert!(fs::symlink_metadata(node.conf.join("10-calico.conflist"))
        .unwrap()
        .file_type()
        .is_symlink());
}

/// A network that is one of several hard links (the owner writes through another name) is
/// refused like a symlink: renaming our version over it would cut the owner's later edits off.
/// Both names keep the same inode and bytes; a `.conf` is not converted either.
#[test]
fn a_hard_linked_network_is_refused_and_the_link_kept() {
    use std::os::unix::fs::MetadataExt;
    for name in ["10-calico.conflist", "10-bridge.conf"] {
        let node = Node::with(&[name]);
        let owners = node.conf.parent().unwrap().join(format!("owners-{name}"));
        fs::hard_link(node.conf.join(name), &owners).unwrap();
        let before = fs::read(&owners).unwrap();
        let out = node.run("install", &[]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains("hard links"), "{}", stderr(&out));
        assert_eq!(names(&node.conf), [name], "{name}");
        let (ours, theirs) = (
            fs::metadata(node.conf.join(name)).unwrap(),
            fs::metadata(&owners).unwrap(),
        );
        assert_eq!(ours.ino(), theirs.ino(), "{name}: the link was cut");
        assert_eq!(fs::read(&owners).unwrap(), before, "{name}");
        node.uninstall();
        assert_eq!(fs::metadata(&owners).unwrap().nlink(), 2, "{name}");
    }
}

/// Issue 15, point 6: uninstall never leaves a network naming a missing binary: a file it
/// may not clean (a symlink) keeps the binary in place.
#[test]
fn uninstall_keeps_the_binary_while_a_network_still_names_it() {
    let node = Node::with(&["10-calico.conflist"]);
    node.install(&[]);
    // The chained file becomes a link's target, as a ConfigMap-mounted conf dir would have it.
    fs::rename(
        node.conf.join("10-calico.conflist"),
        node.root.path().join("chained.conflist"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        node.root.path().join("chained.conflist"),
        node.conf.join("10-calico.conflist"),
    )
    .unwrap();
    let out = node.run("uninstall", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("still names"), "{}", stderr(&out));
    assert!(node.binary().exists());
    assert!(chained_last(&node, "10-calico.conflist"));
}

/// Issue 13, point 6: the primary's raw text survives install byte for byte outside our entry,
/// and uninstall (one-shot and on exit) gives back its exact bytes.
#[test]
fn the_primary_bytes_survive_install_and_uninstall() {
    let original = fs::read(testdata("10-numbers.conflist")).unwrap();
    let node = Node::with(&["10-numbers.conflist"]);
    node.install(&[]);
    let installed = node.read("10-numbers.conflist");
    assert!(chained_last(&node, "10-numbers.conflist"));
    let text = String::from_utf8(installed).unwrap();
    for kept in [
        "123456789012345678901234567890",
        "\"mtu\": 1e3",
        "-0,",
        "1.50",
        "2.0E+2",
        "0.1e-7",
        "\\u00e9\\/",
    ] {
        assert!(text.contains(kept), "{kept} lost:\n{text}");
    }
    node.uninstall();
    assert_eq!(node.read("10-numbers.conflist"), original);

    let mut watcher = node.spawn_watch_with(&["--uninstall-on-exit"]);
    node.eventually("install", || chained_last(&node, "10-numbers.conflist"));
    assert_eq!(watcher.signal(Signal::SIGTERM).code(), Some(0));
    assert_eq!(node.read("10-numbers.conflist"), original);
}

/// Issue 13, point 7: temp files of killed runs (any PID) are swept at start; look-alikes that
/// we could not have created stay.
#[test]
fn stale_temp_files_are_swept_at_start() {
    let node = Node::with(&["10-calico.conflist"]);
    fs::write(
        node.conf
            .join(".10-calico.conflist.999999.intercept-cni-tmp"),
        vec![b'x'; 1 << 20],
    )
    .unwrap();
    fs::write(
        node.bin.join(".intercept-cni.424242.intercept-cni-tmp"),
        "half a binary",
    )
    .unwrap();
    let keep = [
        "10-x.intercept-cni-tmp",
        ".a.conflist.12a.intercept-cni-tmp",
        ".a.conflist.12.intercept-cni-tmp.bak",
    ];
    for name in keep {
        fs::write(node.conf.join(name), "not ours").unwrap();
    }
    fs::create_dir(node.conf.join(".d.conflist.7.intercept-cni-tmp")).unwrap();
    std::os::unix::fs::symlink(
        testdata("10-calico.conflist"),
        node.conf.join(".l.conflist.8.intercept-cni-tmp"),
    )
    .unwrap();
    let out = output_within(Command::new(BIN).arg("install").args(node.dirs()), 20);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut expected: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    expected.extend([
        ".d.conflist.7.intercept-cni-tmp".into(),
        ".l.conflist.8.intercept-cni-tmp".into(),
        "10-calico.conflist".into(),
    ]);
    expected.sort();
    assert_eq!(node.names(), expected);
    assert_eq!(names(&node.bin), ["intercept-cni"]);
    assert_eq!(
        fs::read(testdata("10-calico.conflist")).unwrap().len(),
        fs::metadata(node.conf.join(".l.conflist.8.intercept-cni-tmp"))
            .unwrap()
            .len() as usize
    );
}

/// `install`/`uninstall` with their address space capped: reading /dev/zero or a huge file
/// whole would fail instead of taking the machine's memory.
fn capped(subcommand: &str, node: &Node) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(BIN);
    command.arg(subcommand).args(node.dirs());
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// Issue 13, point 12: a FIFO named like a config hangs neither install nor the exit of
/// --watch, and a link to /dev/zero or a huge file is not read into memory.
#[test]
fn fifos_devices_and_huge_files_neither_hang_nor_flood() {
    let node = Node::with(&["10-calico.conflist"]);
    nix::unistd::mkfifo(
        &node.conf.join("05-fifo.conflist"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    std::os::unix::fs::symlink("/dev/zero", node.conf.join("00-zero.conf")).unwrap();
    // Sparse: large to read, nothing on disk.
    fs::File::create(node.conf.join("01-huge.conf"))
        .unwrap()
        .set_len(4 << 30)
        .unwrap();
    let out = output_within(&mut capped("install", &node), 20);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(chained_last(&node, "10-calico.conflist"));
    for why in ["00-zero.conf", "01-huge.conf", "05-fifo.conflist"] {
        assert!(
            stderr(&out).contains(why),
            "{why} not reported: {}",
            stderr(&out)
        );
    }
    let mut watcher = node.spawn_watch_with(&["--uninstall-on-exit"]);
    std::thread::sleep(Duration::from_millis(300));
    // The watcher's exit reads the dir again to uninstall: it must not block on the FIFO.
    assert_eq!(watcher.signal(Signal::SIGTERM).code(), Some(0));
    assert_eq!(
        node.read("10-calico.conflist"),
        fs::read(testdata("10-calico.conflist")).unwrap()
    );
    let out = output_within(&mut capped("uninstall", &node), 20);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Issue 13, point 15: two watchers with different configs (a rolling update with surge)
/// converge on the higher generation's entry, and stopping the other keeps it.
#[test]
fn two_watchers_converge_and_the_loser_stops_rewriting() {
    let node = Node::with(&["10-calico.conflist"]);
    let old_config = node.root.path().join("old.json");
    let new_config = node.root.path().join("new.json");
    fs::write(&old_config, r#"{"podSelection": "annotated"}"#).unwrap();
    fs::write(&new_config, r#"{"podSelection": "all"}"#).unwrap();
    let mut old = node.spawn_watch_with(&[
        "--generation",
        "3",
        "--uninstall-on-exit",
        "--plugin-config",
        old_config.to_str().unwrap(),
    ]);
    node.eventually("old entry", || {
        our_entry(&node, "10-calico.conflist").is_some_and(|e| e["podSelection"] == "annotated")
    });
    let mut new = node.spawn_watch_with(&[
        "--generation",
        "4",
        "--plugin-config",
        new_config.to_str().unwrap(),
    ]);
    node.eventually("new entry", || {
        our_entry(&node, "10-calico.conflist").is_some_and(|e| e["podSelection"] == "all")
    });
    // The primary agent rewrites its file: both react, the new entry ends up there, and then
    // nobody writes any more.
    agent_writes(
        &node,
        "10-calico.conflist",
        &fs::read(testdata("10-calico.conflist")).unwrap(),
    );
    node.eventually("new entry again", || {
        our_entry(&node, "10-calico.conflist").is_some_and(|e| e["podSelection"] == "all")
            && chained_last(&node, "10-calico.conflist")
    });
    std::thread::sleep(Duration::from_millis(400));
    let settled = fs::metadata(node.conf.join("10-calico.conflist")).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let later = fs::metadata(node.conf.join("10-calico.conflist")).unwrap();
    assert_eq!(
        (settled.ino(), settled.mtime_nsec()),
        (later.ino(), later.mtime_nsec()),
        "still rewriting:\n{}",
        watch_log(&node)
    );
    // The old one stops (even with --uninstall-on-exit): the new one's entry and binary stay.
    assert_eq!(old.signal(Signal::SIGTERM).code(), Some(0));
    assert_eq!(
        our_entry(&node, "10-calico.conflist").unwrap()["podSelection"],
        "all"
    );
    assert!(node.binary().exists());
    assert_eq!(new.signal(Signal::SIGTERM).code(), Some(0));
    assert!(chained_last(&node, "10-calico.conflist"));
}

/// Issue 13, point 15: the entry of an installer that is gone (killed, or its DaemonSet deleted
/// and re-created with generations starting over) never holds back a live one.
#[test]
fn a_gone_installers_entry_does_not_hold_back_a_live_one() {
    let node = Node::with(&["10-calico.conflist"]);
    let configs: Vec<PathBuf> = ["annotated", "all", "annotated"]
        .iter()
        .enumerate()
        .map(|(i, selection)| {
            let path = node.root.path().join(format!("config-{i}.json"));
            fs::write(&path, format!(r#"{{"podSelection": "{selection}"}}"#)).unwrap();
            path
        })
        .collect();
    let arg = |i: usize| configs[i].to_str().unwrap().to_owned();
    let mut high = node.spawn_watch_with(&["--generation", "9", "--plugin-config", &arg(0)]);
    node.eventually("generation 9", || {
        our_entry(&node, "10-calico.conflist").is_some_and(|e| e["installer"]["generation"] == 9)
    });
    // SIGKILL: no chance to clean up; the kernel drops its lock.
    high.0.as_mut().unwrap().kill().unwrap();
    high.0.take().unwrap().wait().unwrap();
    let mut low = node.spawn_watch_with(&["--generation", "1", "--plugin-config", &arg(1)]);
    node.eventually("generation 1 takes over", || {
        our_entry(&node, "10-calico.conflist")
            .is_some_and(|e| e["installer"]["generation"] == 1 && e["podSelection"] == "all")
    });
    // A live higher generation does win, and after its SIGTERM the live lower one takes over.
    let mut higher = node.spawn_watch_with(&["--generation", "2", "--plugin-config", &arg(2)]);
    node.eventually("generation 2", || {
        our_entry(&node, "10-calico.conflist").is_some_and(|e| e["installer"]["generation"] == 2)
    });
    assert_eq!(higher.signal(Signal::SIGTERM).code(), Some(0));
    agent_writes(
        &node,
        "10-calico.conflist",
        &fs::read(testdata("10-calico.conflist")).unwrap(),
    );
    node.eventually("generation 1 again", || {
        our_entry(&node, "10-calico.conflist").is_some_and(|e| e["installer"]["generation"] == 1)
    });
    assert_eq!(low.signal(Signal::SIGTERM).code(), Some(0));
    assert!(
        !node.names().iter().any(|n| n.ends_with(".lock")),
        "{:?}",
        node.names()
    );
}

/// Issue 15, point 1: a config the plugin would refuse is never chained: one-shot install
/// fails; a watcher keeps the last good entry, and says why with a hint.
#[test]
fn a_typod_config_is_refused_and_the_old_entry_stays() {
    let node = Node::with(&["10-calico.conflist"]);
    let mut map = ConfigMap::new(
        node.root.path().join("config"),
        "plugin-config.json",
        r#"{"podSelection": "all", "excludeNamespaces": ["kube-system"]}"#,
    );
    let config = map.path("plugin-config.json");
    for bad in [
        r#"{"inboundPort": 0}"#,
        r#"{"backend": "nftabels"}"#,
        r#"{"excludeNamespace": ["kube-system"]}"#,
        "{",
    ] {
        let path = node.root.path().join("bad.json");
        fs::write(&path, bad).unwrap();
        let out = node.run("install", &["--plugin-config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{bad}");
        assert_eq!(
            node.read("10-calico.conflist"),
            fs::read(testdata("10-calico.conflist")).unwrap()
        );
        assert!(!node.binary().exists());
    }
    let out = node.run(
        "install",
        &[
            "--plugin-config",
            node.root.path().join("bad.json").to_str().unwrap(),
        ],
    );
    assert!(stderr(&out).contains("plugin config"), "{}", stderr(&out));

    let mut watcher = node.spawn_watch_with(&["--plugin-config", &config]);
    node.eventually("good entry", || {
        our_entry(&node, "10-calico.conflist").is_some_and(|e| e["podSelection"] == "all")
    });
    let good = node.read("10-calico.conflist");
    // A ConfigMap update with a typo: refused, the entry stays as it was.
    map.update(
        "plugin-config.json",
        r#"{"podSelection": "annotated", "excludeNamespace": ["kube-system"]}"#,
    );
    node.eventually("the refusal in the log", || {
        watch_log(&node).contains("did you mean \\\"excludeNamespaces\\\"")
            || watch_log(&node).contains("did you mean \"excludeNamespaces\"")
    });
    // The primary agent rewrites its file meanwhile: the last good entry goes back in.
    agent_writes(
        &node,
        "10-calico.conflist",
        &fs::read(testdata("10-calico.conflist")).unwrap(),
    );
    node.eventually("last good entry back", || {
        node.read("10-calico.conflist") == good
    });
    // Fixed: the new config is chained (an edited config is reloaded).
    map.update(
        "plugin-config.json",
        r#"{"podSelection": "annotated", "excludeNamespaces": ["kube-system"]}"#,
    );
    node.eventually("fixed entry", || {
        our_entry(&node, "10-calico.conflist").is_some_and(|e| e["podSelection"] == "annotated")
    });
    assert!(chained_last(&node, "10-calico.conflist"));
    assert!(watcher.signal(Signal::SIGTERM).success());

    // A new agent starting with a bad config leaves the node as the old one left it.
    let before = node.snapshot();
    map.update("plugin-config.json", r#"{"inboundPort": 0}"#);
    let mut bad = node.spawn_watch_with(&["--plugin-config", &config]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(node.snapshot(), before);
    assert_eq!(bad.signal(Signal::SIGTERM).code(), Some(0));
}

/// Issue 15, point 5: a deleted, replaced or chmod'ed binary comes back.
#[test]
fn a_deleted_or_replaced_binary_comes_back() {
    let node = Node::with(&["10-calico.conflist"]);
    let mut watcher = node.spawn_watch();
    let ours = fs::read(BIN).unwrap();
    let is_ours_binary = || {
        fs::read(node.binary()).is_ok_and(|b| b == ours)
            && fs::metadata(node.binary()).unwrap().permissions().mode() & 0o777 == 0o755
    };
    node.eventually("first install", || {
        chained_last(&node, "10-calico.conflist") && is_ours_binary()
    });
    fs::remove_file(node.binary()).unwrap();
    node.eventually("binary back after delete", is_ours_binary);
    fs::write(node.binary(), "#!/bin/sh\nexit 0\n").unwrap();
    node.eventually("binary back after overwrite", is_ours_binary);
    fs::set_permissions(node.binary(), fs::Permissions::from_mode(0o644)).unwrap();
    node.eventually("binary back after chmod", is_ours_binary);
    assert_no_temp_files(&node.bin);
    assert!(watcher.signal(Signal::SIGTERM).success());
}

/// Issue 15, point 1: pods of a namespace the config excludes start even when another key of
/// that config is invalid; other pods still get the error.
#[test]
fn excluded_namespaces_survive_an_invalid_config() {
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": [{"address": "10.1.0.5/24", "interface": 0}]});
    let conf = json!({"cniVersion": "1.0.0", "name": "n", "type": "intercept-cni", "backend": "nftabels",
                      "excludeNamespaces": ["kube-system"], "prevResult": prev});
    for (command, namespace, ok) in [
        ("ADD", "kube-system", true),
        ("CHECK", "kube-system", true),
        ("ADD", "default", false),
    ] {
        let mut child = Command::new(BIN)
            .env_clear()
            .envs([
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", "3f2a9c"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/var/run/netns/intercept-cni-no-such-netns"),
                ("CNI_PATH", "/opt/cni/bin"),
                (
                    "CNI_ARGS",
                    &format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=p"),
                ),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.success(),
            ok,
            "{command} {namespace}: {stdout} {}",
            stderr(&out)
        );
        match (command, ok) {
            ("ADD", true) => {
                let answer: Value = serde_json::from_str(&stdout).unwrap();
                assert_eq!(answer["ips"], prev["ips"]);
            }
            ("CHECK", true) => assert_eq!(stdout, ""),
            _ => assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["code"], 7),
        }
    }
}

/// A primary agent that rewrites its file every 50 ms for seconds on end does not starve the
/// watcher (it acts at most a second after the first change), and nothing is left behind.
#[test]
fn a_writer_that_never_pauses_does_not_starve_the_watcher() {
    let node = Node::with(&["10-calico.conflist"]);
    let mut watcher = node.spawn_watch();
    node.eventually("first install", || {
        chained_last(&node, "10-calico.conflist")
    });
    let conf = node.conf.clone();
    let writer = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut marker = 0;
        while Instant::now() < deadline {
            marker += 1;
            let temp = conf.join("calico.agent-tmp");
            fs::write(&temp, calico_with_marker(marker)).unwrap();
            fs::rename(&temp, conf.join("10-calico.conflist")).unwrap();
            std::thread::sleep(Duration::from_millis(25));
        }
        marker
    });
    let mut seen_chained = 0;
    while !writer.is_finished() {
        // Chained into one of the storm's writes (the fixture's own mtu is 0).
        let into_storm = serde_json::from_slice::<Value>(&node.read("10-calico.conflist"))
            .is_ok_and(|doc| doc["plugins"][0]["mtu"].as_u64() > Some(0));
        seen_chained += usize::from(into_storm && chained_last(&node, "10-calico.conflist"));
        std::thread::sleep(Duration::from_millis(5));
    }
    let marker = writer.join().unwrap();
    assert!(
        seen_chained > 0,
        "never chained while the agent kept writing"
    );
    node.eventually("the last write, chained", || {
        chained_last(&node, "10-calico.conflist")
            && node.json("10-calico.conflist")["plugins"][0]["mtu"] == marker
    });
    assert_no_temp_files(&node.conf);
    assert!(watcher.signal(Signal::SIGTERM).success());
}

/// `GET path` from the agent whose address `install --watch --listen` logged.
fn http_get(node: &Node, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let log = watch_log(node);
    let addr = log
        .lines()
        .find_map(|l| l.split("/metrics on ").nth(1))
        .expect("the agent logs its address")
        .trim()
        .to_owned();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    (text[9..12].parse().unwrap(), text)
}

/// Issue 15, point 1: under --watch a refused config keeps the last good entry and makes the
/// agent not ready until a good one is loaded.
#[test]
fn a_refused_config_makes_the_agent_not_ready() {
    let node = Node::with(&["10-calico.conflist"]);
    let mut map = ConfigMap::new(
        node.root.path().join("config"),
        "plugin-config.json",
        r#"{"backend": "nftables"}"#,
    );
    let host = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/hosts/builtin-only");
    let mut watcher = node.spawn_watch_with(&[
        "--plugin-config",
        &map.path("plugin-config.json"),
        "--listen",
        "127.0.0.1:0",
        "--host-root",
        host.to_str().unwrap(),
    ]);
    node.eventually("ready", || {
        watch_log(&node).contains("/metrics on ") && http_get(&node, "/readyz").0 == 200
    });
    let good = node.read("10-calico.conflist");
    map.update(
        "plugin-config.json",
        r#"{"backend": "nftables", "inboundPort": 0}"#,
    );
    node.eventually("not ready", || {
        let (status, text) = http_get(&node, "/readyz");
        status == 503 && text.contains("plugin config is refused")
    });
    assert_eq!(node.read("10-calico.conflist"), good);
    map.update(
        "plugin-config.json",
        r#"{"backend": "nftables", "inboundPort": 15106}"#,
    );
    node.eventually("ready again", || http_get(&node, "/readyz").0 == 200);
    assert_eq!(
        our_entry(&node, "10-calico.conflist").unwrap()["inboundPort"],
        15106
    );
    assert!(watcher.signal(Signal::SIGTERM).success());
}
