//! The CNI verbs: each parses, builds what it needs, and calls the backend inside the pod netns.
//!
//! Choices the spec leaves open, made here:
//! - ADD/CHECK on a `CNI_NETNS` that does not exist: code 5 (I/O), not 3 ("unknown container"),
//!   because code 3 tells the runtime to skip DEL, which would leak what earlier plugins made.
//! - CHECK requires `prevResult` like ADD: the runtime must send it (SPEC.md), and the families
//!   it lists are part of what ADD would install.
//! - DEL fails only for protocol errors (env 4, JSON 6, version 1) and for the kernel refusing
//!   removal with the backend that ADD would use. Invalid plugin keys do not fail DEL: a runtime
//!   repeats DEL with the config that failed ADD, and refusing it would wedge the pod; such a
//!   config made ADD fail before it touched the kernel, so removal errors are only logged.
//!   A missing or vanished netns is success; the host's netns is left alone (ADD never
//!   programs it).
//! - DEL with `backend: auto` removes with every backend, so rules survive no backend change;
//!   only the resolved backend's errors are fatal: the others may lack their binaries, and any
//!   rule they miss lives in the pod netns, which the runtime deletes next.
//! - Order of checks: JSON and cniVersion first (code 6/1), then `excludeNamespaces` alone: a
//!   pod in a listed namespace is passed through by ADD and CHECK even when other keys are
//!   invalid, so a config typo cannot stop kube-system; then every other key (code 7).
//! - DEL also removes host-side files kept for the netns (the iptables backend's per-netns
//!   xtables lock file), so pods that come and go leave nothing behind; GC removes those of
//!   namespaces that were gone before their DEL.

use crate::agent::events;
use crate::backend::iptables;
use crate::backend::{self, Backend, BackendChoice, BackendKind, BackendOptions, IptablesMode};
use crate::cni::config::{self, Attachment, NetConf};
use crate::cni::env::{CniEnv, Command, PodRef};
use crate::cni::error::{Code, Error, Result};
use crate::cni::{result, version};
use crate::host;
use crate::logging;
use crate::netns::{Lookup, PodNetns};
use crate::plan::{InterceptPlan, InterceptionMode};
use crate::policy::{self, Decision};
use crate::route;
use serde_json::{Map, Value};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::time::Instant;

/// What an invocation learned along the way, for its error answer and its log line.
#[derive(Debug, Default)]
pub struct Trace {
    /// The config's `cniVersion`, once known to be one we speak.
    pub cni_version: Option<String>,
    /// The backend used, once chosen.
    pub backend: Option<&'static str>,
    /// ADD and CHECK: whether the pod is intercepted, and what decided it.
    pub policy: Option<String>,
    /// The verb, once `CNI_COMMAND` is read.
    pub command: Option<Command>,
    pub pod: PodRef,
    pub container_id: Option<String>,
    /// Where the invocation's event record goes (the config's `eventsSocket`).
    pub events: events::Target,
}

/// Sends the invocation's record to the node agent, if one listens (see `agent::events`).
/// VERSION, pure protocol, sends none; neither does an invocation without a valid verb.
pub fn send_event(trace: &Trace, outcome: &Result<Option<Value>>, started: Instant) {
    let Some(command) = trace.command.filter(|c| *c != Command::Version) else {
        return;
    };
    events::send(&trace.events, || {
        let error = outcome.as_ref().err();
        events::Event {
            verb: command.as_str().to_string(),
            namespace: trace.pod.namespace.clone(),
            pod: trace.pod.name.clone(),
            container_id: trace.container_id.clone(),
            outcome: if error.is_some() {
                events::Outcome::Error
            } else {
                events::Outcome::Ok
            },
            code: error.map_or(0, |e| e.code as u32),
            msg: error.map(|e| events::bounded(&e.msg)),
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            backend: trace.backend.map(String::from),
            policy: trace.policy.clone(),
            warnings: logging::take_warnings(),
            pid: std::process::id(),
        }
    });
}

/// Runs `invocation`, turning a panic into a code-199 error: `main` runs every CNI invocation
/// through this, so no panic leaves without an answer (the panic hook logs where it happened).
pub fn guarded(
    trace: &mut Trace,
    invocation: impl FnOnce(&mut Trace) -> Result<Option<Value>>,
) -> Result<Option<Value>> {
    panic::catch_unwind(AssertUnwindSafe(|| invocation(trace)))
        .unwrap_or_else(|payload| Err(Error::from_panic(payload.as_ref())))
}

