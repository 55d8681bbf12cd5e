//! Entry point. With a subcommand it is the node tool; without one it is the CNI plugin, reading
//! the environment and stdin and printing exactly one JSON answer (or nothing) on stdout.

use intercept_cni::cmd::{self, Trace};
use intercept_cni::cni::env::{CniEnv, Command};
use intercept_cni::cni::error::{Error, Result};
use intercept_cni::cni::version;
use intercept_cni::logging;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::panic;
use std::process::ExitCode;

const USAGE: &str = "usage: intercept-cni [doctor | install | uninstall | version]\n\
                     Without arguments it runs as a CNI plugin (CNI_COMMAND and stdin).";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    match args.next() {
        None => cni_mode(),
        Some(subcommand) => node_tool(&subcommand, args.collect()),
    }
}

/// The node-side subcommands; each arm belongs to the issue that brings it.
fn node_tool(subcommand: &OsStr, rest: Vec<OsString>) -> ExitCode {
    let Some(words) = rest
        .into_iter()
        .map(|w| w.into_string().ok())
        .collect::<Option<Vec<String>>>()
    else {
        eprintln!("intercept-cni: arguments must be valid UTF-8\n{USAGE}");
        return ExitCode::from(2);
    };
    let status = match subcommand.to_str() {
        Some("version" | "--version") => {
            println!("intercept-cni {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Some("install") => intercept_cni::install::install_main(&words),
        Some("uninstall") => intercept_cni::install::uninstall_main(&words),
        Some("doctor") => intercept_cni::host::doctor_main(&words),
        _ => {
            eprintln!("{USAGE}");
            2
        }
    };
    ExitCode::from(u8::try_from(status).unwrap_or(1))
}

fn cni_mode() -> ExitCode {
    logging::init();
    // The default hook would print to stderr too; this one also reaches the log file, and
    // stdout stays reserved for the single JSON answer.
    panic::set_hook(Box::new(|info| log::error!("internal error: {info}")));
    let mut trace = Trace::default();
    let outcome = cmd::guarded(&mut trace, cni_invocation);
    let (answer, success) = cmd::final_answer(outcome, &trace);
    let printed = answer.as_ref().is_none_or(print_answer);
    if success && printed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn cni_invocation(trace: &mut Trace) -> Result<Option<serde_json::Value>> {
    let Some((env, stdin)) = read_invocation().inspect_err(|e| log::error!("{e}"))? else {
        return Ok(None);
    };
    cmd::execute(&env, &stdin, trace)
}

/// The environment and stdin; `None` when there is no command (the "about" line was printed).
fn read_invocation() -> Result<Option<(CniEnv, Vec<u8>)>> {
    let raw_command = std::env::var_os("CNI_COMMAND");
    let raw_command = raw_command
        .as_deref()
        .map(|c| {
            c.to_str()
                .ok_or_else(|| Error::env("CNI_COMMAND", "not valid UTF-8"))
        })
        .transpose()?;
    let Some(command) = Command::from_env(raw_command)? else {
        eprintln!(
            "intercept-cni {}: chained CNI plugin for transparent proxy interception; \
             CNI protocol versions {}",
            env!("CARGO_PKG_VERSION"),
            version::SUPPORTED.join(", ")
        );
        return Ok(None);
    };
    let env = CniEnv::read(command, |name| std::env::var_os(name))?;
    let mut stdin = Vec::new();
    std::io::stdin()
        .read_to_end(&mut stdin)
        .map_err(|e| Error::io("cannot read the network configuration from stdin", e))?;
    Ok(Some((env, stdin)))
}

/// Prints the one JSON answer; false when stdout cannot take it.
fn print_answer(answer: &serde_json::Value) -> bool {
    let mut out = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut out, answer)
        .map_err(std::io::Error::from)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    written
        .inspect_err(|e| log::error!("cannot write the answer to stdout: {e}"))
        .is_ok()
}
