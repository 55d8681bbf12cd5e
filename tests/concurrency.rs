//! Root only: many plugin processes at once, as at node start, and many ADD/DEL cycles on one
//! namespace. Everything the plugin made must be gone after DEL: rules in the namespaces, and
//! host-side files (its state and log under the test's stateDir, the per-netns xtables lock).

mod common;

use common::{run_plugin, Netns};
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PARALLEL: usize = 50;
const LOG_MAX_BYTES: u64 = 65536;

/// The backends under test, as config settings.
fn backends() -> Vec<(&'static str, Value)> {
    vec![
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

/// A chained config for a pod netns with both families, its files under `dir`.
fn config(settings: &Value, netns: &Netns, dir: &Path) -> Value {
    let mut conf = json!({
        "cniVersion": "1.1.0",
        "name": "mesh",
        "type": "intercept-cni",
        "podSelection": "all",
        "stateDir": dir.join("state"),
        "logFile": dir.join("cni.log"),
        "logFileMaxBytes": LOG_MAX_BYTES,
        "prevResult": {
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "eth0", "sandbox": netns.path()}],
            "ips": [
                {"address": "10.248.0.2/24", "interface": 0},
                {"address": "fd00:248::2/64", "interface": 0}
            ]
        }
    });
    for (k, v) in settings.as_object().expect("settings object") {
        conf[k] = v.clone();
    }
    conf
}

/// Anything of the plugin's in a netns: its nft table or its iptables chains.
fn plugin_rules(ns: &Netns) -> Vec<String> {
    ns.firewall_state()
        .lines()
        .filter(|l| l.contains("intercept-cni") || l.contains("ICNI_"))
        .map(str::to_string)
        .collect()
}

/// The per-netns xtables lock file iptables-legacy-restore creates for this namespace.
fn lock_file(ns: &Netns) -> PathBuf {
    let ino = std::fs::metadata(ns.path()).expect("netns file").ino();
    PathBuf::from(format!("/run/intercept-cni/xtables-{ino}.lock"))
}

/// Files under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    found.sort();
    found
}

/// Runs `command` on every namespace at once, one plugin process each; all must succeed.
fn all_at_once(command: &str, namespaces: &[Netns], confs: &[Value]) {
    std::thread::scope(|s| {
        let runs: Vec<_> = namespaces
            .iter()
            .zip(confs)
            .map(|(ns, conf)| {
                s.spawn(move || {
                    let r = run_plugin(command, Some(&ns.path()), conf.to_string().as_bytes());
                    (ns.name.clone(), r)
                })
            })
            .collect();
        for run in runs {
            let (name, r) = run.join().expect("plugin thread");
            assert_eq!(
                r.protocol(command, &format!("{command} {name}")),
                None,
                "{command} {name}: {} {}",
                r.stdout,
                r.stderr
            );
        }
    });
}

/// The log stays within its bound (the file and one rotated file) and every line is whole.
fn assert_log_bounded(dir: &Path) {
    let log = dir.join("cni.log");
    for file in [log.clone(), PathBuf::from(format!("{}.1", log.display()))] {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        assert!(
            text.len() as u64 <= LOG_MAX_BYTES + 64 * 1024,
            "{} is {} bytes",
            file.display(),
            text.len()
        );
        assert!(
            text.lines().all(|l| l.contains(" intercept-cni[")),
            "torn line in {}",
            file.display()
        );
    }
}

#[test]
fn parallel_adds_on_distinct_namespaces_then_parallel_dels_leave_nothing() {
    let started = Instant::now();
    for (name, settings) in backends() {
        let dir = tempfile::tempdir().expect("temp dir");
        let namespaces: Vec<Netns> = (0..PARALLEL).map(|_| Netns::new("par")).collect();
        let confs: Vec<Value> = namespaces
            .iter()
            .map(|ns| config(&settings, ns, dir.path()))
            .collect();
        all_at_once("ADD", &namespaces, &confs);
        for ns in &namespaces {
            assert!(
                !plugin_rules(ns).is_empty(),
                "{name}: {} has no rules",
                ns.name
            );
        }
        all_at_once("CHECK", &namespaces, &confs);
        all_at_once("DEL", &namespaces, &confs);
        for ns in &namespaces {
            assert_eq!(
                plugin_rules(ns),
                Vec::<String>::new(),
                "{name}: {}",
                ns.name
            );
            assert!(
                !lock_file(ns).exists(),
                "{name}: {}",
                lock_file(ns).display()
            );
        }
        let log = std::fs::read_to_string(dir.path().join("cni.log")).expect("log");
        for verb in ["ADD", "CHECK", "DEL"] {
            let lines = log
                .lines()
                .filter(|l| l.contains(&format!(" {verb} pod=")) && l.contains("outcome=ok"))
                .count();
            assert_eq!(lines, PARALLEL, "{name}: {verb} lines in the log");
        }
        assert_log_bounded(dir.path());
    }
    eprintln!("parallel ADD/CHECK/DEL: {:?}", started.elapsed());
}

#[test]
fn repeated_add_del_cycles_leave_no_rules_and_no_host_state() {
    let cycles: usize = std::env::var("ICNI_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let ns = Netns::new("cycle");
    let lock = lock_file(&ns);
    let (name, settings) = &backends()[0];
    let conf = config(settings, &ns, dir.path()).to_string();
    let mut files_after_first = None;
    for cycle in 0..cycles {
        let r = run_plugin("ADD", Some(&ns.path()), conf.as_bytes());
        assert_eq!(
            r.protocol("ADD", "ADD"),
            None,
            "cycle {cycle}: {}",
            r.stdout
        );
        let r = run_plugin("DEL", Some(&ns.path()), conf.as_bytes());
        assert_eq!(
            r.protocol("DEL", "DEL"),
            None,
            "cycle {cycle}: {}",
            r.stdout
        );
        // Host-side files do not grow with the number of cycles: what the first cycle left
        // (the log, its rotation, a once-per-boot cache) is all there ever is.
        let mut files = files_under(dir.path());
        files.retain(|f| f != "cni.log.1");
        match &files_after_first {
            None => files_after_first = Some(files),
            Some(first) => assert_eq!(&files, first, "cycle {cycle}: files under stateDir"),
        }
    }
    assert_eq!(plugin_rules(&ns), Vec::<String>::new(), "{name}");
    assert!(!lock.exists(), "{}", lock.display());
    assert_log_bounded(dir.path());
    let path = ns.path();
    drop(ns);
    assert!(!Path::new(&path).exists(), "netns {path} left behind");
    let elapsed = started.elapsed();
    eprintln!("{cycles} ADD/DEL cycles ({name}): {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(150),
        "{cycles} cycles took {elapsed:?}"
    );
}
