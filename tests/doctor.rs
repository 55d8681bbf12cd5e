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
    let out = doctor(&["--host-root", &host("no-nftables"), "--json"]);
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
    ] {
        let out = doctor(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("usage: intercept-cni doctor"));
    }
}