/// What `main` prints on stdout (at most one JSON object) and whether it exits with success.
pub fn final_answer(outcome: Result<Option<Value>>, trace: &Trace) -> (Option<Value>, bool) {
    match outcome {
        Ok(answer) => (answer, true),
        Err(e) => {
            let version = trace.cni_version.as_deref().unwrap_or(version::LATEST);
            (Some(e.to_json(version)), false)
        }
    }
}

/// Runs one verb and logs one line about it. `Ok(Some)` is the JSON to print on stdout.
pub fn execute(env: &CniEnv, stdin: &[u8], trace: &mut Trace) -> Result<Option<Value>> {
    let started = Instant::now();
    trace.pod = env.pod.clone();
    trace.container_id = env.container_id.as_ref().map(|c| c.as_str().to_string());
    let outcome = run(env, stdin, trace);
    let status = match &outcome {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("error {}: {e}", e.code as u32),
    };
    let policy = trace
        .policy
        .as_ref()
        .map_or(String::new(), |p| format!(" policy=({p})"));
    let line = format!(
        "{} pod={} container={}{policy} backend={} outcome={} duration={:.3}ms",
        env.command,
        env.pod,
        env.container_id.as_ref().map_or("-", |c| c.as_str()),
        trace.backend.unwrap_or("-"),
        status,
        started.elapsed().as_secs_f64() * 1000.0
    );
    match (&outcome, env.command) {
        (Err(_), _) => log::error!("{line}"),
        (Ok(_), Command::Version) => log::debug!("{line}"),
        (Ok(_), _) => log::info!("{line}"),
    }
    outcome
}

fn run(env: &CniEnv, stdin: &[u8], trace: &mut Trace) -> Result<Option<Value>> {
    if env.command == Command::Version {
        return version_answer(stdin).map(Some);
    }
    let (obj, cni_version) = negotiate(env.command, stdin, trace)?;
    let conf = match NetConf::from_object(&obj, &cni_version) {
        Ok(conf) => conf,
        Err(e) if env.command == Command::Del && e.code == Code::InvalidConfig => {
            // ADD validates the config before touching the kernel, so with this config it
            // installed nothing: removal is attempted, and its errors only logged.
            log::warn!("DEL: removing with every backend despite an invalid config: {e}");
            let state_dir = Path::new(config::DEFAULT_STATE_DIR);
            let removed = del(
                env,
                &BackendChoice::Auto,
                &BackendOptions::default(),
                state_dir,
                trace,
            );
            if let Err(e) = removed {
                log::warn!("DEL: {e}");
            }
            return Ok(None);
        }
        Err(e)
            if matches!(env.command, Command::Add | Command::Check)
                && e.code == Code::InvalidConfig
                && config::excludes_namespace(&obj, env.pod.namespace.as_deref()) =>
        {
            // The config's own exclusions hold even when the rest of it is invalid.
            log::warn!(
                "{}: namespace excluded, pod left alone despite an invalid config: {e}",
                env.command
            );
            trace.policy = Some("not intercepted: namespace excluded".into());
            return match env.command {
                Command::Add => {
                    let prev = result::require(obj.get("prevResult"))?;
                    result::passthrough(prev, &cni_version).map(Some)
                }
                _ => Ok(None),
            };
        }
        Err(e) => return Err(e),
    };
    if let Err(e) = logging::configure(
        conf.log_level,
        conf.log_file.as_deref(),
        conf.log_file_max_bytes,
    ) {
        log::warn!("logging to stderr only: {e}");
    }
    for key in config::unknown_keys(&obj) {
        log::debug!("config: ignoring unknown key {key:?}");
    }
    // Everything needed is in `conf` now; a policy of thousands of entries is megabytes of
    // JSON values, better freed before the verb builds its own large structures.
    drop(obj);
    match env.command {
        Command::Add => add(env, &conf, trace),
        Command::Del => del(
            env,
            &conf.backend,
            &conf.backend_options,
            &conf.state_dir,
            trace,
        ),
        Command::Check => check(env, &conf, trace),
        Command::Status => status(&conf, trace),
        Command::Gc => gc(&conf),
        Command::Version => version_answer(stdin).map(Some),
    }
}

