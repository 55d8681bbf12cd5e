//! The agent's counters and their Prometheus text rendering (exposition format 0.0.4). Counters
//! are process-wide statics: the watch loop and the event relay bump them with one call, the
//! HTTP thread renders them.

use super::events::Outcome;
use super::ready::Readiness;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, PoisonError};

static CHAINED_ONCE: AtomicBool = AtomicBool::new(false);
static INSTALLED_ONCE: AtomicBool = AtomicBool::new(false);
static RECHAINS: AtomicU64 = AtomicU64::new(0);
static REINSTALLS: AtomicU64 = AtomicU64::new(0);
static PASSES: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
/// Index into `PASS_RESULTS` of the last pass, or `NO_PASS`.
static LAST_PASS: AtomicU8 = AtomicU8::new(NO_PASS);
const NO_PASS: u8 = u8::MAX;
static INVALID_EVENTS: AtomicU64 = AtomicU64::new(0);
static AUDITS: [AtomicU64; 4] = [
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
];
static PODS_REPAIRED: AtomicU64 = AtomicU64::new(0);
/// Pods needing attention by status, as of the last audit that read the runtime.
static ATTENTION: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// How one audit of the agent's repair ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audit {
    /// Every pod as the policy wants (after repairs).
    Clean = 0,
    /// Some pod needs attention.
    Attention = 1,
    /// The active network does not chain the plugin: no pod checked.
    NotChained = 2,
    /// No report: node tool missing, runtime unreachable, timed out.
    Failed = 3,
}

const AUDIT_RESULTS: [&str; 4] = ["clean", "attention", "not-chained", "failed"];

/// How an install pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Our entry is chained (written now or already there).
    Chained = 0,
    /// No network config to chain into yet.
    Waiting = 1,
    Failed = 2,
}

const PASS_RESULTS: [&str; 3] = ["chained", "waiting", "failed"];

/// Per (verb, outcome, code): invocations; per verb: duration sum and count.
#[derive(Default)]
struct Invocations {
    by_outcome: BTreeMap<(&'static str, &'static str, u32), u64>,
    durations: BTreeMap<&'static str, (f64, u64)>,
}

static INVOCATIONS: Mutex<Invocations> = Mutex::new(Invocations {
    by_outcome: BTreeMap::new(),
    durations: BTreeMap::new(),
});

/// The installer wrote our entry into the active conflist; every write after the first of this
/// process is a re-chain (another agent had removed or replaced it).
pub fn conflist_written() {
    if CHAINED_ONCE.swap(true, Ordering::Relaxed) {
        RECHAINS.fetch_add(1, Ordering::Relaxed);
    }
}

/// The installer copied the binary into the bin dir; after the first, a re-install.
pub fn binary_written() {
    if INSTALLED_ONCE.swap(true, Ordering::Relaxed) {
        REINSTALLS.fetch_add(1, Ordering::Relaxed);
    }
}

pub fn pass(result: Pass) {
    PASSES[result as usize].fetch_add(1, Ordering::Relaxed);
    LAST_PASS.store(result as u8, Ordering::Relaxed);
}

pub fn invalid_event() {
    INVALID_EVENTS.fetch_add(1, Ordering::Relaxed);
}

/// One audit of the repair: its result, the pods it repaired and, unless it failed, the pods
/// needing attention by status (replacing the last audit's).
pub fn audit(result: Audit, repaired: u64, attention: &BTreeMap<&'static str, u64>) {
    AUDITS[result as usize].fetch_add(1, Ordering::Relaxed);
    PODS_REPAIRED.fetch_add(repaired, Ordering::Relaxed);
    if result != Audit::Failed {
        *ATTENTION.lock().unwrap_or_else(PoisonError::into_inner) = attention.clone();
    }
}

/// One plugin invocation reported through the events socket (`verb` one of `events::VERBS`).
pub fn invocation(verb: &'static str, outcome: Outcome, code: u32, duration_ms: f64) {
    let mut inv = INVOCATIONS.lock().unwrap_or_else(PoisonError::into_inner);
    *inv.by_outcome
        .entry((verb, outcome.as_str(), code))
        .or_default() += 1;
    let (sum, count) = inv.durations.entry(verb).or_default();
    *sum += duration_ms / 1000.0;
    *count += 1;
}

