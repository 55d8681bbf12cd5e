//! Entry point. With a subcommand it is the node tool; without one it is the CNI plugin, reading
//! the environment and stdin and printing exactly one JSON answer (or nothing) on stdout.
//!
//! The binary provides the C `main` itself (`no_main`): Rust's start-up glue would first read
//! /proc/self/maps to place a stack-overflow guard, about a tenth of an ADD. A stack overflow is
//! then a plain SIGSEGV, which it is for the runtime either way; the rest of that glue (SIGPIPE
//! ignored, fds 0-2 kept open) is done here.
#![no_main]

use intercept_cni::cmd::{self, Trace};
use intercept_cni::cni::env::{CniEnv, Command};
use intercept_cni::cni::error::{Code, Error, Result};
use intercept_cni::cni::version;
use intercept_cni::logging;
use intercept_cni::usage;
use nix::libc::{c_char, c_int};
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::panic;

/// See `intercept_cni::alloc`.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: intercept_cni::alloc::Allocator = intercept_cni::alloc::Allocator;

const SUCCESS: c_int = 0;
const FAILURE: c_int = 1;
/// What a Rust program exits with after a panic in `main`.
const PANICKED: c_int = 101;

/// # Safety
/// Called by the C runtime, with its `argc` and `argv`.
#[no_mangle]
pub unsafe extern "C" fn main(argc: c_int, argv: *const *const c_char) -> c_int {
    start_like_std();
    // SAFETY: the C runtime's argc and argv, which live as long as the process.
    let mut args = unsafe { c_args(argc, argv) }.into_iter().skip(1);
    // A panic must not unwind out of an `extern "C"` function (that aborts): it ends here with
    // std's exit status for one, after the hook has printed it. The CNI verbs catch their own
    // panics first, to answer with a JSON error.
    let status = panic::catch_unwind(move || match args.next() {
        None => cni_mode(),
        Some(subcommand) => node_tool(&subcommand, args.collect()),
    })
    .unwrap_or(PANICKED);
    // Returning to libc exits without std's clean-up: flush what `println!` may hold.
    match std::io::stdout().flush() {
        Ok(()) => status,
        Err(_) => FAILURE,
    }
}

/// The arguments from C's `argv`: std's own copy is filled by its start-up glue, which `no_main`
/// skips on musl (glibc hands them to std separately).
///
/// # Safety
/// `argv` holds `argc` NUL-terminated strings.
unsafe fn c_args(argc: c_int, argv: *const *const c_char) -> Vec<OsString> {
    use std::os::unix::ffi::OsStrExt;
    (0..usize::try_from(argc).unwrap_or(0))
        .map(|i| {
            // SAFETY: within argc, each entry a NUL-terminated string (the caller's promise).
            let arg = unsafe { std::ffi::CStr::from_ptr(*argv.add(i)) };
            OsStr::from_bytes(arg.to_bytes()).to_os_string()
        })
        .collect()
}

/// What std's start-up does that matters here: a closed stdout must fail a write, not kill the
/// process (SIGPIPE) nor hand fd 1 to the next file opened (which would then get the answer).
fn start_like_std() {
    use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
    use nix::sys::signal::{signal, SigHandler, Signal};
    for fd in 0..=2 {
        if fcntl(fd, FcntlArg::F_GETFD) == Err(nix::errno::Errno::EBADF) {
            // The lowest free descriptor: this one.
            let _ = open("/dev/null", OFlag::O_RDWR, nix::sys::stat::Mode::empty());
        }
    }
    // SAFETY: no other thread exists yet, and SIG_IGN runs no code.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) };
}

/// The node-side subcommands. `--help`, `help [SUBCOMMAND]` and `SUBCOMMAND --help` print the
/// help on stdout and exit 0; a usage error is one line on stderr and exit status 2.
fn node_tool(subcommand: &OsStr, rest: Vec<OsString>) -> c_int {
    let Some(words) = rest
        .into_iter()
        .map(|w| w.into_string().ok())
        .collect::<Option<Vec<String>>>()
    else {
        return usage_error("arguments must be valid UTF-8");
    };
    let Some(subcommand) = subcommand.to_str() else {
        return usage_error("arguments must be valid UTF-8");
    };
    let wants_help = words.iter().any(|w| w == "--help" || w == "-h");
    match subcommand {
        // `help --help` and `--help install -h` ask for help too: the flag names no subcommand.
        "-h" | "--help" | "help" => {
            let named: Vec<&str> = words
                .iter()
                .map(String::as_str)
                .filter(|w| *w != "--help" && *w != "-h")
                .collect();
            match named[..] {
                [] => help(None),
                [one] => help(Some(one)),
                _ => usage_error("help takes at most one subcommand"),
            }
        }
        s if wants_help && usage::of(s).is_some() => help(Some(s)),
        "version" | "--version" if words.is_empty() => {
            println!("intercept-cni {}", env!("CARGO_PKG_VERSION"));
            0
        }
        "version" | "--version" => usage_error("version takes no arguments"),
        "install" => intercept_cni::install::install_main(&words),
        "uninstall" => intercept_cni::install::uninstall_main(&words),
        "doctor" => intercept_cni::host::doctor_main(&words),
        "audit" => exec_node_tool("audit", &words),
        other => usage_error(&format!("unknown subcommand {other:?}")),
    }
}