/// The decoded config object and the version negotiated for `command`. Pure, like everything
/// up to `plan_for`: the fuzz target (fuzz/) drives these steps without a kernel.
pub fn negotiate(
    command: Command,
    stdin: &[u8],
    trace: &mut Trace,
) -> Result<(Map<String, Value>, String)> {
    let obj = config::decode(stdin)?;
    // First: a config refused for its version still reports where it says.
    trace.events = config::events_target(&obj).unwrap_or_default();
    let declared = config::cni_version(&obj)?;
    if let Some(v) = declared.filter(|v| version::is_supported(v)) {
        trace.cni_version = Some(v.to_string());
    }
    let cni_version = version::negotiate(declared, command)?.to_string();
    Ok((obj, cni_version))
}

/// VERSION needs no environment and tolerates an empty stdin.
pub fn version_answer(stdin: &[u8]) -> Result<Value> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Ok(version::version_answer(None));
    }
    let obj = config::decode(stdin)?;
    Ok(version::version_answer(config::cni_version(&obj)?))
}

/// The plan ADD would install now, and CHECK compares against; `None` when the pod policy
/// leaves the pod alone.
pub fn plan_for<'a>(
    env: &CniEnv,
    conf: &'a NetConf,
    trace: &mut Trace,
) -> Result<(Option<InterceptPlan>, &'a Value)> {
    let prev = result::require(conf.prev_result.as_ref())?;
    let families = result::families(prev)?;
    let plan = match policy::decide(conf, env.pod.namespace.as_deref())? {
        Decision::Skip { reason } => {
            trace.policy = Some(format!("not intercepted: {reason}"));
            None
        }
        Decision::Intercept { settings, reason } => {
            trace.policy = Some(format!("intercepted: {reason}"));
            Some(config::build_plan(
                &settings,
                families,
                result::ipv6_first(prev),
            )?)
        }
    };
    Ok((plan, prev))
}

/// What ADD would decide for this invocation, without touching the kernel: the parsed config
/// and the plan (`None`: the policy leaves the pod alone). `intercept-cni audit` calls this with
/// the invocation the runtime would make for a running pod, so it decides exactly as ADD does.
pub fn decide(
    env: &CniEnv,
    stdin: &[u8],
    trace: &mut Trace,
) -> Result<(NetConf, Option<InterceptPlan>)> {
    let (obj, cni_version) = negotiate(Command::Add, stdin, trace)?;
    let conf = NetConf::from_object(&obj, &cni_version)?;
    let (plan, _) = plan_for(env, &conf, trace)?;
    Ok((conf, plan))
}

/// Whether the pod netns of `env` holds anything of ours, for the backend `conf` resolves to.
pub fn installed(env: &CniEnv, conf: &NetConf) -> Result<bool> {
    let ns = open_pod_netns(env)?;
    let kind = resolve(conf.backend, &conf.backend_options, &conf.state_dir)?;
    let backend = backend::build(kind, &conf.backend_options);
    ns.run(|| backend.installed())
}

/// The backend for `choice`, with the host check (cached in `state_dir`) deciding `auto`.
fn resolve(
    choice: BackendChoice,
    options: &BackendOptions,
    state_dir: &Path,
) -> Result<BackendKind> {
    backend::resolve(choice, options, |kind| host::usable(kind, false, state_dir))
}

/// ADD and CHECK need the pod netns to exist, and never accept the host's.
fn open_pod_netns(env: &CniEnv) -> Result<PodNetns> {
    let path = env
        .netns
        .as_deref()
        .ok_or_else(|| Error::env("CNI_NETNS", format!("required for {}", env.command)))?;
    let ns = PodNetns::open(path)?.ok_or_else(|| {
        Error::new(
            Code::Io,
            format!("CNI_NETNS {} does not exist", path.display()),
        )
    })?;
    ns.refuse_own()?;
    Ok(ns)
}