/// The metrics page, with the install state from `readiness` (computed for this scrape).
pub fn render(readiness: &Readiness) -> String {
    let mut out = String::new();
    let gauge = |out: &mut String, name: &str, help: &str, value: bool| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
            u8::from(value)
        );
    };
    gauge(
        &mut out,
        "intercept_cni_ready",
        "1 when the agent is ready: entry chained, binary current, host check passed.",
        readiness.is_ready(),
    );
    let _ = writeln!(
        out,
        "# HELP intercept_cni_install_state 1 for each readiness condition that holds.\n\
         # TYPE intercept_cni_install_state gauge"
    );
    for (condition, holds) in readiness.conditions() {
        let _ = writeln!(
            out,
            "intercept_cni_install_state{{condition=\"{condition}\"}} {}",
            u8::from(holds)
        );
    }
    let counter = |out: &mut String, name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    counter(
        &mut out,
        "intercept_cni_rechains_total",
        "Times the entry was written into the active conflist again after this agent's first install.",
        RECHAINS.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "intercept_cni_reinstalls_total",
        "Times the plugin binary was copied into the bin dir again after this agent's first install.",
        REINSTALLS.load(Ordering::Relaxed),
    );
    let _ = writeln!(
        out,
        "# HELP intercept_cni_install_passes_total Install passes by result.\n\
         # TYPE intercept_cni_install_passes_total counter"
    );
    for (i, result) in PASS_RESULTS.iter().enumerate() {
        let _ = writeln!(
            out,
            "intercept_cni_install_passes_total{{result=\"{result}\"}} {}",
            PASSES[i].load(Ordering::Relaxed)
        );
    }
    let last = LAST_PASS.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP intercept_cni_last_pass 1 for the result of the latest install pass.\n\
         # TYPE intercept_cni_last_pass gauge"
    );
    for (i, result) in PASS_RESULTS.iter().enumerate() {
        let _ = writeln!(
            out,
            "intercept_cni_last_pass{{result=\"{result}\"}} {}",
            u8::from(usize::from(last) == i)
        );
    }
    let inv = INVOCATIONS.lock().unwrap_or_else(PoisonError::into_inner);
    let _ = writeln!(
        out,
        "# HELP intercept_cni_plugin_invocations_total Plugin invocations reported to this agent, by verb, outcome and CNI error code (0 on success).\n\
         # TYPE intercept_cni_plugin_invocations_total counter"
    );
    for ((verb, outcome, code), n) in &inv.by_outcome {
        let _ = writeln!(
            out,
            "intercept_cni_plugin_invocations_total{{verb=\"{verb}\",outcome=\"{outcome}\",code=\"{code}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP intercept_cni_plugin_duration_seconds Time plugin invocations took, by verb.\n\
         # TYPE intercept_cni_plugin_duration_seconds summary"
    );
    for (verb, (sum, count)) in &inv.durations {
        let _ = writeln!(
            out,
            "intercept_cni_plugin_duration_seconds_sum{{verb=\"{verb}\"}} {sum}\n\
             intercept_cni_plugin_duration_seconds_count{{verb=\"{verb}\"}} {count}"
        );
    }
    counter(
        &mut out,
        "intercept_cni_invalid_events_total",
        "Datagrams on the events socket that were not a valid plugin record.",
        INVALID_EVENTS.load(Ordering::Relaxed),
    );
    render_audits(&mut out);
    out
}

fn render_audits(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP intercept_cni_audit_runs_total Audits of the node's pods by the agent's repair, by result.\n\
         # TYPE intercept_cni_audit_runs_total counter"
    );
    for (i, result) in AUDIT_RESULTS.iter().enumerate() {
        let _ = writeln!(
            out,
            "intercept_cni_audit_runs_total{{result=\"{result}\"}} {}",
            AUDITS[i].load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP intercept_cni_pods_repaired_total Running pods the agent's repair intercepted in place.\n\
         # TYPE intercept_cni_pods_repaired_total counter\n\
         intercept_cni_pods_repaired_total {}",
        PODS_REPAIRED.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP intercept_cni_audit_attention_pods Pods needing attention at the last audit that read the runtime, by status.\n\
         # TYPE intercept_cni_audit_attention_pods gauge"
    );
    let attention = ATTENTION.lock().unwrap_or_else(PoisonError::into_inner);
    for kind in super::repair::ATTENTION.iter().chain(&["unknown"]) {
        let _ = writeln!(
            out,
            "intercept_cni_audit_attention_pods{{status=\"{kind}\"}} {}",
            attention.get(kind).copied().unwrap_or(0)
        );
    }
}
