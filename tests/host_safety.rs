//! Root only: the plugin runs as root on every node, so input must never turn it against the
//! host. The host's netns is refused by identity, whatever path names it (a bind mount, a
//! symlink, another process's or thread's link); the log file never
//! lands in another owner's files; the log stays bounded with many writers; each verb logs one
//! line; and no binary is run through a shell or a relative path.

mod common;

use common::{run_plugin, Lab};
use serde_json::{json, Value};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

const NOBODY: u32 = 65534;

/// A bind mount removed on drop, even when the test fails.
struct BindMount(PathBuf);

impl BindMount {
    fn new(source: &str, target: &Path) -> BindMount {
        fs::write(target, "").expect("mount point");
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind mount");
        BindMount(target.to_path_buf())
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn status_config(extra: Value) -> Value {
    let mut conf = json!({
        "cniVersion": "1.1.0",
        "name": "mesh",
        "type": "intercept-cni",
        "backend": "iptables",
        "iptablesMode": "nft",
        "logLevel": "debug",
    });
    for (k, v) in extra.as_object().expect("object") {
        conf[k] = v.clone();
    }
    conf
}

/// Lines of the host's own ruleset that would be the plugin's.
fn host_plugin_rules() -> usize {
    let out = std::process::Command::new("/usr/sbin/nft")
        .args(["list", "ruleset"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("ICNI_") || l.contains("intercept-cni"))
        .count()
}

#[test]
fn the_hosts_netns_is_refused_whatever_path_names_it() {
    let lab = Lab::new();
    let conf = lab.config(
        "1.0.0",
        json!({"backend": "iptables", "iptablesMode": "nft"}),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    // The test runs in the host's netns. (PID 1's namespace files are not readable on every
    // machine, this sandbox's included, so the test's own stand in for them.)
    let own = format!("/proc/{}/ns/net", std::process::id());
    let _bound = BindMount::new(&own, &dir.path().join("hostns"));
    let link = dir.path().join("link");
    symlink("/proc/self/ns/net", &link).expect("symlink");
    let task = format!(
        "/proc/{}/task/{}/ns/net",
        std::process::id(),
        nix::unistd::gettid()
    );
    let before = host_plugin_rules();
    for path in [
        dir.path().join("hostns"),
        link,
        PathBuf::from(task),
        PathBuf::from(own.clone()),
    ] {
        let path = path.to_str().expect("utf-8");
        for command in ["ADD", "CHECK"] {
            let r = run_plugin(command, Some(path), conf.to_string().as_bytes());
            let e = r.error(command, 102);
            assert!(
                e["msg"].as_str().unwrap_or_default().contains("host"),
                "{e}"
            );
        }
        // DEL there is a no-op, not an error: ADD never programmed it.
        run_plugin("DEL", Some(path), conf.to_string().as_bytes()).ok("DEL");
    }
    assert_eq!(host_plugin_rules(), before);
}

#[test]
fn the_log_file_never_lands_in_another_owners_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let theirs_dir = dir.path().join("theirs");
    fs::create_dir(&theirs_dir).unwrap();
    let theirs = theirs_dir.join("precious");
    fs::write(&theirs, "not yours\n").unwrap();
    for p in [&theirs_dir, &theirs] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let link = dir.path().join("link.log");
    symlink(&theirs, &link).unwrap();
    let hard = dir.path().join("hard.log");
    fs::hard_link(&theirs, &hard).unwrap();
    let shared = dir.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();

    for (log, why) in [
        (link, "symlink"),
        (hard, "hard link"),
        (theirs_dir.join("new.log"), "another owner's directory"),
        (shared.join("new.log"), "a world-writable directory"),
    ] {
        let conf = status_config(json!({"logFile": log}));
        let r = run_plugin("STATUS", None, conf.to_string().as_bytes());
        // Logging falls back to stderr; the verb itself is unaffected.
        r.ok("STATUS");
        assert!(
            r.stderr.contains("cannot open logFile"),
            "{why}: {}",
            r.stderr
        );
    }
    assert_eq!(fs::read_to_string(&theirs).unwrap(), "not yours\n");
    assert!(!theirs_dir.join("new.log").exists());
    assert!(!shared.join("new.log").exists());

    let good = dir.path().join("cni.log");
    let conf = status_config(json!({"logFile": good}));
    run_plugin("STATUS", None, conf.to_string().as_bytes()).ok("STATUS");
    let mode = fs::metadata(&good).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// ADD keeps its once-per-boot host check in `stateDir`: a symlink planted there, or a path
/// through another owner's directory, is refused before anything is written or programmed.
#[test]
fn the_state_dir_never_leads_into_another_owners_files() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let theirs = dir.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    let link = dir.path().join("state-link");
    symlink(&theirs, &link).unwrap();
    let before = lab.pod.firewall_state();
    for state_dir in [link.clone(), theirs.join("state"), link.join("state")] {
        let conf = lab.config(
            "1.0.0",
            json!({"backend": "nftables", "stateDir": state_dir}),
        );
        let r = run_plugin("ADD", Some(&lab.pod.path()), conf.to_string().as_bytes());
        let e = r.error("ADD", 7);
        assert!(
            e["msg"].as_str().unwrap_or_default().contains("refusing"),
            "{}: {e}",
            state_dir.display()
        );
        assert_eq!(lab.pod.firewall_state(), before, "{}", state_dir.display());
    }
    assert_eq!(
        fs::read_dir(&theirs).unwrap().count(),
        0,
        "written into theirs"
    );
}

/// Many plugin processes writing and rotating one log at once: the log and one rotated file,
/// each within the bound plus the lines in flight, and every line whole.
#[test]
fn the_log_stays_bounded_with_many_writers() {
    const MAX: u64 = 4096;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("cni.log");
    let conf = status_config(json!({"logFile": log, "logFileMaxBytes": MAX})).to_string();
    let writers = 40;
    for _round in 0..3 {
        std::thread::scope(|s| {
            for _ in 0..writers {
                s.spawn(|| {
                    run_plugin("STATUS", None, conf.as_bytes())
                        .ok("STATUS")
                        .code
                });
            }
        });
    }
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["cni.log", "cni.log.1"]);
    for name in names {
        let text = fs::read_to_string(dir.path().join(&name)).unwrap();
        let longest = text.lines().map(str::len).max().unwrap_or(0) as u64 + 1;
        assert!(
            text.len() as u64 <= MAX + writers * longest,
            "{name}: {} bytes",
            text.len()
        );
        for line in text.lines() {
            assert!(
                line.contains(" intercept-cni[") && line.contains(": "),
                "{name}: torn line {line:?}"
            );
        }
    }
}

/// One line per ADD/CHECK/DEL, naming the pod, container, backend, outcome and duration.
#[test]
fn each_verb_logs_one_line_with_its_outcome() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("cni.log");
    let conf = lab.config(
        "1.0.0",
        json!({"backend": "iptables", "iptablesMode": "nft", "logLevel": "info", "logFile": log}),
    );
    for command in ["ADD", "CHECK", "DEL"] {
        lab.cni(command, &conf).ok();
    }
    let refused = run_plugin(
        "ADD",
        Some("/proc/self/ns/net"),
        conf.to_string().as_bytes(),
    );
    refused.error("ADD", 102);

    let text = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    for (line, verb, outcome) in [
        (lines[0], "ADD", "iptables-nft outcome=ok "),
        (lines[1], "CHECK", "iptables-nft outcome=ok "),
        (lines[2], "DEL", "iptables-nft outcome=ok "),
        // Refused before a backend was chosen.
        (lines[3], "ADD", "- outcome=error 102: "),
    ] {
        let who = format!(": {verb} pod=default/lab container=ctr-0123456789abcdef ");
        let what = format!(" backend={outcome}");
        assert!(line.contains(&who), "{who:?} not in {line:?}");
        assert!(line.contains(&what), "{what:?} not in {line:?}");
        let duration = line
            .rsplit_once(" duration=")
            .and_then(|(_, d)| d.strip_suffix("ms"))
            .and_then(|d| d.parse::<f64>().ok());
        assert!(duration.is_some_and(|ms| ms >= 0.0), "{line}");
    }
}

/// Every `Command::new` in the plugin's source, with why its program is an absolute path. A new
/// one fails this test until it is reviewed and listed here.
const REVIEWED_SPAWNS: &[(&str, &str, &str)] = &[
    (
        "src/backend/iptables/tools.rs",
        "Command::new(binary)",
        "binary comes from Tools::locate: a fixed absolute search dir or the validated absolute iptablesPath",
    ),
    (
        "src/host/mod.rs",
        "Command::new(format!(\"/usr/sbin/{tool}\")",
        "a literal absolute directory and a fixed tool name",
    ),
    (
        "src/main.rs",
        "Command::new(&tool)",
        "agent::repair::node_tool: our own directory and a fixed name, trusted_executable first",
    ),
    (
        "src/agent/repair.rs",
        "Command::new(&tool)",
        "node_tool: our own directory and a fixed name, trusted_executable first",
    ),
];

#[test]
fn no_shell_and_only_reviewed_absolute_spawns() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pending = vec![root.join("src")];
    let mut spawns = Vec::new();
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let text = fs::read_to_string(&path).unwrap();
            for line in text.lines() {
                for shell in [
                    "\"sh\"",
                    "\"/bin/sh\"",
                    "\"bash\"",
                    "\"/bin/bash\"",
                    "\"-c\"",
                ] {
                    assert!(!line.contains(shell), "{rel}: shell in {line:?}");
                }
                if let Some(at) = line.find("Command::new(") {
                    let call = &line[at..];
                    let call = &call[..call.find(')').map_or(call.len(), |i| i + 1)];
                    spawns.push((rel.clone(), call.to_string()));
                }
            }
        }
    }
    assert!(!spawns.is_empty(), "the audit found no spawn at all");
    for (file, call) in &spawns {
        assert!(
            REVIEWED_SPAWNS
                .iter()
                .any(|(f, c, _)| f == file && c == call),
            "unreviewed spawn {call} in {file}: list it in REVIEWED_SPAWNS with why its path is absolute"
        );
    }
}

