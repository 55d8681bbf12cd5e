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
use crate::trusted_path;
use nix::fcntl::{Flock, FlockArg, OFlag};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
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

/// The agent's events socket where an earlier agent kept it, in the default state dir (it now
/// lives apart, see `agent::events::DEFAULT_SOCKET`).
const EVENTS_SOCKET: &str = "events.sock";

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
    /// Advice beside the problems (absent from verdicts cached by older versions).
    #[serde(default)]
    pub tips: Vec<String>,
}

/// Runs the host check once per boot (per backend and family) and applies `policy` to it.
pub fn first_run(kind: BackendKind, ipv6: bool, state_dir: &Path, policy: Policy) -> Result<()> {
    if policy == Policy::Skip {
        return Ok(());
    }
    let (verdict, _) = verdict_at(&HostRoot::real(), kind, ipv6, state_dir, true)?;
    apply(policy, &verdict)
}

/// Whether `kind` can work on this host, from the once-per-boot verdict (for `auto` choices).
/// An error only when `state_dir` is refused: a cache that cannot be written changes no verdict.
pub fn usable(kind: BackendKind, ipv6: bool, state_dir: &Path) -> Result<bool> {
    cached_verdict(kind, ipv6, state_dir).map(|verdict| verdict.ok)
}

/// This boot's verdict for `kind`, computed once and cached.
pub(crate) fn cached_verdict(kind: BackendKind, ipv6: bool, state_dir: &Path) -> Result<Verdict> {
    verdict_at(&HostRoot::real(), kind, ipv6, state_dir, true).map(|(v, _)| v)
}

