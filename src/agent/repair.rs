//! The agent's repair: `intercept-cni-node audit --repair --json` run on a schedule and whenever
//! the watch loop (re)chains the plugin, so that pods started while the plugin was not chained
//! (node boot, an agent restart) are intercepted in place. The node tool is a child process (gRPC
//! and an async runtime stay out of this binary), one at a time, on a thread of its own, killed
//! after `TIMEOUT`: a hung runtime never holds up the watch loop or the probes. Its failures are
//! logged and counted, never fatal.

use super::metrics;
use crate::cni::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The binary of the node tools that speak the CRI, shipped next to `intercept-cni` (in the
/// agent's image; it is not copied to the host's CNI bin dir).
pub const NODE_TOOL: &str = "intercept-cni-node";
/// containerd's CRI socket; CRI-O's is /var/run/crio/crio.sock.
pub const DEFAULT_CRI_SOCKET: &str = "/run/containerd/containerd.sock";
pub const DEFAULT_INTERVAL_SECS: u64 = 60;
/// An audit that takes longer is killed (and counted as failed): a runtime that does not answer.
const TIMEOUT: Duration = Duration::from_secs(120);
/// The JSON report is a few hundred bytes per pod.
const MAX_REPORT_BYTES: u64 = 16 << 20;
/// Its stderr: why it failed, or warnings (a conf file the runtime skips).
const MAX_REASONS_BYTES: u64 = 64 << 10;

/// Pod statuses of the node tool that need the operator (its `Status::is_finding`); any status
/// this list does not know is counted as `unknown`, also a finding.
pub const ATTENTION: [&str; 7] = [
    "missing",
    "drifted",
    "repair-failed",
    "unexpected",
    "refused",
    "unproven",
    "check-failed",
];
const FINE: [&str; 4] = ["intercepted", "not-selected", "repaired", "skipped"];

pub struct Settings {
    pub interval: Duration,
    pub cri_socket: PathBuf,
    pub conf_dir: PathBuf,
}

/// Room for one pending request: requests while one is pending or running coalesce.
static REQUESTS: OnceLock<SyncSender<()>> = OnceLock::new();

/// Asks for an audit soon (the plugin was just chained); never blocks, a no-op without repair.
pub fn request() {
    if let Some(requests) = REQUESTS.get() {
        let _ = requests.try_send(());
    }
}

/// Where the node tool is: next to our own executable.
/// `intercept-cni-node` next to our own executable, when nobody but root could have changed it
/// (it runs as root on the node).
pub fn node_tool() -> Result<PathBuf> {
    let exe = std::fs::read_link(crate::install::SELF_EXE)
        .map_err(|e| Error::io("cannot find our own executable", e))?;
    let tool = exe.with_file_name(NODE_TOOL);
    crate::trusted_path::trusted_executable(&tool)?;
    Ok(tool)
}

/// Runs audits until the process ends: after every `request` and every `interval` without one.
pub fn run(settings: Settings) {
    let (sender, requests) = mpsc::sync_channel(1);
    if REQUESTS.set(sender).is_err() {
        return;
    }
    let mut last_log = String::new();
    loop {
        match requests.recv_timeout(settings.interval) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let outcome = audit(&settings);
        record(&outcome, &mut last_log);
    }
}

/// Counts and logs one audit; the summary and errors only when they differ from the last ones
/// (an audit every minute must not flood the log), repaired pods always.
fn record(outcome: &Result<Summary>, last_log: &mut String) {
    let line = match outcome {
        Ok(summary) => {
            for pod in &summary.repaired {
                log::info!("audit: repaired {pod}: intercepted in place");
            }
            metrics::audit(
                summary.result(),
                summary.repaired.len() as u64,
                &summary.attention,
            );
            summary.describe()
        }
        Err(e) => {
            metrics::audit(metrics::Audit::Failed, 0, &BTreeMap::new());
            format!("audit failed: {e}; retried in the next interval")
        }
    };
    if line != *last_log {
        match outcome {
            Ok(s) if s.result() == metrics::Audit::Clean => log::info!("{line}"),
            _ => log::warn!("{line}"),
        }
        *last_log = line;
    }
}

fn audit(settings: &Settings) -> Result<Summary> {
    let tool = node_tool()?;
    let mut child = Command::new(&tool)
        .args(["audit", "--repair", "--json", "--cri-socket"])
        .arg(&settings.cri_socket)
        .arg("--cni-conf-dir")
        .arg(&settings.conf_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io(format!("cannot run {}", tool.display()), e))?;
    // Read while it runs: output larger than a pipe would otherwise block it.
    let report = drain(child.stdout.take(), MAX_REPORT_BYTES);
    let reasons = drain(child.stderr.take(), MAX_REASONS_BYTES);
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            outcome => {
                let _ = child.kill();
                let _ = child.wait();
                let why = match outcome {
                    Err(e) => format!("cannot wait for it ({e}): killed"),
                    _ => format!("killed after {} s without an answer", TIMEOUT.as_secs()),
                };
                return Err(Error::io(NODE_TOOL, why));
            }
        }
    };
    let report = report.join().unwrap_or_default();
    let reasons = String::from_utf8_lossy(&reasons.join().unwrap_or_default())
        .trim()
        .replace('\n', "; ");
    // 0: all as wanted, 1: some pod needs attention (or not chained); both print the report.
    match status.code() {
        Some(0 | 1) => summarize(&report)
            .map(|mut summary| {
                summary.notes = reasons;
                summary
            })
            .map_err(|e| Error::io(NODE_TOOL, e)),
        _ if reasons.is_empty() => Err(Error::io(NODE_TOOL, status)),
        _ => Err(Error::io(NODE_TOOL, reasons)),
    }
}

