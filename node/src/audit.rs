//! `intercept-cni audit`: every pod sandbox of the node, decided with the plugin's own ADD
//! policy, compared with what its netns holds (the plugin's CHECK), and with `--repair` brought
//! in line with the plugin's own ADD, in place. Pods intercepted against the policy are only
//! reported: removing a running proxy's redirection would cut its traffic.

use crate::cri::Sandbox;
use crate::invocation::{self, ChainedEntry};
use crate::proof;
use intercept_cni::cmd::{self, Trace};
use intercept_cni::cni::env::Command;
use intercept_cni::cni::error::Code;
use serde::Serialize;
use std::path::PathBuf;

/// Where one pod stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Should be intercepted and is, as ADD would install it.
    Intercepted,
    /// Not selected by the policy, and nothing of ours in its netns.
    NotSelected,
    /// Should be intercepted; nothing of ours in its netns.
    Missing,
    /// Should be intercepted; our rules differ from the plan.
    Drifted,
    /// Was missing or drifted; `--repair` installed the plan and CHECK now passes.
    Repaired,
    /// `--repair` was asked and failed.
    RepairFailed,
    /// Our rules are there although the policy leaves the pod alone (reported only).
    Unexpected,
    /// ADD would refuse this pod (e.g. invalid annotations).
    Refused,
    /// Host network, or no netns reported: nothing to audit.
    Skipped,
    /// The runtime's netns path cannot be proven the pod's: never entered.
    Unproven,
    /// The pod netns could not be read (CHECK or the look for our rules failed otherwise).
    CheckFailed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Intercepted => "intercepted",
            Status::NotSelected => "not-selected",
            Status::Missing => "missing",
            Status::Drifted => "drifted",
            Status::Repaired => "repaired",
            Status::RepairFailed => "repair-failed",
            Status::Unexpected => "unexpected",
            Status::Refused => "refused",
            Status::Skipped => "skipped",
            Status::Unproven => "unproven",
            Status::CheckFailed => "check-failed",
        }
    }

    /// Whether this pod needs the operator's attention.
    pub fn is_finding(self) -> bool {
        !matches!(
            self,
            Status::Intercepted | Status::NotSelected | Status::Repaired | Status::Skipped
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PodReport {
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub netns: Option<PathBuf>,
    pub status: Status,
    /// What decided it: the policy's reason, the drift, or why the pod was skipped.
    pub detail: String,
}

pub struct Options {
    pub repair: bool,
    pub netns_dirs: Vec<PathBuf>,
}

/// Audits one pod against `chained` (our entry in the active network).
pub fn pod(chained: &ChainedEntry, sandbox: &Sandbox, options: &Options) -> PodReport {
    let (status, detail) = match sandbox.netns.as_deref() {
        _ if sandbox.host_network => (Status::Skipped, "host network: no CNI call".to_string()),
        None => (
            Status::Skipped,
            "the runtime reports no network namespace".to_string(),
        ),
        Some(netns) => match proof::prove(netns, sandbox.pid, &options.netns_dirs) {
            Err(why) => (
                Status::Unproven,
                format!("netns not proven the pod's: {why}"),
            ),
            Ok(()) => audit_netns(chained, sandbox, netns, options.repair),
        },
    };
    PodReport {
        id: sandbox.id.clone(),
        namespace: sandbox.namespace.clone(),
        name: sandbox.name.clone(),
        netns: sandbox.netns.clone(),
        status,
        detail,
    }
}

fn audit_netns(
    chained: &ChainedEntry,
    sandbox: &Sandbox,
    netns: &std::path::Path,
    repair: bool,
) -> (Status, String) {
    let invocation = |command| invocation::for_pod(command, chained, sandbox, netns);
    let (env, stdin) = match invocation(Command::Add) {
        Ok(i) => i,
        Err(e) => return (Status::Refused, e.msg),
    };
    let mut trace = Trace::default();
    let (conf, plan) = match cmd::decide(&env, &stdin, &mut trace) {
        Ok(decided) => decided,
        Err(e) => {
            return (
                Status::Refused,
                format!("ADD would fail with code {}: {}", e.code as u32, e.msg),
            )
        }
    };
    let reason = trace.policy.unwrap_or_default();
    if plan.is_none() {
        return match cmd::installed(&env, &conf) {
            Ok(false) => (Status::NotSelected, reason),
            Ok(true) => (
                Status::Unexpected,
                format!("rules present although {reason} (left alone)"),
            ),
            Err(e) => (Status::CheckFailed, e.msg),
        };
    }
    let check = |trace: &mut Trace| {
        let (env, stdin) = invocation(Command::Check)?;
        cmd::execute(&env, &stdin, trace)
    };
    let found = match check(&mut Trace::default()) {
        Ok(_) => return (Status::Intercepted, reason),
        Err(e) if e.code == Code::Drift => match cmd::installed(&env, &conf) {
            Ok(false) => (
                Status::Missing,
                format!("{reason}; no rules in the pod netns"),
            ),
            _ => (Status::Drifted, format!("{reason}; {}", e.msg)),
        },
        Err(e) => return (Status::CheckFailed, format!("CHECK failed: {}", e.msg)),
    };
    if !repair {
        return found;
    }
    let repaired = cmd::execute(&env, &stdin, &mut Trace::default())
        .and_then(|_| check(&mut Trace::default()));
    match repaired {
        Ok(_) => (
            Status::Repaired,
            format!("{reason}; was {}, installed in place", found.0.as_str()),
        ),
        Err(e) => (Status::RepairFailed, format!("{reason}; {}", e.msg)),
    }
}

/// The text report: one line per pod, then a summary line.
pub fn text(network: &str, reports: &[PodReport]) -> String {
    let mut out = format!("network {network}\n");
    for r in reports {
        out.push_str(&format!(
            "{:<13} {}/{} sandbox={} {}\n",
            r.status.as_str(),
            r.namespace,
            r.name,
            short(&r.id),
            r.detail
        ));
    }
    let findings = reports.iter().filter(|r| r.status.is_finding()).count();
    out.push_str(&format!(
        "{} pods, {findings} need attention\n",
        reports.len()
    ));
    out
}

fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}

#[cfg(test)]
mod tests {
    use super::Status::*;

    /// The agent counts the statuses of `--json` by name: its list of findings must be this one.
    #[test]
    fn the_agent_counts_exactly_the_findings() {
        let all = [
            Intercepted,
            NotSelected,
            Missing,
            Drifted,
            Repaired,
            RepairFailed,
            Unexpected,
            Refused,
            Skipped,
            Unproven,
            CheckFailed,
        ];
        for status in all {
            // A new status fails to compile here until it is added to `all`.
            match status {
                Intercepted | NotSelected | Missing | Drifted | Repaired | RepairFailed
                | Unexpected | Refused | Skipped | Unproven | CheckFailed => {}
            }
            assert_eq!(
                intercept_cni::agent::repair::ATTENTION.contains(&status.as_str()),
                status.is_finding(),
                "{status:?}"
            );
        }
        let findings = all.iter().filter(|s| s.is_finding()).count();
        assert_eq!(findings, intercept_cni::agent::repair::ATTENTION.len());
    }
}
