//! The built plugin run like a runtime runs it: environment + stdin in, one answer out. Only
//! protocol behaviour that needs no pod netns is here; the live-traffic suites cover the rest.

use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_intercept-cni");
const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const NO_SUCH_NETNS: &str = "/var/run/netns/intercept-cni-no-such-netns";

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Outcome {
    /// The single JSON answer; fails on anything else on stdout.
    fn answer(&self) -> Value {
        let mut lines = self.stdout.lines();
        let first = lines
            .next()
            .unwrap_or_else(|| panic!("no answer; stderr: {}", self.stderr));
        assert_eq!(lines.next(), None, "more than one line: {}", self.stdout);
        serde_json::from_str(first).unwrap_or_else(|e| panic!("not JSON ({e}): {first}"))
    }

    /// A CNI error: valid JSON with cniVersion/code/msg, a non-zero exit, and nothing else.
    fn error(&self) -> Value {
        assert_ne!(self.code, 0, "expected failure; stdout: {}", self.stdout);
        let answer = self.answer();
        assert!(answer["cniVersion"].is_string(), "{answer}");
        assert!(answer["code"].is_u64(), "{answer}");
        assert!(
            answer["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
        answer
    }

    fn error_code(&self) -> u64 {
        self.error()["code"].as_u64().unwrap_or_default()
    }

    fn error_msg(&self) -> String {
        self.error()["msg"].as_str().unwrap_or_default().to_string()
    }

    fn assert_silent_success(&self) {
        assert_eq!(
            self.code, 0,
            "stdout: {} stderr: {}",
            self.stdout, self.stderr
        );
        assert_eq!(self.stdout, "", "stderr: {}", self.stderr);
    }
}

fn run(vars: &[(&str, &str)], stdin: &str) -> Outcome {
    let mut child = Command::new(BIN)
        .env_clear()
        .envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the plugin");
    // The plugin may answer before reading stdin (bad environment); runtimes ignore EPIPE too.
    let written = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes());
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
    }
    let out = child.wait_with_output().expect("wait for the plugin");
    Outcome {
        code: out.status.code().expect("exit code, not a signal"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The environment a runtime gives ADD/DEL/CHECK.
fn pod_env<'a>(command: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "3f2a9c"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        ),
    ]
}

fn without<'a>(mut vars: Vec<(&'a str, &'a str)>, name: &str) -> Vec<(&'a str, &'a str)> {
    vars.retain(|(k, _)| *k != name);
    vars
}

/// A chained plugin's config with a prevResult, plus `extra` keys. It intercepts every pod
/// (`podSelection: all`): these tests are about the protocol, not the per-pod policy.
fn config(version: &str, extra: Value) -> String {
    let mut conf = json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "intercept-cni",
        "podSelection": "all",
        "prevResult": {
            "cniVersion": version,
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
            "ips": [{"address": "10.1.0.5/24", "interface": 0}]
        }
    });
    if let (Value::Object(conf), Value::Object(extra)) = (&mut conf, extra) {
        conf.extend(extra);
    }
    conf.to_string()
}

#[test]
fn version_without_input_answers_the_latest() {
    for stdin in ["", "\n"] {
        let out = run(&[("CNI_COMMAND", "VERSION")], stdin);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(
            out.answer(),
            json!({"cniVersion": "1.1.0", "supportedVersions": VERSIONS})
        );
    }
}

#[test]
fn version_echoes_the_input_version() {
    for v in VERSIONS {
        let out = run(&[("CNI_COMMAND", "VERSION")], &config(v, json!({})));
        assert_eq!(out.code, 0);
        assert_eq!(out.answer()["cniVersion"], v);
        assert_eq!(out.answer()["supportedVersions"], json!(VERSIONS));
    }
}