/// Reads `from` to its end on a thread of its own, keeping the first `cap` bytes.
fn drain(from: Option<impl Read + Send + 'static>, cap: u64) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut from) = from {
            let _ = (&mut from).take(cap).read_to_end(&mut out);
            // The rest is read and dropped: a child blocked on a full pipe never exits.
            let _ = std::io::copy(&mut from, &mut std::io::sink());
        }
        out
    })
}

#[derive(Deserialize)]
struct Report {
    chained: bool,
    pods: Vec<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    namespace: String,
    name: String,
    status: String,
}

/// What one audit found.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub chained: bool,
    pub pods: usize,
    /// `namespace/name` of each pod repaired.
    pub repaired: Vec<String>,
    /// Pods needing attention, by status (`ATTENTION`, or `unknown`).
    pub attention: BTreeMap<&'static str, u64>,
    /// What the node tool said on stderr besides its report.
    pub notes: String,
}

impl Summary {
    pub fn result(&self) -> metrics::Audit {
        match (self.chained, self.attention.is_empty()) {
            (false, _) => metrics::Audit::NotChained,
            (true, true) => metrics::Audit::Clean,
            (true, false) => metrics::Audit::Attention,
        }
    }

    fn describe(&self) -> String {
        let notes = if self.notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.notes)
        };
        if !self.chained {
            return format!(
                "audit: the plugin is not chained in the active network: no pod checked{notes}"
            );
        }
        let kinds: Vec<String> = self
            .attention
            .iter()
            .map(|(kind, n)| format!("{n} {kind}"))
            .collect();
        let attention = if kinds.is_empty() {
            "none needs attention".to_string()
        } else {
            format!(
                "need attention: {} (`intercept-cni audit` lists them)",
                kinds.join(", ")
            )
        };
        format!("audit: {} pods, {attention}{notes}", self.pods)
    }
}

/// Counts the node tool's `--json` report.
pub fn summarize(report: &[u8]) -> std::result::Result<Summary, String> {
    let report: Report = serde_json::from_slice(report)
        .map_err(|e| format!("{NODE_TOOL} printed no valid report: {e}"))?;
    let mut summary = Summary {
        chained: report.chained,
        pods: report.pods.len(),
        repaired: Vec::new(),
        attention: BTreeMap::new(),
        notes: String::new(),
    };
    for pod in report.pods {
        if pod.status == "repaired" {
            summary
                .repaired
                .push(format!("{}/{}", pod.namespace, pod.name));
        }
        if FINE.contains(&pod.status.as_str()) {
            continue;
        }
        // A label value from our own table only, whatever the child printed.
        let kind = ATTENTION
            .into_iter()
            .find(|k| *k == pod.status)
            .unwrap_or("unknown");
        *summary.attention.entry(kind).or_default() += 1;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("testdata/audit")
                .join(name),
        )
        .unwrap()
    }

    #[test]
    fn a_repair_report_is_counted_by_status() {
        let summary = summarize(&fixture("repair.json")).unwrap();
        assert_eq!(summary.pods, 6);
        assert_eq!(summary.repaired, ["shop/cart", "shop/web"]);
        assert_eq!(
            summary.attention,
            BTreeMap::from([("unexpected", 1), ("unknown", 1), ("unproven", 1)])
        );
        assert_eq!(summary.result(), metrics::Audit::Attention);
        assert_eq!(
            summary.describe(),
            "audit: 6 pods, need attention: 1 unexpected, 1 unknown, 1 unproven \
             (`intercept-cni audit` lists them)"
        );
    }

    #[test]
    fn clean_and_unchained_reports() {
        let clean = summarize(br#"{"network":"10-k8s.conflist","chained":true,"repair":true,"pods":[{"id":"a","namespace":"n","name":"p","netns":null,"status":"intercepted","detail":""}]}"#).unwrap();
        assert_eq!(clean.result(), metrics::Audit::Clean);
        assert!(clean.repaired.is_empty());
        let unchained =
            summarize(br#"{"network":"","chained":false,"repair":true,"pods":[]}"#).unwrap();
        assert_eq!(unchained.result(), metrics::Audit::NotChained);
    }

    #[test]
    fn a_report_that_is_not_one_is_an_error() {
        for bad in [
            &b""[..],
            b"network 10-k8s.conflist\n",
            b"{\"pods\":[]}",
            b"[]",
        ] {
            assert!(summarize(bad).is_err(), "{bad:?}");
        }
    }
}
