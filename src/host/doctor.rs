//! `intercept-cni doctor`: the host check for the backend the plugin will use, as a table or as
//! JSON. Its help text is `usage::DOCTOR`.

use super::{choose, HostRoot, Modes, Report};
use crate::backend::{BackendChoice, BackendOptions, IptablesMode};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    choice: BackendChoice,
    ipv6: bool,
    /// The modes a config asks for: their modules become required.
    modes: Modes,
    host_root: Option<PathBuf>,
    json: bool,
}

/// The JSON view: the report and why this backend.
#[derive(Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    report: &'a Report,
    choice: &'a str,
}

/// Runs `doctor` with the arguments that follow the word `doctor`; returns the exit status.
pub fn doctor_main(args: &[String]) -> i32 {
    let options = match parse(args) {
        Ok(options) => options,
        Err(why) => {
            eprintln!("intercept-cni doctor: {why} (see `intercept-cni doctor --help`)");
            return 2;
        }
    };
    let (root, probe) = match &options.host_root {
        Some(dir) => (HostRoot::new(dir), false),
        None => (HostRoot::real(), true),
    };
    let chosen = choose(
        options.choice,
        &BackendOptions::default(),
        &root,
        options.ipv6,
        probe,
    );
    let mut chosen = chosen;
    chosen.report.require_modes(options.ipv6, options.modes);
    let report = &chosen.report;
    let text = if options.json {
        let view = JsonReport {
            report,
            choice: &chosen.why,
        };
        match serde_json::to_string_pretty(&view) {
            Ok(text) => text + "\n",
            Err(e) => {
                eprintln!("intercept-cni doctor: cannot encode the report: {e}");
                return 1;
            }
        }
    } else {
        render_table(report, options.ipv6, &chosen.why)
    };
    // A closed pipe (`doctor | head`) is the reader's choice, not a failure of the check.
    let _ = std::io::stdout().write_all(text.as_bytes());
    if report.ok {
        0
    } else {
        1
    }
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut backend: Option<&str> = None;
    let mut mode: Option<Option<IptablesMode>> = None;
    let mut options = Options {
        choice: BackendChoice::Auto,
        ipv6: false,
        modes: Modes::default(),
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
                b @ ("auto" | "nftables" | "iptables") => backend = Some(b),
                other => return Err(format!("unknown backend {other:?}")),
            },
            "--iptables-mode" => {
                mode = Some(match value()? {
                    "auto" => None,
                    "legacy" => Some(IptablesMode::Legacy),
                    "nft" => Some(IptablesMode::Nft),
                    other => return Err(format!("unknown iptables mode {other:?}")),
                })
            }
            "--host-root" => {
                let dir = value()?;
                if dir.is_empty() || !std::path::Path::new(dir).is_dir() {
                    return Err(format!("--host-root {dir:?} is not a directory"));
                }
                options.host_root = Some(PathBuf::from(dir));
            }
            "--ipv6" => options.ipv6 = true,
            "--dns-capture" => options.modes.dns = true,
            "--tproxy" => options.modes.tproxy = true,
            "--drop-invalid" => options.modes.drop_invalid = true,
            "--json" => options.json = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    options.choice = match (backend, mode) {
        (Some("iptables"), mode) => BackendChoice::Iptables(mode.flatten()),
        (_, Some(_)) => return Err("--iptables-mode only applies to --backend iptables".into()),
        (Some("nftables"), None) => BackendChoice::Nftables,
        _ => BackendChoice::Auto,
    };
    Ok(options)
}

/// The human view: one row per module, then the verdict and each problem with its remedy.
fn render_table(report: &Report, ipv6: bool, why: &str) -> String {
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
        "intercept-cni doctor: {} backend, Linux {release}, {family} pods\n{why}\n\n",
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
    for tip in &report.tips {
        out.push_str(&format!("tip: {tip}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendKind;
    use crate::host::check;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_to_auto_ipv4_table_on_the_real_root() {
        assert_eq!(
            parse(&[]).unwrap(),
            Options {
                choice: BackendChoice::Auto,
                ipv6: false,
                modes: Modes::default(),
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
            "/",
            "--json",
        ]))
        .unwrap();
        assert_eq!(
            o.choice,
            BackendChoice::Iptables(Some(IptablesMode::Legacy))
        );
        assert!(o.ipv6 && o.json);
        assert_eq!(o.host_root, Some(PathBuf::from("/")));
        let o = parse(&args(&["--backend", "iptables"])).unwrap();
        assert_eq!(o.choice, BackendChoice::Iptables(None));
        let o = parse(&args(&["--dns-capture", "--tproxy", "--drop-invalid"])).unwrap();
        assert!(o.modes.dns && o.modes.tproxy && o.modes.drop_invalid);
        let o = parse(&args(&["--backend", "iptables", "--iptables-mode", "auto"])).unwrap();
        assert_eq!(o.choice, BackendChoice::Iptables(None));
        let o = parse(&args(&["--backend", "nftables"])).unwrap();
        assert_eq!(o.choice, BackendChoice::Nftables);
        let o = parse(&args(&["--backend", "auto"])).unwrap();
        assert_eq!(o.choice, BackendChoice::Auto);
    }

    #[test]
    fn usage_errors_are_refused() {
        for bad in [
            &["--backend"][..],
            &["--backend", "ebpf"],
            &["--iptables-mode", "nft"],
            &["--backend", "nftables", "--iptables-mode", "legacy"],
            &["--backend", "iptables", "--iptables-mode", "fast"],
            &["--host-root", ""],
            &["--host-root", "/nonexistent-intercept-cni"],
            &["--host-root", "/proc/version"],
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
        assert_eq!(
            doctor_main(&args(&["--backend", "nftables", "--host-root", &bad])),
            1
        );
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
        let text = render_table(&report, false, "configured");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "intercept-cni doctor: iptables-legacy backend, Linux 6.8.0-31-generic, IPv4 pods"
        );
        assert_eq!(lines[1], "configured");
        assert!(lines[3].starts_with("MODULE") && lines[3].contains("NEEDED FOR"));
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
        let text = render_table(&report, true, "configured");
        assert!(text.contains("IPv4 and IPv6 pods"));
        assert!(text.ends_with("verdict: OK, every required module is usable\n"));
    }
}