#[test]
fn no_command_prints_about_on_stderr_only() {
    for vars in [vec![], vec![("CNI_COMMAND", "")]] {
        let out = run(&vars, "");
        out.assert_silent_success();
        assert!(
            out.stderr.contains("0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0"),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn unknown_command_is_code_4() {
    let out = run(&[("CNI_COMMAND", "ATTACH")], "");
    assert_eq!(out.error_code(), 4);
    assert!(out.error_msg().contains("CNI_COMMAND"));
}

#[test]
fn bad_container_id_or_ifname_is_code_4_naming_the_variable() {
    for (var, value) in [
        ("CNI_CONTAINERID", "-leading-dash"),
        ("CNI_CONTAINERID", "a/b"),
        ("CNI_IFNAME", "eth0:1"),
        ("CNI_IFNAME", "0123456789abcdef"),
        ("CNI_IFNAME", ".."),
    ] {
        for command in ["ADD", "DEL", "CHECK"] {
            let mut vars = without(pod_env(command, "/var/run/netns/x"), var);
            vars.push((var, value));
            let out = run(&vars, &config("1.0.0", json!({})));
            assert_eq!(out.error_code(), 4, "{command} {var}={value}");
            assert!(out.error_msg().contains(var), "{}", out.error_msg());
        }
    }
}

#[test]
fn missing_netns_for_add_and_check_is_code_4() {
    for command in ["ADD", "CHECK"] {
        let vars = without(pod_env(command, ""), "CNI_NETNS");
        let out = run(&vars, &config("1.0.0", json!({})));
        assert_eq!(out.error_code(), 4);
        assert!(out.error_msg().contains("CNI_NETNS"));
    }
}

#[test]
fn malformed_json_is_code_6() {
    let out = run(
        &pod_env("ADD", "/var/run/netns/x"),
        "{\"cniVersion\": \"1.0.0\",",
    );
    assert_eq!(out.error_code(), 6);
    assert_eq!(out.answer()["cniVersion"], "1.1.0");
    let out = run(&[("CNI_COMMAND", "VERSION")], "not json");
    assert_eq!(out.error_code(), 6);
}

#[test]
fn unsupported_or_missing_version_is_code_1() {
    for conf in [
        config("0.2.0", json!({})),
        config("1.2.0", json!({})),
        json!({"name": "n", "type": "intercept-cni"}).to_string(),
    ] {
        for command in ["ADD", "DEL"] {
            let out = run(&pod_env(command, "/var/run/netns/x"), &conf);
            assert_eq!(out.error_code(), 1, "{command} {conf}");
            assert_eq!(out.answer()["cniVersion"], "1.1.0");
        }
    }
}

#[test]
fn check_below_0_4_0_is_code_1() {
    for v in ["0.3.0", "0.3.1"] {
        let out = run(&pod_env("CHECK", "/var/run/netns/x"), &config(v, json!({})));
        assert_eq!(out.error_code(), 1);
        assert_eq!(out.answer()["cniVersion"], v);
    }
}

#[test]
fn status_and_gc_below_1_1_0_are_code_1() {
    for command in ["STATUS", "GC"] {
        for v in ["0.3.1", "0.4.0", "1.0.0"] {
            let out = run(&[("CNI_COMMAND", command)], &config(v, json!({})));
            assert_eq!(out.error_code(), 1, "{command} {v}");
        }
    }
}

#[test]
fn add_and_check_without_prev_result_are_code_7() {
    let conf = json!({"cniVersion": "1.0.0", "name": "n", "type": "intercept-cni"});
    for command in ["ADD", "CHECK"] {
        let out = run(&pod_env(command, "/proc/self/ns/net"), &conf.to_string());
        assert_eq!(out.error_code(), 7, "{command}");
        assert!(out.error_msg().contains("prevResult"));
        assert_eq!(out.answer()["cniVersion"], "1.0.0");
    }
}

#[test]
fn add_with_invalid_config_is_code_7_naming_the_key() {
    let conf = config("1.0.0", json!({"inboundPort": 70000}));
    let out = run(&pod_env("ADD", "/proc/self/ns/net"), &conf);
    assert_eq!(out.error_code(), 7);
    assert!(out.error_msg().contains("inboundPort"));
}

#[test]
fn add_with_annotated_pod_selection_and_no_annotations_is_code_7() {
    let conf = config("1.0.0", json!({"podSelection": "annotated"}));
    let out = run(&pod_env("ADD", "/proc/self/ns/net"), &conf);
    assert_eq!(out.error_code(), 7);
    assert!(out.error_msg().contains("annotated"));
    assert!(out
        .error_msg()
        .contains("io.kubernetes.cri.pod-annotations"));
}

/// Needs root only in that the host netns must be openable; it never programs anything.
#[test]
fn add_and_check_in_the_hosts_netns_are_refused_with_code_102() {
    for v in VERSIONS {
        let conf = config(v, json!({"logLevel": "debug"}));
        let out = run(&pod_env("ADD", "/proc/self/ns/net"), &conf);
        assert_eq!(out.error_code(), 102, "{v}");
        assert_eq!(out.answer()["cniVersion"], v);
        assert!(
            out.stderr.contains("ADD pod=default/web-0"),
            "{}",
            out.stderr
        );
    }
    let out = run(
        &pod_env("CHECK", "/proc/self/ns/net"),
        &config("1.0.0", json!({})),
    );
    assert_eq!(out.error_code(), 102);
}

#[test]
fn add_on_a_vanished_netns_is_code_5() {
    let out = run(&pod_env("ADD", NO_SUCH_NETNS), &config("1.0.0", json!({})));
    assert_eq!(out.error_code(), 5);
}

#[test]
fn del_without_netns_succeeds() {
    let vars = without(pod_env("DEL", ""), "CNI_NETNS");
    for conf in [
        config("1.0.0", json!({})),
        json!({"cniVersion": "0.4.0", "name": "n", "type": "intercept-cni"}).to_string(),
    ] {
        run(&vars, &conf).assert_silent_success();
    }
    run(&pod_env("DEL", ""), &config("1.1.0", json!({}))).assert_silent_success();
}

#[test]
fn del_on_a_vanished_netns_succeeds() {
    for v in VERSIONS {
        run(&pod_env("DEL", NO_SUCH_NETNS), &config(v, json!({}))).assert_silent_success();
    }
    // A bind-mount target left behind after the runtime unmounted the namespace.
    let leftover = tempfile::NamedTempFile::new().expect("temp file");
    let path = leftover.path().to_str().expect("utf-8 temp path");
    run(&pod_env("DEL", path), &config("1.0.0", json!({}))).assert_silent_success();
}

#[test]
fn del_tolerates_an_invalid_config() {
    let conf = config("1.0.0", json!({"inboundPort": 0, "backend": "ebpf"}));
    let out = run(&pod_env("DEL", NO_SUCH_NETNS), &conf);
    out.assert_silent_success();
    assert!(out.stderr.contains("invalid config"), "{}", out.stderr);
}

#[test]
fn del_never_touches_the_hosts_netns() {
    run(
        &pod_env("DEL", "/proc/self/ns/net"),
        &config("1.0.0", json!({})),
    )
    .assert_silent_success();
}

#[test]
fn status_succeeds_when_netfilter_netlink_is_available() {
    run(&[("CNI_COMMAND", "STATUS")], &config("1.1.0", json!({}))).assert_silent_success();
    let conf = config("1.1.0", json!({"backend": "nftables"}));
    run(&[("CNI_COMMAND", "STATUS")], &conf).assert_silent_success();
}

#[test]
fn gc_validates_the_attachment_list() {
    for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
        let conf = config(
            "1.1.0",
            json!({ key: [{"containerID": "3f2a9c", "ifname": "eth0"}] }),
        );
        run(&[("CNI_COMMAND", "GC")], &conf).assert_silent_success();
    }
    let conf = config(
        "1.1.0",
        json!({"cni.dev/valid-attachments": [{"ifname": "eth0"}]}),
    );
    assert_eq!(run(&[("CNI_COMMAND", "GC")], &conf).error_code(), 7);
}

#[test]
fn log_file_gets_the_verb_line_and_stdout_stays_clean() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("intercept.log");
    let conf = config(
        "1.0.0",
        json!({"logLevel": "debug", "logFile": log.to_str().expect("utf-8 path"), "x": 1}),
    );
    let out = run(&pod_env("ADD", "/proc/self/ns/net"), &conf);
    assert_eq!(out.error_code(), 102);
    let written = std::fs::read_to_string(&log).expect("log file written");
    assert!(
        written.contains("ADD pod=default/web-0 container=3f2a9c"),
        "{written}"
    );
    assert!(written.contains("unknown key \"x\""), "{written}");
    let mode = std::fs::metadata(&log)
        .expect("log metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// An endless stdin (`< /dev/zero`) is cut off after a few MiB with code 6, quickly, for every
/// verb; the plugin never holds more than the cap.
#[test]
fn an_endless_stdin_is_code_6_not_unbounded_memory() {
    for command in ["VERSION", "ADD", "DEL"] {
        let zero = std::fs::File::open("/dev/zero").expect("/dev/zero");
        let mut child = Command::new(BIN)
            .env_clear()
            .envs(pod_env(command, NO_SUCH_NETNS))
            .stdin(Stdio::from(zero))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the plugin");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while child.try_wait().expect("wait").is_none() {
            if std::time::Instant::now() > deadline {
                child.kill().ok();
                child.wait().ok();
                panic!("{command}: still reading an endless stdin after 20 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("output");
        let answer: Value = serde_json::from_slice(&out.stdout).expect("one JSON answer");
        assert_eq!(answer["code"], 6, "{command}: {answer}");
        assert!(
            answer["msg"].as_str().unwrap_or_default().contains("MiB"),
            "{command}: {answer}"
        );
        assert_eq!(out.status.code(), Some(1));
    }
    // Just under the cap is read whole: a config padded with whitespace is still a config.
    let mut padded = config("1.0.0", json!({}));
    padded.push_str(&" ".repeat((4 << 20) - padded.len()));
    let out = run(&pod_env("DEL", NO_SUCH_NETNS), &padded);
    assert_eq!(out.code, 0, "{}", out.stdout);
}

/// The node tool's command line: `args` run without any CNI_* variable.
fn node_tool(args: &[&str]) -> Outcome {
    let out = Command::new(BIN)
        .args(args)
        .env_clear()
        .output()
        .expect("run the node tool");
    Outcome {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn help_exits_0_and_describes_every_subcommand_and_flag_with_defaults() {
    for args in [
        &["--help"][..],
        &["-h"],
        &["help"],
        &["help", "--help"],
        &["help", "-h"],
        &["--help", "--help"],
    ] {
        let out = node_tool(args);
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
        for sub in ["install", "uninstall", "doctor", "audit", "version", "help"] {
            assert!(
                out.stdout.contains(&format!("\n  {sub} ")),
                "{args:?}: {sub} undescribed:\n{}",
                out.stdout
            );
        }
    }
    let flags: [(&str, &[&str]); 5] = [
        (
            "install",
            &[
                "--cni-conf-dir",
                "--cni-bin-dir",
                "--plugin-config",
                "--watch",
                "--listen",
                "--events-socket",
                "--host-root",
                "/var/run/intercept-cni-agent/events.sock",
            ],
        ),
        ("uninstall", &["--cni-conf-dir", "--cni-bin-dir"]),
        (
            "doctor",
            &[
                "--backend",
                "--iptables-mode",
                "--ipv6",
                "--host-root",
                "--json",
                "default: auto",
            ],
        ),
        ("version", &["usage: intercept-cni version"]),
        (
            "audit",
            &[
                "--cri-socket",
                "--cni-conf-dir",
                "--netns-dir",
                "--json",
                "--repair",
                "/run/containerd/containerd.sock",
            ],
        ),
    ];
    for (sub, needles) in flags {
        let texts = [
            node_tool(&["help", sub]),
            node_tool(&[sub, "--help"]),
            node_tool(&[sub, "-h"]),
            node_tool(&["help", sub, "--help"]),
            node_tool(&["--help", sub]),
        ];
        for out in &texts {
            assert_eq!(out.code, 0, "{sub}: {}", out.stderr);
            assert_eq!(out.stdout, texts[0].stdout);
            for needle in needles {
                assert!(out.stdout.contains(needle), "{sub}: no {needle}");
            }
        }
    }
    // Each flag line of a subcommand says what its default is, or that it is required.
    for sub in ["install", "doctor", "audit"] {
        let text = node_tool(&["help", sub]).stdout;
        let flags = text.split("Flags:\n").nth(1).unwrap();
        for entry in flags.split("\n  --").skip(1) {
            let entry = entry.split("\n  -h").next().unwrap();
            assert!(
                entry.contains("default") || entry.contains("required"),
                "{sub}: --{entry}"
            );
        }
    }
}

#[test]
fn usage_errors_exit_2_with_one_clear_line() {
    for args in [
        &["bogus"][..],
        &["help", "bogus"],
        &["help", "install", "doctor"],
        &["version", "extra"],
        &["install"],
        &["install", "--cni-conf-dir", "/tmp", "--cni-bin-dir"],
        &["install", "--bogus"],
        &[
            "install",
            "--cni-conf-dir",
            "/tmp",
            "--cni-bin-dir",
            "/tmp",
            "--listen",
            "127.0.0.1:0",
        ],
        &[
            "install",
            "--watch",
            "--cni-conf-dir",
            "/tmp",
            "--cni-bin-dir",
            "/tmp",
            "--listen",
            "nowhere",
        ],
        &["uninstall", "--watch"],
        &["doctor", "--backend", "ebpf"],
        &["doctor", "--host-root", "/nonexistent"],
    ] {
        let out = node_tool(args);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert_eq!(out.stdout, "", "{args:?}");
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.starts_with("intercept-cni") && out.stderr.contains("--help`)"),
            "{args:?}: {}",
            out.stderr
        );
    }
    let version = node_tool(&["version"]);
    assert_eq!(version.code, 0);
    assert_eq!(
        version.stdout,
        format!("intercept-cni {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// `audit` is served by intercept-cni-node from the plugin's own directory, with the arguments
/// passed on unchanged; without it, one clear error.
#[test]
fn audit_runs_the_node_tool_next_to_the_plugin() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("intercept-cni");
    std::fs::copy(BIN, &plugin).unwrap();
    let run = || {
        Command::new(&plugin)
            .args(["audit", "--json", "--cri-socket", "/x y"])
            .output()
            .unwrap()
    };
    let missing = run();
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("intercept-cni-node"), "{stderr}");
    // A stand-in node tool that prints what it was given, one argument per line.
    let tool = dir.path().join("intercept-cni-node");
    std::fs::write(&tool, "#!/bin/sh\nprintf '%s\\n' \"$@\"\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ran = run();
    assert_eq!(ran.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "audit\n--json\n--cri-socket\n/x y\n"
    );
    // One that someone but root could have changed is never run as root.
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o775)).unwrap();
    let refused = run();
    assert_eq!(refused.status.code(), Some(1));
    assert!(refused.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("writable by group or others"), "{stderr}");
}