fn add(env: &CniEnv, conf: &NetConf, trace: &mut Trace) -> Result<Option<Value>> {
    let (plan, prev) = plan_for(env, conf, trace)?;
    let answer = result::passthrough(prev, &conf.cni_version)?;
    let Some(plan) = plan else {
        return Ok(Some(answer));
    };
    let ns = open_pod_netns(env)?;
    let kind = resolve(conf.backend, &conf.backend_options, &conf.state_dir)?;
    let backend = backend::build(kind, &conf.backend_options);
    trace.backend = Some(backend.name());
    host::first_run(
        kind,
        plan.families.ipv6,
        &conf.state_dir,
        conf.host_prerequisites,
    )?;
    ns.run(|| {
        // TPROXY's policy routing first: diverted packets must never meet a missing route.
        route::apply(&plan)?;
        backend.apply(&plan).inspect_err(|_| {
            if plan.mode != InterceptionMode::Redirect {
                if let Err(e) = route::remove() {
                    log::warn!("cannot undo the TPROXY routing: {e}");
                }
            }
        })
    })?;
    Ok(Some(answer))
}

fn check(env: &CniEnv, conf: &NetConf, trace: &mut Trace) -> Result<Option<Value>> {
    let (plan, _) = plan_for(env, conf, trace)?;
    let Some(plan) = plan else {
        return Ok(None);
    };
    let ns = open_pod_netns(env)?;
    let kind = resolve(conf.backend, &conf.backend_options, &conf.state_dir)?;
    let backend = backend::build(kind, &conf.backend_options);
    trace.backend = Some(backend.name());
    ns.run(|| {
        backend.check(&plan)?;
        let drift = route::drift(&plan)?;
        match drift.is_empty() {
            true => Ok(()),
            false => Err(Error::new(
                Code::Drift,
                format!("TPROXY routing differs from the plan: {}", drift.join("; ")),
            )),
        }
    })?;
    Ok(None)
}

/// Every backend a pod's rules could have been installed with (iptables removal covers both
/// of its variants).
const ALL_KINDS: [BackendKind; 2] = [
    BackendKind::Nftables,
    BackendKind::Iptables(IptablesMode::Nft),
];

fn del(
    env: &CniEnv,
    choice: &BackendChoice,
    options: &BackendOptions,
    state_dir: &Path,
    trace: &mut Trace,
) -> Result<Option<Value>> {
    let Some(path) = env.netns.as_deref() else {
        log::debug!("DEL: no CNI_NETNS, nothing to remove");
        return Ok(None);
    };
    let ns = match PodNetns::lookup(path)? {
        Lookup::Found(ns) => ns,
        Lookup::Missing => {
            log::debug!("DEL: netns {} is gone, nothing to remove", path.display());
            return Ok(None);
        }
        Lookup::NotNetns(why) => {
            log::debug!("DEL: {} is {why}, nothing to remove", path.display());
            return Ok(None);
        }
    };
    if ns.is_own() {
        log::warn!(
            "DEL: CNI_NETNS {} is the host's netns, where ADD never installs anything; leaving it alone",
            path.display()
        );
        return Ok(None);
    }
    // An unresolvable `auto` still removes with every backend, none of them fatal.
    let primary = match resolve(*choice, options, state_dir) {
        Ok(kind) => Some(kind),
        Err(e) if *choice == BackendChoice::Auto => {
            log::debug!("DEL: {e}");
            None
        }
        Err(e) => return Err(e),
    };
    let others: &[BackendKind] = if *choice == BackendChoice::Auto {
        &ALL_KINDS
    } else {
        &[]
    };
    let mut fatal = Vec::new();
    let mut tolerated = Vec::new();
    if let Some(kind) = primary {
        let backend = backend::build(kind, options);
        trace.backend = Some(backend.name());
        match remove_in(&ns, backend.as_ref()) {
            // Binaries that are missing or untrusted make the config one ADD refuses: like any
            // invalid key, that must not wedge teardown (the runtime deletes the netns next).
            Err(e) if e.code == Code::InvalidConfig => {
                log::warn!("DEL: cannot remove with this config, leaving the rules to the netns's deletion: {e}");
            }
            Err(e) => fatal.push(e),
            Ok(()) => {}
        }
    }
    for kind in others.iter().filter(|k| Some(**k) != primary) {
        if let Err(e) = remove_in(&ns, backend::build(*kind, options).as_ref()) {
            tolerated.push(e);
        }
    }
    // TPROXY's routing, whatever the backend (nothing to do when ADD made none).
    if let Err(e) = ns.run(route::remove) {
        fatal.push(e);
    }
    if let Some(e) = Error::collect(tolerated) {
        log::debug!("DEL: other backends could not remove (ignored): {e}");
    }
    match Error::collect(fatal) {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

fn remove_in(ns: &PodNetns, backend: &dyn Backend) -> Result<()> {
    ns.run(|| backend.remove()).map_err(|e| Error {
        msg: format!("{}: {}", backend.name(), e.msg),
        ..e
    })
}

fn status(conf: &NetConf, trace: &mut Trace) -> Result<Option<Value>> {
    // A config the plugin must refuse (a foreign stateDir) stays code 7.
    let kind =
        resolve(conf.backend, &conf.backend_options, &conf.state_dir).map_err(|e| {
            match e.code {
                Code::InvalidConfig => e,
                _ => Error::new(Code::PluginNotAvailable, e.to_string()),
            }
        })?;
    let backend = backend::build(kind, &conf.backend_options);
    trace.backend = Some(backend.name());
    backend_ready(kind, &conf.backend_options)?;
    // IPv4 only: STATUS knows no pod's families, and an IPv6 gap fails that pod's ADD (101).
    if conf.host_prerequisites != host::Policy::Skip {
        host::status(kind, false, &conf.state_dir)?;
    }
    Ok(None)
}

/// Whether ADD could be served with `kind` on this host; code 50 when not.
fn backend_ready(kind: BackendKind, options: &BackendOptions) -> Result<()> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockProtocol, SockType};
    match kind {
        BackendKind::Nftables => socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map(drop)
        .map_err(|e| {
            Error::new(
                Code::PluginNotAvailable,
                format!("nftables: cannot open a netfilter netlink socket: {e}"),
            )
        }),
        // The kernel side is the host check's; here, the binaries ADD will spawn.
        BackendKind::Iptables(mode) => iptables::restore_binaries_present(mode, options),
    }
}

