//! The first-run check: once per boot and backend selection, the verdict is computed under a
//! lock and cached in the state dir, so the many ADDs of a node start pay for one check and
//! every later ADD reads one small file.
//!
//! Readers never see a partial file (temp file + rename), never follow a symlink planted at the
//! cache path, and a failed verdict is re-checked after `FAILED_VERDICT_TTL`, so an operator's
//! `modprobe` takes effect without a reboot.

use super::{assess_at, backend_name, HostRoot};
use crate::backend::BackendKind;
use crate::cni::error::{Code, Error, Result};
use nix::fcntl::{Flock, FlockArg, OFlag};
use serde::{Deserialize, Serialize};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

/// What ADD does when the host lacks something (config `hostPrerequisites`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Fail ADD with code 101, listing each missing module and its remedy.
    #[default]
    Enforce,
    /// Log a warning and go on.
    Warn,
    /// Do not check at all.
    Skip,
}

impl FromStr for Policy {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "enforce" => Ok(Policy::Enforce),
            "warn" => Ok(Policy::Warn),
            "skip" => Ok(Policy::Skip),
            other => Err(Error::config(format!(
                "hostPrerequisites must be \"enforce\", \"warn\" or \"skip\", not {other:?}"
            ))),
        }
    }
}

/// A failed verdict is trusted this long, enough to cover a node start's burst of ADDs.
const FAILED_VERDICT_TTL: Duration = Duration::from_secs(30);

/// A verdict file is a few hundred bytes; anything bigger is not ours.
const MAX_VERDICT_BYTES: u64 = 1 << 20;

const LOCK_FILE: &str = "host-check.lock";

/// The cached outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Verdict {
    pub boot_id: String,
    pub backend: String,
    pub ipv6: bool,
    pub kernel_release: String,
    pub ok: bool,
    pub problems: Vec<String>,
}

/// Runs the host check once per boot (per backend and family) and applies `policy` to it.
pub fn first_run(kind: BackendKind, ipv6: bool, state_dir: &Path, policy: Policy) -> Result<()> {
    if policy == Policy::Skip {
        return Ok(());
    }
    let (verdict, _) = verdict_at(&HostRoot::real(), kind, ipv6, state_dir, true)?;
    apply(policy, &verdict)
}

fn apply(policy: Policy, verdict: &Verdict) -> Result<()> {
    if verdict.ok || policy == Policy::Skip {
        return Ok(());
    }
    let msg = format!(
        "host prerequisites for the {} backend are not met: {}",
        verdict.backend,
        verdict.problems.join(" ")
    );
    if policy == Policy::Warn {
        log::warn!("{msg}");
        return Ok(());
    }
    Err(
        Error::new(Code::HostPrerequisites, msg).with_details(format!(
            "run `intercept-cni doctor --backend {}` on the node for the full table, or set \
         \"hostPrerequisites\": \"warn\" to go on regardless",
            verdict
                .backend
                .replace("iptables-", "iptables --iptables-mode ")
        )),
    )
}

/// The verdict for this boot, and whether this call computed and wrote it.
pub(crate) fn verdict_at(
    root: &HostRoot,
    kind: BackendKind,
    ipv6: bool,
    state_dir: &Path,
    probe: bool,
) -> Result<(Verdict, bool)> {
    let compute = |boot_id: &str| {
        let report = assess_at(root, kind, ipv6, probe);
        Verdict {
            boot_id: boot_id.to_string(),
            backend: report.backend,
            ipv6,
            kernel_release: report.kernel_release,
            ok: report.ok,
            problems: report.problems,
        }
    };
    let boot_id = fs::read_to_string(root.join("/proc/sys/kernel/random/boot_id"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if boot_id.is_empty() {
        log::warn!("no boot id in /proc/sys/kernel/random/boot_id: host check not cached");
        return Ok((compute(""), false));
    }
    let family = if ipv6 { "dual" } else { "ipv4" };
    let path = state_dir.join(format!("host-{}-{family}.json", backend_name(kind)));
    let wanted = |v: &Verdict| v.backend == backend_name(kind) && v.ipv6 == ipv6;
    if let Some(v) = read_current(&path, &boot_id).filter(wanted) {
        return Ok((v, false));
    }
    prepare_dir(state_dir)?;
    let lock_path = state_dir.join(LOCK_FILE);
    let lock_file = open_nofollow(&lock_path, true)
        .map_err(|e| Error::io(format!("cannot open {}", lock_path.display()), e))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io(format!("cannot lock {}", lock_path.display()), e))?;
    // Another ADD may have finished the check while this one waited for the lock.
    if let Some(v) = read_current(&path, &boot_id).filter(wanted) {
        return Ok((v, false));
    }
    let verdict = compute(&boot_id);
    let bytes = serde_json::to_vec(&verdict)
        .map_err(|e| Error::io("cannot encode the host check verdict", e))?;
    write_atomically(&path, &bytes)?;
    Ok((verdict, true))
}

/// The cached verdict when it belongs to this boot and is still trusted; `None` otherwise
/// (absent, foreign, unreadable, a symlink, or a failure older than the TTL).
fn read_current(path: &Path, boot_id: &str) -> Option<Verdict> {
    let file = open_nofollow(path, false).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut text = Vec::new();
    file.take(MAX_VERDICT_BYTES).read_to_end(&mut text).ok()?;
    let verdict: Verdict = serde_json::from_slice(&text).ok()?;
    if verdict.boot_id != boot_id {
        return None;
    }
    if !verdict.ok {
        let age = meta
            .modified()
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())?;
        if age > FAILED_VERDICT_TTL {
            return None;
        }
    }
    Some(verdict)
}

/// Creates the state dir 0700 when absent; refuses a symlink in its place.
fn prepare_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("cannot create state dir {}", dir.display()), e))?;
    let meta = fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format!("cannot stat state dir {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            format!("state dir {}", dir.display()),
            "is not a directory (a symlink is refused)",
        ));
    }
    Ok(())
}

/// Opens `path` read-only, or read-write and created 0600 when `create`; never via a symlink.
fn open_nofollow(path: &Path, create: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .mode(0o600)
        .open(path)
}

/// Writes `bytes` to a fresh temp file (0600, never through a symlink) and renames it over
/// `path`, so a reader sees the old file, no file, or the whole new one. Callers hold the lock.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.set_extension("json.tmp");
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            return Err(Error::io(format!("cannot remove {}", tmp.display()), e))
        }
        _ => {}
    }
    let io = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", tmp.display()), e);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("cannot create", e))?;
    file.write_all(bytes).map_err(|e| io("cannot write", e))?;
    file.sync_all().map_err(|e| io("cannot sync", e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(format!("cannot rename to {}", path.display()), e))
}