/// The top-level help, or a subcommand's; an unknown subcommand is a usage error.
fn help(subcommand: Option<&str>) -> c_int {
    match subcommand.map_or(Some(usage::TOP), usage::of) {
        Some(text) => {
            print!("{text}");
            0
        }
        None => usage_error(&format!(
            "no help for unknown subcommand {:?}",
            subcommand.unwrap_or_default()
        )),
    }
}

fn usage_error(why: &str) -> c_int {
    eprintln!("intercept-cni: {why} (see `intercept-cni --help`)");
    2
}

/// Replaces this process with `intercept-cni-node SUBCOMMAND ARGS...` from our own directory;
/// returns only when that fails.
fn exec_node_tool(subcommand: &str, words: &[String]) -> c_int {
    use std::os::unix::process::CommandExt;
    // Next to this executable: it keeps gRPC and an async runtime out of the per-pod plugin
    // (README, "Node audit").
    let tool = match intercept_cni::agent::repair::node_tool() {
        Ok(tool) => tool,
        // Missing, or one someone but root could have changed (it would run as root).
        Err(e) => {
            eprintln!("intercept-cni {subcommand}: {e}");
            return 1;
        }
    };
    let err = std::process::Command::new(&tool)
        .arg(subcommand)
        .args(words)
        .exec();
    eprintln!(
        "intercept-cni {subcommand}: cannot run {} (installed next to intercept-cni): {err}",
        tool.display()
    );
    1
}

fn cni_mode() -> c_int {
    logging::init();
    // The default hook would print to stderr too; this one also reaches the log file, and
    // stdout stays reserved for the single JSON answer.
    panic::set_hook(Box::new(|info| log::error!("internal error: {info}")));
    let started = std::time::Instant::now();
    let mut trace = Trace::default();
    let outcome = cmd::guarded(&mut trace, cni_invocation);
    cmd::send_event(&trace, &outcome, started);
    let (answer, success) = cmd::final_answer(outcome, &trace);
    let printed = answer.as_ref().is_none_or(print_answer);
    if success && printed {
        SUCCESS
    } else {
        FAILURE
    }
}

fn cni_invocation(trace: &mut Trace) -> Result<Option<serde_json::Value>> {
    let Some((env, stdin)) = read_invocation(trace).inspect_err(|e| log::error!("{e}"))? else {
        return Ok(None);
    };
    cmd::execute(&env, &stdin, trace)
}

/// The environment and stdin; `None` when there is no command (the "about" line was printed).
fn read_invocation(trace: &mut Trace) -> Result<Option<(CniEnv, Vec<u8>)>> {
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
    trace.command = Some(command);
    let env = CniEnv::read(command, |name| std::env::var_os(name))?;
    Ok(Some((env, read_stdin()?)))
}

/// A network configuration is a few KiB; this is generous, and bounds what stdin can make us hold.
const MAX_STDIN_BYTES: u64 = 4 << 20;

/// Reads stdin up to `MAX_STDIN_BYTES` (one byte more tells it is too long): code 6 beyond.
fn read_stdin() -> Result<Vec<u8>> {
    // Room for a typical config up front: from an empty buffer std probes with 32-byte reads.
    let mut stdin = Vec::with_capacity(16 * 1024);
    std::io::stdin()
        .take(MAX_STDIN_BYTES + 1)
        .read_to_end(&mut stdin)
        .map_err(|e| Error::io("cannot read the network configuration from stdin", e))?;
    if stdin.len() as u64 > MAX_STDIN_BYTES {
        return Err(Error::new(
            Code::Decode,
            format!(
                "the network configuration on stdin is longer than {} MiB",
                MAX_STDIN_BYTES >> 20
            ),
        ));
    }
    Ok(stdin)
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
