//! `intercept-cni doctor`: the host check for one backend, as a table or as JSON.

use super::{assess_at, check, HostRoot, Report};
use crate::backend::{BackendKind, IptablesMode};
use std::io::Write;
use std::path::PathBuf;

const USAGE: &str = "usage: intercept-cni doctor [--backend nftables|iptables] \
[--iptables-mode legacy|nft] [--ipv6] [--host-root DIR] [--json]

Checks the kernel modules the chosen backend needs on this host (default: nftables;
--iptables-mode defaults to nft). --ipv6 also checks the IPv6 modules. --host-root reads every
host path under DIR (a container with the host's / mounted there) and skips the functional probe.
Exit status: 0 when every required module is usable, 1 when not, 2 on a usage error.";

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    kind: BackendKind,
    ipv6: bool,
    host_root: Option<PathBuf>,
    json: bool,
}

/// Runs `doctor` with the arguments that follow the word `doctor`; returns the exit status.
pub fn doctor_main(args: &[String]) -> i32 {
    let options = match parse(args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            let _ = writeln!(std::io::stdout(), "{USAGE}");
            return 0;
        }
        Err(why) => {
            eprintln!("intercept-cni doctor: {why}\n{USAGE}");
            return 2;
        }
    };
    let report = match &options.host_root {
        Some(dir) => check(options.kind, options.ipv6, &HostRoot::new(dir)),
        None => assess_at(&HostRoot::real(), options.kind, options.ipv6, true),
    };
    let text = if options.json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => text + "\n",
            Err(e) => {
                eprintln!("intercept-cni doctor: cannot encode the report: {e}");
                return 1;
            }
        }
    } else {
        render_table(&report, options.ipv6)
    };
    // A closed pipe (`doctor | head`) is the reader's choice, not a failure of the check.
    let _ = std::io::stdout().write_all(text.as_bytes());
    if report.ok {
        0
    } else {
        1
    }
}

