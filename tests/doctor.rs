//! `intercept-cni doctor` through the real binary: on this machine and on the host trees.

use std::process::{Command, Output};

fn doctor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_intercept-cni"))
        .arg("doctor")
        .args(args)
        .output()
        .expect("run intercept-cni doctor")
}

fn host(name: &str) -> String {
    format!("{}/testdata/hosts/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("doctor --json prints one JSON document")
}

#[test]
fn this_machine_serves_nftables() {
    let out = doctor(&["--ipv6", "--json"]);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(report["backend"], "nftables");
    assert_eq!(report["ok"], true);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(report["kernelRelease"], release.trim());
    let modules = report["modules"].as_array().unwrap();
    let nf_tables = modules.iter().find(|m| m["name"] == "nf_tables").unwrap();
    assert_eq!(nf_tables["required"], true);
    assert_ne!(nf_tables["state"], "missing");
}

#[test]
fn the_table_is_the_default_view() {
    let out = doctor(&["--backend", "iptables", "--iptables-mode", "legacy"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("intercept-cni doctor: iptables-legacy backend, Linux "));
    assert!(text.contains("\nMODULE "));
    assert!(text.lines().any(|l| l.starts_with("iptable_nat ")));
    assert!(text.ends_with("verdict: OK, every required module is usable\n"));
}

#[test]
fn host_root_reads_the_tree_and_exit_status_follows_the_verdict() {
    let out = doctor(&[
        "--backend",
        "nftables",
        "--host-root",
        &host("no-nftables"),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let report = json(&out);
    assert_eq!(report["kernelRelease"], "5.10.162+");
    assert_eq!(report["ok"], false);
    let problems = report["problems"].as_array().unwrap();
    assert!(problems
        .iter()
        .any(|p| p.as_str().unwrap().starts_with("nf_tables is missing")));

    let out = doctor(&[
        "--backend",
        "iptables",
        "--iptables-mode",
        "legacy",
        "--host-root",
        &host("no-nftables"),
    ]);
    assert_eq!(out.status.code(), Some(0));

    let out = doctor(&[
        "--backend",
        "iptables",
        "--ipv6",
        "--host-root",
        &host("old-4.14"),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json(&out)["backend"], "iptables-nft");
}

#[test]
fn usage_errors_exit_2_with_nothing_on_stdout() {
    for args in [
        &["--backend", "bpf"][..],
        &["--iptables-mode", "legacy"],
        &["--host-root"],
        &["--host-root", "/nonexistent"],
    ] {
        let out = doctor(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("intercept-cni doctor: ")
                && stderr.contains("see `intercept-cni doctor --help`"),
            "{stderr}"
        );
    }
}

/// `auto`, the plugin's default, answers what the plugin will use on the node.
#[test]
fn auto_answers_what_the_plugin_will_choose() {
    let out = doctor(&["--backend", "auto", "--host-root", &host("builtin-only")]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("intercept-cni doctor: nftables backend"),
        "{text}"
    );
    assert_eq!(lines[1], "backend auto: the kernel serves nftables");

    let out = doctor(&["--host-root", &host("no-nftables"), "--json"]);
    let report = json(&out);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert!(
        report["backend"].as_str().unwrap().starts_with("iptables-"),
        "{report:#}"
    );
    let choice = report["choice"].as_str().unwrap();
    assert!(
        choice.starts_with(
            "backend auto: the kernel cannot serve nftables (Linux 5.10.162+ is older"
        ),
        "{choice}"
    );
}

/// `problems` holds problems only, each with its remedy; advice is in `tips`; each module has
/// its remedy.
#[test]
fn json_keeps_problems_for_problems_with_the_remedy_per_module() {
    let out = doctor(&[
        "--backend",
        "iptables",
        "--iptables-mode",
        "legacy",
        "--host-root",
        &host("missing-extra"),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let report = json(&out);
    let problems = report["problems"].as_array().unwrap();
    assert!(!problems.is_empty());
    for p in problems {
        let p = p.as_str().unwrap();
        assert!(p.contains(" is missing") && p.contains("Remedy: "), "{p}");
    }
    let tips = report["tips"].as_array().unwrap();
    assert!(
        tips.iter()
            .any(|t| t.as_str().unwrap().contains("modules-load.d")),
        "{report:#}"
    );
    let owner = report["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "xt_owner")
        .unwrap();
    assert!(
        owner["remedy"]
            .as_str()
            .unwrap()
            .contains("`modprobe xt_owner`"),
        "{owner}"
    );
    assert_eq!(report["choice"], "configured");
}

/// A config's modes make their modules required: RHEL 9 without its extras package serves
/// REDIRECT and DNS capture, not TPROXY (no nft_tproxy).
#[test]
fn modes_a_config_asks_for_make_their_modules_required() {
    let run = |modes: &[&str]| {
        let mut args = vec!["--backend", "nftables", "--host-root"];
        let root = host("rhel9-nft");
        args.push(&root);
        args.push("--json");
        args.extend_from_slice(modes);
        let out = doctor(&args);
        (out.status.code(), json(&out))
    };
    let tproxy_row = |report: &serde_json::Value| {
        report["modules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "nft_tproxy")
            .cloned()
            .unwrap()
    };
    let (code, plain) = run(&[]);
    assert_eq!(code, Some(0), "{plain:#}");
    assert_eq!(tproxy_row(&plain)["required"], false);
    let (code, dns) = run(&["--dns-capture", "--drop-invalid"]);
    assert_eq!(code, Some(0), "{dns:#}");
    let (code, tproxy) = run(&["--tproxy"]);
    assert_eq!(code, Some(1), "{tproxy:#}");
    assert_eq!(tproxy_row(&tproxy)["required"], true);
    let problems = tproxy["problems"].to_string();
    assert!(problems.contains("nft_tproxy is missing"), "{problems}");
}