/// The mode bits of `path`.
fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A `stateDir` that exists and is not private (root-owned 0755 like `/`, 0555 like `/proc`,
/// 0711) is refused with code 7 by ADD, CHECK and STATUS, and left alone by DEL (`backend: auto`
/// included): its mode is never changed and nothing is written into it. An existing private one
/// is used as it is.
#[test]
fn a_foreign_state_dir_is_refused_and_never_chmodded() {
    let lab = Lab::new();
    let parent = tempfile::tempdir().expect("temp dir");
    fs::set_permissions(parent.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let before = lab.pod.firewall_state();
    for mode in [0o755, 0o555, 0o711, 0o1777 & !0o022] {
        let foreign = parent.path().join(format!("foreign-{mode:o}"));
        fs::create_dir(&foreign).unwrap();
        fs::set_permissions(&foreign, fs::Permissions::from_mode(mode)).unwrap();
        for backend in ["nftables", "auto"] {
            let conf = lab.config(
                "1.1.0",
                json!({"backend": backend, "stateDir": foreign, "hostPrerequisites": "enforce"}),
            );
            // CHECK consults the host check only to resolve `auto`.
            let commands: &[&str] = match backend {
                "auto" => &["ADD", "CHECK", "STATUS"],
                _ => &["ADD", "STATUS"],
            };
            for command in commands {
                let r = lab.cni(command, &conf);
                let e = r.error(7);
                assert!(
                    e["msg"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("not private"),
                    "{command} {backend} {mode:o}: {e}"
                );
            }
            lab.cni("DEL", &conf).ok();
            assert_eq!(mode_of(&foreign), mode, "{backend}: mode changed");
            assert!(entries(&foreign).is_empty(), "{backend}: written into");
        }
    }
    assert_eq!(lab.pod.firewall_state(), before);

    // Already private: used as is.
    let private = parent.path().join("private");
    fs::create_dir(&private).unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).unwrap();
    let conf = lab.config("1.1.0", json!({"backend": "auto", "stateDir": private}));
    lab.cni("ADD", &conf).ok();
    lab.cni("DEL", &conf).ok();
    assert_eq!(mode_of(&private), 0o700);
    assert!(!entries(&private).is_empty(), "the verdict was not cached");

    // The agent's directory (the default stateDir holds its events socket), made 0755 by an
    // earlier agent: only entries of ours, so used as it is, mode unchanged.
    let agents = parent.path().join("agents");
    fs::create_dir(&agents).unwrap();
    fs::set_permissions(&agents, fs::Permissions::from_mode(0o755)).unwrap();
    let _socket = std::os::unix::net::UnixDatagram::bind(agents.join("events.sock")).unwrap();
    let conf = lab.config("1.1.0", json!({"backend": "auto", "stateDir": agents}));
    lab.cni("ADD", &conf).ok();
    lab.cni("DEL", &conf).ok();
    assert_eq!(mode_of(&agents), 0o755);
    assert!(entries(&agents).len() > 1, "the verdict was not cached");
}

/// A tmpfs mounted for the test (read-only, or tiny), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(target: &Path, options: &str) -> Tmpfs {
        fs::create_dir_all(target).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(options),
        )
        .expect("mount tmpfs");
        Tmpfs(target.to_path_buf())
    }

    fn remount_read_only(&self) {
        nix::mount::mount(
            None::<&str>,
            &self.0,
            None::<&str>,
            nix::mount::MsFlags::MS_REMOUNT | nix::mount::MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .expect("remount read-only");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A `stateDir` that is read-only or full costs only the cache: ADD works under `warn` and
/// `enforce` (the verdict is computed anyway), `backend: auto` still picks nftables, and no
/// temp file (0-byte or partial) is left behind.
#[test]
fn a_read_only_or_full_state_dir_changes_no_verdict() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let read_only = Tmpfs::new(&dir.path().join("ro"), "mode=0700,size=64k");
    fs::create_dir(dir.path().join("ro/existing")).unwrap();
    fs::set_permissions(
        dir.path().join("ro/existing"),
        fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    read_only.remount_read_only();
    let _full = Tmpfs::new(&dir.path().join("full"), "mode=0700,size=16k");
    let filler = dir.path().join("full/filler");
    let mut file = fs::File::create(&filler).unwrap();
    let chunk = [b'x'; 4096];
    while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
    drop(file);
    let full_before = entries(&dir.path().join("full"));

    for state in [
        dir.path().join("ro"),
        dir.path().join("ro/existing"),
        dir.path().join("ro/missing"),
        dir.path().join("full"),
        dir.path().join("full/missing"),
    ] {
        for policy in ["warn", "enforce"] {
            let conf = lab.config(
                "1.1.0",
                json!({"backend": "auto", "stateDir": state, "hostPrerequisites": policy}),
            );
            let r = lab.cni("ADD", &conf).ok();
            let why = format!("{} {policy}", state.display());
            assert!(r.stderr.contains("not cached"), "{why}: {}", r.stderr);
            let state_now = lab.pod.firewall_state();
            assert!(
                state_now.contains("table inet intercept-cni"),
                "{why}: auto did not pick nftables:\n{state_now}"
            );
            assert!(
                !state_now.contains("ICNI_"),
                "{why}: iptables rules:\n{state_now}"
            );
            lab.cni("CHECK", &conf).ok();
            lab.cni("DEL", &conf).ok();
        }
    }
    // The lock file and the directory made are ours and empty; no temp file is left.
    let full_after = entries(&dir.path().join("full"));
    assert!(
        full_after.iter().all(|n| !n.ends_with(".tmp")),
        "{full_after:?}"
    );
    assert_eq!(fs::metadata(&filler).unwrap().len() % 4096, 0);
    assert!(full_before.iter().all(|n| full_after.contains(n)));
    assert_eq!(entries(&dir.path().join("ro")), ["existing"]);
}

/// A `logFile` naming an existing file that is not a log of ours (root-owned, like
/// `/etc/passwd`, and past `logFileMaxBytes`) is neither appended to, chmodded nor rotated: the
/// plugin logs to stderr with a warning and answers as usual. A foreign `<logFile>.1` is never
/// renamed over either.
#[test]
fn a_foreign_log_file_is_never_appended_chmodded_or_rotated() {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let passwd = dir.path().join("passwd");
    let content = "root:x:0:0:root:/root:/bin/bash\n".repeat(400);
    fs::write(&passwd, &content).unwrap();
    fs::set_permissions(&passwd, fs::Permissions::from_mode(0o644)).unwrap();
    let empty = dir.path().join("empty.log");
    fs::write(&empty, "").unwrap();
    for (log, before) in [(&passwd, content.as_str()), (&empty, "")] {
        let conf = status_config(json!({"logFile": log, "logFileMaxBytes": 4096}));
        for _ in 0..3 {
            let r = run_plugin("STATUS", None, conf.to_string().as_bytes());
            r.ok("STATUS");
            assert!(
                r.stderr.contains("not a log file of intercept-cni"),
                "{}",
                r.stderr
            );
        }
        assert_eq!(fs::read_to_string(log).unwrap(), before);
        assert_eq!(mode_of(log), 0o644);
    }
    assert_eq!(entries(dir.path()), ["empty.log", "passwd"]);

    // Our own log, rotating: a foreign `.1` stays as it is and the log stays bounded.
    let ours = dir.path().join("cni.log");
    let rotated = dir.path().join("cni.log.1");
    fs::write(&rotated, "someone else's\n").unwrap();
    let conf = status_config(json!({"logFile": ours, "logFileMaxBytes": 4096}));
    for _ in 0..60 {
        run_plugin("STATUS", None, conf.to_string().as_bytes()).ok("STATUS");
    }
    assert_eq!(fs::read_to_string(&rotated).unwrap(), "someone else's\n");
    assert!(fs::metadata(&ours).unwrap().len() <= 4096);
    assert_eq!(mode_of(&ours), 0o600);
}

/// `iptablesPath` binaries run as root, in the host netns too (`iptablesMode: auto`): any that
/// someone other than root could have changed (a world-writable directory, another owner's
/// file, a group-writable file) are never run, and ADD says why (code 7). Trusted ones are.
#[test]
fn untrusted_iptables_binaries_are_never_run() {
    let lab = Lab::new();
    let dir = tempfile::tempdir().expect("temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let marker = dir.path().join("ran");
    let plant = |bin_dir: &Path, owner: u32, mode: u32| {
        fs::create_dir(bin_dir).unwrap();
        for family in ["iptables", "ip6tables"] {
            for variant in ["nft", "legacy"] {
                for tool in ["save", "restore"] {
                    let bin = bin_dir.join(format!("{family}-{variant}-{tool}"));
                    fs::write(
                        &bin,
                        format!("#!/bin/sh\necho {tool} >> {}\n", marker.display()),
                    )
                    .unwrap();
                    fs::set_permissions(&bin, fs::Permissions::from_mode(mode)).unwrap();
                    std::os::unix::fs::chown(&bin, Some(owner), None).unwrap();
                }
            }
        }
    };
    let world = dir.path().join("world-writable");
    plant(&world, 0, 0o755);
    fs::set_permissions(&world, fs::Permissions::from_mode(0o777)).unwrap();
    let theirs = dir.path().join("their-binaries");
    plant(&theirs, NOBODY, 0o755);
    let group = dir.path().join("group-writable-binaries");
    plant(&group, 0, 0o775);
    let before = lab.pod.firewall_state();
    for bin_dir in [&world, &theirs, &group] {
        for mode in ["auto", "nft"] {
            let conf = lab.config(
                "1.0.0",
                json!({"backend": "iptables", "iptablesMode": mode, "iptablesPath": bin_dir}),
            );
            let e = lab.cni("ADD", &conf).error(7);
            assert!(
                e["msg"].as_str().unwrap_or_default().contains("refusing"),
                "{}: {e}",
                bin_dir.display()
            );
            assert!(!marker.exists(), "{} was run", bin_dir.display());
        }
    }
    assert_eq!(lab.pod.firewall_state(), before);
    // The same binaries, root's and not writable by others: run (the fakes then fail ADD).
    let trusted = dir.path().join("trusted");
    plant(&trusted, 0, 0o755);
    let conf = lab.config(
        "1.0.0",
        json!({"backend": "iptables", "iptablesMode": "auto", "iptablesPath": trusted}),
    );
    let _ = lab.cni("ADD", &conf);
    assert!(marker.exists(), "the trusted binaries were not run");
}
