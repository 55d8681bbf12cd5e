//! Root only: many plugin processes at once, as at node start (sharing the once-per-boot host
//! check in their state dir), and many ADD/DEL cycles on one namespace. Everything the plugin made must be gone after DEL: rules in the namespaces, and
//! host-side files (its state and log under the test's stateDir, the per-netns xtables lock).

mod common;

use common::{run_plugin, Netns};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde_json::{json, Value};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PARALLEL: usize = 50;
const LOG_MAX_BYTES: u64 = 65536;

/// The backends under test, as config settings.
fn backends() -> Vec<(&'static str, Value)> {
    vec![
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

/// After DEL, no lock file for the namespace: the iptables backend removes it (even one left by
/// an earlier namespace with the same, recycled, inode number); the others never make one.
fn assert_no_lock_left(backend: &str, ns: &Netns, existed_before: bool) {
    let lock = lock_file(ns);
    if backend.starts_with("iptables") || !existed_before {
        assert!(!lock.exists(), "{backend}: {}", lock.display());
    }
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

/// Names of host-check verdict files renamed into the watched state dir since the last call.
fn cache_publications(watch: &Inotify) -> Vec<String> {
    let mut names = Vec::new();
    while let Ok(events) = watch.read_events() {
        names.extend(
            events
                .into_iter()
                .filter(|e| e.mask.contains(AddWatchFlags::IN_MOVED_TO))
                .filter_map(|e| e.name)
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| n.starts_with("host-") && n.ends_with(".json")),
        );
    }
    names
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
        // The state dir exists (private, so it is used as it is) so its writes can be watched
        // from the start.
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("state dir");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        let watch = Inotify::init(InitFlags::IN_NONBLOCK).expect("inotify");
        watch
            .add_watch(
                &state,
                AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
            )
            .expect("watch the state dir");
        let namespaces: Vec<Netns> = (0..PARALLEL).map(|_| Netns::new("par")).collect();
        let locks_before: Vec<bool> = namespaces.iter().map(|ns| lock_file(ns).exists()).collect();
        let confs: Vec<Value> = namespaces
            .iter()
            .map(|ns| config(&settings, ns, dir.path()))
            .collect();
        all_at_once("ADD", &namespaces, &confs);
        // The once-per-boot host check: one verdict file, renamed into place once, by one of
        // the fifty ADDs; the others waited for it or read it (all succeeded on it).
        let published = cache_publications(&watch);
        assert_eq!(published.len(), 1, "{name}: {published:?}");
        assert!(
            published[0].starts_with(&format!("host-{name}-")),
            "{name}: {published:?}"
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700, "{name}: the state dir's mode changed");
        for file in files_under(&state) {
            assert_eq!(mode(&state.join(&file)), 0o600, "{name}: {file}");
        }
        for ns in &namespaces {
            assert!(
                !plugin_rules(ns).is_empty(),
                "{name}: {} has no rules",
                ns.name
            );
        }
        all_at_once("CHECK", &namespaces, &confs);
        all_at_once("DEL", &namespaces, &confs);
        all_at_once("ADD", &namespaces[..1], &confs[..1]);
        all_at_once("DEL", &namespaces[..1], &confs[..1]);
        let again = cache_publications(&watch);
        assert_eq!(
            again,
            Vec::<String>::new(),
            "{name}: the host check ran again"
        );
        for (ns, existed) in namespaces.iter().zip(locks_before) {
            assert_eq!(
                plugin_rules(ns),
                Vec::<String>::new(),
                "{name}: {}",
                ns.name
            );
            assert_no_lock_left(name, ns, existed);
        }
        let log = std::fs::read_to_string(dir.path().join("cni.log")).expect("log");
        for (verb, expected) in [
            ("ADD", PARALLEL + 1),
            ("CHECK", PARALLEL),
            ("DEL", PARALLEL + 1),
        ] {
            let lines = log
                .lines()
                .filter(|l| l.contains(&format!(" {verb} pod=")) && l.contains("outcome=ok"))
                .count();
            assert_eq!(lines, expected, "{name}: {verb} lines in the log");
        }
        assert_log_bounded(dir.path());
    }
    eprintln!("parallel ADD/CHECK/DEL: {:?}", started.elapsed());
}

/// `cycles` ADD/DEL pairs on one namespace; returns how long they took.
fn add_del_cycles(name: &str, settings: &Value, cycles: usize) -> Duration {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let ns = Netns::new("cycle");
    let lock_existed = lock_file(&ns).exists();
    let conf = config(settings, &ns, dir.path()).to_string();
    let mut files_after_first = None;
    for cycle in 0..cycles {
        for command in ["ADD", "DEL"] {
            let r = run_plugin(command, Some(&ns.path()), conf.as_bytes());
            let context = format!("{name} cycle {cycle} {command}");
            assert_eq!(
                r.protocol(command, &context),
                None,
                "{context}: {}",
                r.stdout
            );
        }
        // Host-side files do not grow with the number of cycles: what the first cycle left
        // (the log, its rotation, the once-per-boot host check) is all there ever is.
        let mut files = files_under(dir.path());
        files.retain(|f| f != "cni.log.1");
        match &files_after_first {
            None => files_after_first = Some(files),
            Some(first) => assert_eq!(&files, first, "{name} cycle {cycle}: files"),
        }
    }
    assert_eq!(plugin_rules(&ns), Vec::<String>::new(), "{name}");
    assert_no_lock_left(name, &ns, lock_existed);
    assert_log_bounded(dir.path());
    let path = ns.path();
    drop(ns);
    assert!(!Path::new(&path).exists(), "netns {path} left behind");
    started.elapsed()
}

/// 1,000 cycles on the preferred backend; fewer on each iptables variant, whose every step
/// runs two tools per family (`ICNI_CYCLES` sets the first count, a fifth of it the others).
#[test]
fn repeated_add_del_cycles_leave_no_rules_and_no_host_state() {
    let cycles: usize = std::env::var("ICNI_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let started = Instant::now();
    for (i, (name, settings)) in backends().iter().enumerate() {
        let n = if i == 0 { cycles } else { cycles / 5 };
        let took = add_del_cycles(name, settings, n);
        eprintln!("{n} ADD/DEL cycles ({name}): {took:?}");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(150),
        "cycles took {elapsed:?}"
    );
}

/// iptables operations on one netns are serialised, both families together: parallel ADDs
/// leave exactly one jump per hook and family, and an ADD racing a DEL leaves the pod fully
/// intercepted (CHECK passes) or with nothing of ours, never one family without the other.
#[test]
fn iptables_operations_on_one_netns_are_serialised() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (backend, settings) in backends().into_iter().skip(1) {
        let ns = Netns::new("serial");
        let conf = config(&settings, &ns, dir.path()).to_string();
        let run = |command: &str| run_plugin(command, Some(&ns.path()), conf.as_bytes());
        for round in 0..5 {
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| run("ADD").ok("ADD").code);
                }
            });
            let state = ns.firewall_state();
            for jump in [
                "-A PREROUTING -p tcp -j ICNI_INBOUND",
                "-A OUTPUT -p tcp -j ICNI_OUTBOUND",
            ] {
                let n = state.lines().filter(|l| *l == jump).count();
                assert_eq!(n, 2, "{backend} round {round}: {n} times `{jump}`\n{state}");
            }
            run("CHECK").ok("CHECK");
        }
        for round in 0..100 {
            let (add, del) = std::thread::scope(|s| {
                let add = s.spawn(|| run("ADD"));
                let del = s.spawn(|| run("DEL"));
                (add.join().unwrap(), del.join().unwrap())
            });
            add.ok("ADD");
            del.ok("DEL");
            let left = plugin_rules(&ns);
            if !left.is_empty() {
                let check = run("CHECK");
                assert_eq!(
                    check.code, 0,
                    "{backend} round {round}: half installed: {}\n{left:?}",
                    check.stdout
                );
            }
        }
        run("DEL").ok("DEL");
    }
}