/// `Ok(None)` asks for the usage text.
fn parse(args: &[String]) -> Result<Option<Options>, String> {
    let mut backend: Option<&str> = None;
    let mut mode: Option<IptablesMode> = None;
    let mut options = Options {
        kind: BackendKind::Nftables,
        ipv6: false,
        host_root: None,
        json: false,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .map(String::as_str)
                .ok_or_else(|| format!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--backend" => match value()? {
                b @ ("nftables" | "iptables") => backend = Some(b),
                other => return Err(format!("unknown backend {other:?}")),
            },
            "--iptables-mode" => {
                mode = Some(match value()? {
                    "legacy" => IptablesMode::Legacy,
                    "nft" => IptablesMode::Nft,
                    other => return Err(format!("unknown iptables mode {other:?}")),
                })
            }
            "--host-root" => {
                let dir = value()?;
                if dir.is_empty() {
                    return Err("--host-root needs a directory".into());
                }
                options.host_root = Some(PathBuf::from(dir));
            }
            "--ipv6" => options.ipv6 = true,
            "--json" => options.json = true,
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    options.kind = match (backend, mode) {
        (Some("iptables"), mode) => BackendKind::Iptables(mode.unwrap_or(IptablesMode::Nft)),
        (_, Some(_)) => return Err("--iptables-mode only applies to --backend iptables".into()),
        _ => BackendKind::Nftables,
    };
    Ok(Some(options))
}

/// The human view: one row per module, then the verdict and each problem with its remedy.
fn render_table(report: &Report, ipv6: bool) -> String {
    let headers = [
        "MODULE",
        "REQUIRED",
        "STATE",
        "NEEDED FOR",
        "REMEDY",
        "SOURCE",
    ];
    let rows: Vec<[String; 6]> = report
        .modules
        .iter()
        .map(|m| {
            [
                m.name.clone(),
                if m.required { "yes" } else { "no" }.to_string(),
                m.state.as_str().to_string(),
                m.needed_for.clone(),
                if m.remedy.is_empty() {
                    "-".to_string()
                } else {
                    m.remedy.clone()
                },
                m.source.clone(),
            ]
        })
        .collect();
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| -> String {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let release = if report.kernel_release.is_empty() {
        "unknown"
    } else {
        &report.kernel_release
    };
    let family = if ipv6 { "IPv4 and IPv6" } else { "IPv4" };
    let mut out = format!(
        "intercept-cni doctor: {} backend, Linux {release}, {family} pods\n\n",
        report.backend
    );
    out.push_str(&line(headers));
    for row in &rows {
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    if report.ok {
        out.push_str("\nverdict: OK, every required module is usable\n");
    } else {
        out.push_str("\nverdict: NOT OK\n");
        for p in &report.problems {
            out.push_str(&format!("  - {p}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_to_nftables_ipv4_table_on_the_real_root() {
        let o = parse(&[]).unwrap().unwrap();
        assert_eq!(
            o,
            Options {
                kind: BackendKind::Nftables,
                ipv6: false,
                host_root: None,
                json: false
            }
        );
    }

    #[test]
    fn parses_every_option() {
        let o = parse(&args(&[
            "--backend",
            "iptables",
            "--iptables-mode",
            "legacy",
            "--ipv6",
            "--host-root",
            "/host",
            "--json",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(o.kind, BackendKind::Iptables(IptablesMode::Legacy));
        assert!(o.ipv6 && o.json);
        assert_eq!(o.host_root, Some(PathBuf::from("/host")));
        let o = parse(&args(&["--backend", "iptables"])).unwrap().unwrap();
        assert_eq!(o.kind, BackendKind::Iptables(IptablesMode::Nft));
        assert_eq!(parse(&args(&["--help"])), Ok(None));
    }

    #[test]
    fn usage_errors_are_refused() {
        for bad in [
            &["--backend"][..],
            &["--backend", "ebpf"],
            &["--iptables-mode", "nft"],
            &["--backend", "nftables", "--iptables-mode", "legacy"],
            &["--backend", "iptables", "--iptables-mode", "auto"],
            &["--host-root", ""],
            &["--verbose"],
            &["nftables"],
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?} accepted");
            assert_eq!(doctor_main(&args(bad)), 2, "{bad:?}");
        }
    }

    fn fixture_dir(name: &str) -> String {
        format!("{}/testdata/hosts/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn exit_status_follows_the_verdict_on_host_roots() {
        let ok = fixture_dir("builtin-only");
        assert_eq!(doctor_main(&args(&["--host-root", &ok, "--ipv6"])), 0);
        assert_eq!(doctor_main(&args(&["--host-root", &ok, "--json"])), 0);
        let bad = fixture_dir("no-nftables");
        assert_eq!(doctor_main(&args(&["--host-root", &bad])), 1);
        let legacy = ["--backend", "iptables", "--iptables-mode", "legacy"];
        assert_eq!(
            doctor_main(&args(&[&legacy[..], &["--host-root", &bad]].concat())),
            0
        );
    }

    #[test]
    fn table_shows_every_module_the_verdict_and_each_remedy() {
        let root = HostRoot::new(fixture_dir("missing-extra"));
        let report = check(BackendKind::Iptables(IptablesMode::Legacy), false, &root);
        let text = render_table(&report, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "intercept-cni doctor: iptables-legacy backend, Linux 6.8.0-31-generic, IPv4 pods"
        );
        assert!(lines[2].starts_with("MODULE") && lines[2].contains("NEEDED FOR"));
        for m in &report.modules {
            assert!(
                lines.iter().any(|l| l.starts_with(&format!("{} ", m.name))),
                "{}",
                m.name
            );
        }
        let owner = lines.iter().find(|l| l.starts_with("xt_owner ")).unwrap();
        assert!(
            owner.contains("missing") && owner.contains("`modprobe xt_owner`"),
            "{owner}"
        );
        assert!(text.contains("\nverdict: NOT OK\n"));
        assert!(text.contains("  - xt_owner is missing"));
        let report = check(
            BackendKind::Nftables,
            true,
            &HostRoot::new(fixture_dir("builtin-only")),
        );
        let text = render_table(&report, true);
        assert!(text.contains("IPv4 and IPv6 pods"));
        assert!(text.ends_with("verdict: OK, every required module is usable\n"));
    }
}
