//! `intercept-cni-node audit [--cri-socket PATH] [--cni-conf-dir DIR] [--netns-dir DIR]...
//! [--json] [--repair]`, usually reached as `intercept-cni audit ...`.
//!
//! Exit status: 0 when every pod is as the policy wants (after `--repair`), 1 when some pod
//! needs attention, 2 for a bad command line or when the runtime or the config cannot be read.

use intercept_cni_node::audit::{self, Options};
use intercept_cni_node::{cri, invocation, proof};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: intercept-cni audit [--cri-socket PATH] [--cni-conf-dir DIR] \
                     [--netns-dir DIR]... [--json] [--repair]";

/// Where kubelet's runtimes read the network config.
const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";

struct Args {
    socket: PathBuf,
    conf_dir: PathBuf,
    json: bool,
    options: Options,
}

fn parse(words: &[String]) -> Result<Args, String> {
    let mut args = Args {
        socket: PathBuf::from(cri::DEFAULT_SOCKET),
        conf_dir: PathBuf::from(DEFAULT_CONF_DIR),
        json: false,
        options: Options {
            repair: false,
            netns_dirs: Vec::new(),
        },
    };
    let mut words = words.iter();
    while let Some(word) = words.next() {
        let mut value = || {
            words
                .next()
                .map(PathBuf::from)
                .ok_or(format!("{word} needs a value"))
        };
        match word.as_str() {
            "--cri-socket" => args.socket = value()?,
            "--cni-conf-dir" => args.conf_dir = value()?,
            "--netns-dir" => args.options.netns_dirs.push(value()?),
            "--json" => args.json = true,
            "--repair" => args.options.repair = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.options.netns_dirs.is_empty() {
        args.options.netns_dirs = proof::DEFAULT_NETNS_DIRS
            .iter()
            .map(PathBuf::from)
            .collect();
    }
    Ok(args)
}

fn main() -> ExitCode {
    intercept_cni::logging::init();
    let words: Vec<String> = std::env::args().skip(1).collect();
    let args = match words.split_first() {
        Some((first, rest)) if first == "audit" => parse(rest),
        _ => Err("expected the audit subcommand".into()),
    };
    let args = match args {
        Ok(args) => args,
        Err(e) => {
            eprintln!("intercept-cni: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("intercept-cni audit: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs the audit and prints the report; true when nothing needs attention.
fn run(args: &Args) -> Result<bool, String> {
    let chained = invocation::chained_entry(&args.conf_dir).map_err(|e| e.msg)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let sandboxes = runtime.block_on(async {
        let mut client = cri::connect(&args.socket).await?;
        cri::ready_sandboxes(&mut client).await
    })?;
    let (network, reports) = match &chained {
        Ok(entry) => (
            entry.file_name.clone(),
            sandboxes
                .iter()
                .map(|s| audit::pod(entry, s, &args.options))
                .collect(),
        ),
        // Nothing decides for the pods while the plugin is not chained: say so, touch nothing.
        Err(why) => {
            eprintln!("intercept-cni audit: {why}; no pod is checked");
            (String::new(), Vec::new())
        }
    };
    let clean = chained.is_ok()
        && reports
            .iter()
            .all(|r: &audit::PodReport| !r.status.is_finding());
    if args.json {
        let doc = serde_json::json!({
            "network": network,
            "chained": chained.is_ok(),
            "repair": args.options.repair,
            "pods": reports,
        });
        println!("{doc:#}");
    } else {
        print!("{}", audit::text(&network, &reports));
    }
    Ok(clean)
}