fn apply(policy: Policy, verdict: &Verdict) -> Result<()> {
    if verdict.ok || policy == Policy::Skip {
        return Ok(());
    }
    let msg = format!(
        "host prerequisites for the {} backend are not met: {}",
        verdict.backend,
        [&verdict.problems[..], &verdict.tips[..]]
            .concat()
            .join(" ")
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
            tips: report.tips,
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
    // A refused directory fails the call (nothing is written there); one that cannot be
    // written only costs the cache: the verdict is the same either way.
    let uncached = |e: Error| {
        log::warn!("host check not cached in {}: {e}", state_dir.display());
        Ok((compute(&boot_id), false))
    };
    // 0700, ours, and reached only through root-owned paths: see `trusted_path`.
    match trusted_path::private_dir(state_dir, is_our_entry) {
        Ok(()) => {}
        Err(e) if e.code == Code::Io => return uncached(e),
        Err(e) => return Err(e),
    }
    let lock_path = state_dir.join(LOCK_FILE);
    let lock_file = match open_nofollow(&lock_path, true) {
        Ok(file) => file,
        Err(e) => return uncached(Error::io(format!("cannot open {}", lock_path.display()), e)),
    };
    let _lock = match Flock::lock(lock_file, FlockArg::LockExclusive) {
        Ok(lock) => lock,
        Err((_, e)) => {
            return uncached(Error::io(format!("cannot lock {}", lock_path.display()), e))
        }
    };
    // Another ADD may have finished the check while this one waited for the lock.
    if let Some(v) = read_current(&path, &boot_id).filter(wanted) {
        return Ok((v, false));
    }
    let verdict = compute(&boot_id);
    let written = serde_json::to_vec(&verdict)
        .map_err(|e| Error::io("cannot encode the host check verdict", e))
        .and_then(|bytes| write_atomically(&path, &bytes));
    match written {
        Ok(()) => Ok((verdict, true)),
        Err(e) => {
            log::warn!("host check not cached in {}: {e}", state_dir.display());
            Ok((verdict, false))
        }
    }
}

/// Names the plugin, and its agent, create in a state dir (the default one also holds the
/// agent's events socket and the iptables backend's lock files).
pub fn is_our_entry(name: &str) -> bool {
    let stem = name.strip_suffix(".tmp").unwrap_or(name);
    name == LOCK_FILE
        || name == EVENTS_SOCKET
        || (stem.starts_with("host-") && stem.ends_with(".json"))
        || crate::backend::iptables::is_lock_file_name(name)
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

/// Opens `path` read-only, or read-write and created 0600 when `create`; never via a symlink,
/// and without blocking on a FIFO (which is then no verdict, or no lock).
fn open_nofollow(path: &Path, create: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).bits())
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
    let written = file
        .write_all(bytes)
        .map_err(|e| io("cannot write", e))
        .and_then(|()| file.sync_all().map_err(|e| io("cannot sync", e)))
        .and_then(|()| {
            fs::rename(&tmp, path)
                .map_err(|e| Error::io(format!("cannot rename to {}", path.display()), e))
        });
    if written.is_err() {
        // A full or failing disk leaves no partial temp file behind.
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::IptablesMode;
    use crate::host::tests::{fixture, private_tempdir};
    use std::os::unix::fs::{symlink, DirBuilderExt, MetadataExt};
    use std::sync::{Arc, Barrier};

    const LEGACY: BackendKind = BackendKind::Iptables(IptablesMode::Legacy);
    const RHEL9_BOOT: &str = "3f1c2a9e-5b7d-4e0a-9c61-2d8e4b7a1f30";

    fn cache_file(dir: &Path) -> PathBuf {
        dir.join("host-iptables-legacy-ipv4.json")
    }

    #[test]
    fn fifty_concurrent_first_runs_check_once_and_agree() {
        let state = private_tempdir();
        let dir = state.path().join("run/intercept-cni");
        let barrier = Arc::new(Barrier::new(50));
        let results: Vec<(Verdict, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..50)
                .map(|_| {
                    let barrier = Arc::clone(&barrier);
                    let dir = dir.clone();
                    s.spawn(move || {
                        barrier.wait();
                        verdict_at(&fixture("rhel9-nft"), LEGACY, false, &dir, false).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|(_, wrote)| *wrote).count(), 1);
        let first = &results[0].0;
        assert!(results.iter().all(|(v, _)| v == first));
        assert!(!first.ok && first.boot_id == RHEL9_BOOT);
        assert!(first
            .problems
            .iter()
            .any(|p| p.starts_with("ip_tables is missing")));
        // The directory is private and the verdict readable by root only.
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            fs::metadata(cache_file(&dir)).unwrap().mode() & 0o777,
            0o600
        );
        let on_disk: Verdict =
            serde_json::from_slice(&fs::read(cache_file(&dir)).unwrap()).unwrap();
        assert_eq!(&on_disk, first);
        assert!(!dir.join("host-iptables-legacy-ipv4.json.tmp").exists());
    }

    #[test]
    fn a_current_verdict_is_used_as_is_without_checking_again() {
        let dir = private_tempdir();
        // The fixture fails the legacy check; a cached pass for this boot must win.
        let cached = Verdict {
            boot_id: RHEL9_BOOT.into(),
            backend: "iptables-legacy".into(),
            ipv6: false,
            kernel_release: "cached".into(),
            ok: true,
            problems: vec![],
            tips: vec![],
        };
        fs::write(cache_file(dir.path()), serde_json::to_vec(&cached).unwrap()).unwrap();
        let (v, wrote) =
            verdict_at(&fixture("rhel9-nft"), LEGACY, false, dir.path(), false).unwrap();
        assert_eq!((v, wrote), (cached, false));
    }

    #[test]
    fn another_boot_or_family_or_an_old_failure_is_checked_again() {
        let dir = private_tempdir();
        let root = fixture("rhel9-nft");
        let stale = Verdict {
            boot_id: "an-earlier-boot".into(),
            backend: "iptables-legacy".into(),
            ipv6: false,
            kernel_release: "old".into(),
            ok: true,
            problems: vec![],
            tips: vec![],
        };
        fs::write(cache_file(dir.path()), serde_json::to_vec(&stale).unwrap()).unwrap();
        let (v, wrote) = verdict_at(&root, LEGACY, false, dir.path(), false).unwrap();
        assert!(wrote && !v.ok && v.boot_id == RHEL9_BOOT);

        // A failure is trusted for the TTL only, so a `modprobe` can take effect.
        let (_, wrote) = verdict_at(&root, LEGACY, false, dir.path(), false).unwrap();
        assert!(!wrote);
        let file = File::options()
            .write(true)
            .open(cache_file(dir.path()))
            .unwrap();
        file.set_modified(SystemTime::now() - FAILED_VERDICT_TTL - Duration::from_secs(1))
            .unwrap();
        let (_, wrote) = verdict_at(&root, LEGACY, false, dir.path(), false).unwrap();
        assert!(wrote);

        // Each backend and family has its own verdict.
        let (v, wrote) = verdict_at(&root, LEGACY, true, dir.path(), false).unwrap();
        assert!(wrote && v.ipv6);
        assert!(dir.path().join("host-iptables-legacy-dual.json").is_file());
    }

    #[test]
    fn a_symlink_at_the_cache_path_is_replaced_never_followed() {
        let dir = private_tempdir();
        let victim = dir.path().join("victim");
        fs::write(&victim, "keep me").unwrap();
        let forged = Verdict {
            boot_id: RHEL9_BOOT.into(),
            backend: "iptables-legacy".into(),
            ipv6: false,
            kernel_release: "forged".into(),
            ok: true,
            problems: vec![],
            tips: vec![],
        };
        fs::write(
            dir.path().join("forged"),
            serde_json::to_vec(&forged).unwrap(),
        )
        .unwrap();
        let state = dir.path().join("state");
        fs::DirBuilder::new().mode(0o700).create(&state).unwrap();
        symlink(dir.path().join("forged"), cache_file(&state)).unwrap();
        symlink(&victim, state.join("host-iptables-legacy-ipv4.json.tmp")).unwrap();
        let (v, wrote) = verdict_at(&fixture("rhel9-nft"), LEGACY, false, &state, false).unwrap();
        assert!(wrote && !v.ok, "the symlinked verdict was read");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep me");
        assert!(fs::symlink_metadata(cache_file(&state)).unwrap().is_file());
    }

    #[test]
    fn a_symlinked_state_dir_is_refused() {
        let dir = private_tempdir();
        fs::create_dir(dir.path().join("elsewhere")).unwrap();
        let state = dir.path().join("state");
        symlink(dir.path().join("elsewhere"), &state).unwrap();
        let e = verdict_at(&fixture("rhel9-nft"), LEGACY, false, &state, false).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.msg.contains("symlink"), "{e}");
    }

    #[test]
    fn policy_decides_what_a_failed_verdict_does() {
        let dir = private_tempdir();
        let (failed, _) =
            verdict_at(&fixture("missing-extra"), LEGACY, false, dir.path(), false).unwrap();
        let e = apply(Policy::Enforce, &failed).unwrap_err();
        assert_eq!(e.code, Code::HostPrerequisites);
        assert_eq!(e.code as u32, 101);
        for needle in [
            "xt_owner is missing",
            "`modprobe xt_owner`",
            "xt_REDIRECT",
            "SELinux",
        ] {
            assert!(e.msg.contains(needle), "{needle} not in {}", e.msg);
        }
        assert!(e
            .details
            .contains("doctor --backend iptables --iptables-mode legacy"));
        assert!(apply(Policy::Warn, &failed).is_ok());
        assert!(apply(Policy::Skip, &failed).is_ok());
        let (passed, _) =
            verdict_at(&fixture("builtin-only"), LEGACY, false, dir.path(), false).unwrap();
        assert!(passed.ok);
        assert!(apply(Policy::Enforce, &passed).is_ok());
    }

    /// The default state dir holds the iptables lock files (and, from an earlier agent, its
    /// events socket), and a directory with only those (and ours) is the plugin's, whatever its
    /// mode.
    #[test]
    fn the_agents_and_backends_files_count_as_ours() {
        let socket = Path::new(crate::agent::events::DEFAULT_SOCKET);
        assert_eq!(socket.file_name(), Some(EVENTS_SOCKET.as_ref()));
        for name in [
            EVENTS_SOCKET,
            LOCK_FILE,
            "host-nftables-dual.json",
            "host-iptables-nft-ipv4.json.tmp",
            "xtables-4026532177.lock",
            "xtables6-4026532177.lock",
        ] {
            assert!(is_our_entry(name), "{name}");
        }
        for name in ["passwd", "host-x", "events.sock.bak", ".hidden"] {
            assert!(!is_our_entry(name), "{name}");
        }
    }

    #[test]
    fn skip_reads_and_writes_nothing() {
        let dir = private_tempdir();
        let state = dir.path().join("never-created");
        first_run(LEGACY, true, &state, Policy::Skip).unwrap();
        assert!(!state.exists());
    }

    #[test]
    fn policy_parses_from_config_words() {
        assert_eq!("enforce".parse::<Policy>().unwrap(), Policy::Enforce);
        assert_eq!("warn".parse::<Policy>().unwrap(), Policy::Warn);
        assert_eq!("skip".parse::<Policy>().unwrap(), Policy::Skip);
        assert_eq!(
            "Enforce".parse::<Policy>().unwrap_err().code,
            Code::InvalidConfig
        );
        assert_eq!(Policy::default(), Policy::Enforce);
        let p: Policy = serde_json::from_str("\"warn\"").unwrap();
        assert_eq!(p, Policy::Warn);
    }
}