fn gc(conf: &NetConf) -> Result<Option<Value>> {
    collect_garbage(&conf.state_dir, &conf.valid_attachments)?;
    Ok(None)
}

/// Removes host-side state of attachments not in `valid`. Rules live in the pod netns and die
/// with it, and nothing per attachment is kept in `state_dir`; what can be left is the iptables
/// backend's lock files of namespaces that vanished before their DEL, found by namespace, not by
/// attachment. Failing to sweep them is logged: it fails no attachment.
fn collect_garbage(state_dir: &Path, valid: &[Attachment]) -> Result<()> {
    log::debug!(
        "GC: {} valid attachment(s); no per-attachment state in {}",
        valid.len(),
        state_dir.display()
    );
    match iptables::sweep_stale_lock_files() {
        Ok(0) => {}
        Ok(n) => log::info!("GC: removed {n} xtables lock file(s) of namespaces that are gone"),
        Err(e) => log::warn!("GC: {e}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The path `main` takes for a panic anywhere in an invocation, down to the printed text.
    #[test]
    fn a_panic_becomes_one_json_error_answer() {
        let mut trace = Trace::default();
        let outcome = guarded(&mut trace, |trace| {
            trace.cni_version = Some("0.4.0".into());
            panic!("index out of bounds")
        });
        let (answer, success) = final_answer(outcome, &trace);
        assert!(!success);
        let printed = serde_json::to_string(&answer.expect("an answer")).unwrap();
        let parsed: Value = serde_json::from_str(&printed).unwrap();
        assert_eq!(parsed["code"], 199);
        assert_eq!(parsed["cniVersion"], "0.4.0");
        assert!(parsed["msg"]
            .as_str()
            .unwrap()
            .contains("index out of bounds"));
    }

    #[test]
    fn answers_without_a_panic_pass_through() {
        let mut trace = Trace::default();
        let ok = guarded(&mut trace, |_| Ok(Some(serde_json::json!({"a": 1}))));
        assert_eq!(
            final_answer(ok, &trace),
            (Some(serde_json::json!({"a": 1})), true)
        );
        let silent = guarded(&mut trace, |_| Ok(None));
        assert_eq!(final_answer(silent, &trace), (None, true));
        let failed = guarded(&mut trace, |_| Err(Error::config("bad")));
        let (answer, success) = final_answer(failed, &trace);
        assert!(!success);
        let answer = answer.unwrap();
        assert_eq!(
            (answer["code"].as_u64(), answer["cniVersion"].as_str()),
            (Some(7), Some(version::LATEST))
        );
    }
}
