//! The installer's filesystem side: reading the conf dir safely and replacing files so that a
//! runtime never reads a torn file and another agent's concurrent write is never lost.
//!
//! - Reads open regular files only (`lstat`/`stat` first, then `O_NONBLOCK` and an `fstat`
//!   check), so a FIFO or a device named `*.conf` never blocks or floods us, and are capped at
//!   `MAX_CONFIG_BYTES`.
//! - A write goes to a temp file of ours (`.NAME.PID.intercept-cni-tmp`, flock'ed while it
//!   exists), then replaces the target only if the target is still what the plan was made
//!   from: checked just before, and made exact by `renameat2(RENAME_EXCHANGE)`, which leaves the
//!   displaced file under the temp name, so a write that slipped in between is put back instead
//!   of being lost.
//! - Temp files of killed runs (any PID) are swept: regular files of our name pattern, owned by
//!   us, that no live writer holds locked.

use super::conflist::{ConfFile, FileKind};
use crate::cni::error::{Error, Result};
use crate::rename::{self, renameat2};
use nix::errno::Errno;
use nix::libc;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of a file we create from nothing (a conflist made from a `.conf` keeps the `.conf`'s).
pub const NEW_CONFIG_MODE: u32 = 0o644;
pub const BINARY_MODE: u32 = 0o755;
/// A network config or plugin config larger than this is not read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Our plugin binary is a few MiB; a larger file in its place is not read to compare.
const MAX_BINARY_BYTES: u64 = 256 << 20;
const TEMP_SUFFIX: &str = ".intercept-cni-tmp";

/// Reads the regular file at `path` (through a symlink when `follow`), at most `cap` bytes.
/// A non-regular file is never opened for reading content.
pub fn read_capped(
    path: &Path,
    follow: bool,
    cap: u64,
) -> std::io::Result<(Vec<u8>, fs::Metadata)> {
    let meta = if follow {
        fs::metadata(path)?
    } else {
        fs::symlink_metadata(path)?
    };
    check_regular(&meta)?;
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)?;
    let meta = file.metadata()?;
    check_regular(&meta)?;
    if meta.len() > cap {
        return Err(too_large(cap));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(too_large(cap));
    }
    Ok((bytes, meta))
}

fn check_regular(meta: &fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let kind = if t.is_file() {
        return Ok(());
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    };
    Err(std::io::Error::new(
        ErrorKind::InvalidData,
        format!("not a regular file ({kind})"),
    ))
}

fn too_large(cap: u64) -> std::io::Error {
    std::io::Error::new(
        ErrorKind::InvalidData,
        format!("larger than {cap} bytes, not read"),
    )
}

/// Every file of `dir` whose name a runtime reads as a network config. A file that vanishes,
/// is not a regular file (even through a symlink) or is too large is left out and reported.
pub fn read_conf_dir(dir: &Path) -> Result<Vec<ConfFile>> {
    let entries =
        fs::read_dir(dir).map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("cannot list {}", dir.display()), e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if FileKind::of(&name).is_none() {
            continue;
        }
        let path = entry.path();
        let symlink = fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
        match read_capped(&path, symlink, MAX_CONFIG_BYTES) {
            Ok((bytes, meta)) => files.push(ConfFile {
                name,
                bytes,
                // A hard link is another name for the owner's file: replacing ours by rename
                // would cut it off from the owner's later edits, as with a symlink.
                symlink: symlink || meta.nlink() > 1,
                identity: (meta.dev(), meta.ino()),
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => log::warn!("skipping {}: {e}", path.display()),
        }
    }
    files.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    Ok(files)
}

/// Permission bits of `path` (not following a symlink), `None` if it does not exist.
pub fn mode_of(path: &Path) -> Result<Option<u32>> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(Some(meta.permissions().mode() & 0o7777)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("cannot stat {}", path.display()), e)),
    }
}

/// Whether a replacement took place, or the target changed under us (nothing lost; plan again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    Written,
    Conflict,
}

/// A temp file of ours beside the target, locked while it exists so that no sweep takes it.
struct Temp {
    path: PathBuf,
    file: File,
}

/// A name of ours beside `name` that nobody holds: `.NAME.PID-N.intercept-cni-tmp`. The PID
/// alone is not unique: installers in two pods are both PID 1 in their own PID namespaces.
fn temp_name(dir: &Path, name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if NEXT.load(Ordering::Relaxed) == 0 {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 | 1);
        let _ = NEXT.compare_exchange(0, seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 1_000_000_000_000;
    dir.join(format!(".{name}.{}-{n}{TEMP_SUFFIX}", std::process::id()))
}

impl Temp {
    fn create(dir: &Path, name: &str, content: &[u8], mode: u32) -> std::io::Result<Temp> {
        // Dot-prefixed and without a config extension: no runtime ever reads it as a network.
        let (path, mut file) = loop {
            let path = temp_name(dir, name);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let temp = Temp {
            path,
            file: file.try_clone()?,
        };
        lock(&temp.file, false)?;
        file.write_all(content)?;
        // The umask applied at open may have cleared bits of `mode`.
        file.set_permissions(Permissions::from_mode(mode))?;
        file.sync_all()?;
        Ok(temp)
    }

    fn ino(&self) -> std::io::Result<u64> {
        self.file.metadata().map(|m| m.ino())
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        // Only while the name still holds our own file (a conflict may have put back another's).
        let ours = self.ino().ok();
        if fs::symlink_metadata(&self.path).is_ok_and(|m| Some(m.ino()) == ours) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn lock(file: &File, nonblocking: bool) -> std::io::Result<()> {
    let mut op = libc::LOCK_EX;
    if nonblocking {
        op |= libc::LOCK_NB;
    }
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// True when `path` still holds exactly `expected`: the same regular file, same bytes.
fn holds(path: &Path, expected: &ConfFile) -> bool {
    match read_capped(path, false, MAX_CONFIG_BYTES) {
        Ok((bytes, meta)) => {
            (meta.dev(), meta.ino()) == expected.identity && bytes == expected.bytes
        }
        Err(_) => false,
    }
}

/// Replaces `dir/name` by `content` with permission bits `mode`, provided it still holds
/// `expected` (`None`: provided it does not exist). On `Conflict` and on error the target is
/// as the other writer left it and no temp file of ours remains.
pub fn commit(
    dir: &Path,
    name: &str,
    expected: Option<&ConfFile>,
    content: &[u8],
    mode: u32,
) -> Result<Commit> {
    let target = dir.join(name);
    let failed = |e: std::io::Error| Error::io(format!("cannot write {}", target.display()), e);
    let temp = Temp::create(dir, name, content, mode).map_err(failed)?;
    let Some(expected) = expected else {
        return match renameat2(&temp.path, &target, rename::NOREPLACE) {
            Ok(()) => sync_dir(dir).map(|()| Commit::Written),
            Err(Errno::EEXIST) => Ok(Commit::Conflict),
            Err(e) => Err(failed(e.into())),
        };
    };
    if !holds(&target, expected) {
        return Ok(Commit::Conflict);
    }
    match renameat2(&temp.path, &target, rename::EXCHANGE) {
        Ok(()) => {}
        // A filesystem without exchange: the check just above is all we have.
        Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
            fs::rename(&temp.path, &target).map_err(failed)?;
            return sync_dir(dir).map(|()| Commit::Written);
        }
        Err(e) => return Err(failed(e.into())),
    }
    // The temp name now holds what the target held an instant ago.
    if holds(&temp.path, expected) {
        let _ = fs::remove_file(&temp.path);
        return sync_dir(dir).map(|()| Commit::Written);
    }
    // Another agent wrote in between: its file goes back, ours is dropped.
    put_back(&temp, &target).map_err(failed)?;
    sync_dir(dir).map(|()| Commit::Conflict)
}

/// Exchanges the displaced file at `temp.path` back to `target`. If yet another write landed at
/// the target meanwhile, that newer one ends up at the target (its writer's latest word).
fn put_back(temp: &Temp, target: &Path) -> std::io::Result<()> {
    let ours = temp.ino()?;
    renameat2(&temp.path, target, rename::EXCHANGE)?;
    let at_temp = fs::symlink_metadata(&temp.path)?.ino();
    if at_temp != ours {
        renameat2(&temp.path, target, rename::EXCHANGE)?;
        fs::remove_file(&temp.path)?;
    }
    Ok(())
}

/// Removes `dir/name` if it still holds `expected`: it is first moved aside under a temp name
/// of ours and checked there; a file that changed in between goes back unless a newer one took
/// its name. Returns whether it removed.
pub fn remove_unchanged(dir: &Path, expected: &ConfFile) -> Result<bool> {
    let target = dir.join(&expected.name);
    let failed = |e: std::io::Error| Error::io(format!("cannot remove {}", target.display()), e);
    if !holds(&target, expected) {
        return Ok(false);
    }
    let aside = temp_name(dir, &expected.name);
    match fs::rename(&target, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(failed(e)),
    }
    if holds(&aside, expected) {
        fs::remove_file(&aside).map_err(failed)?;
        return sync_dir(dir).map(|()| true);
    }
    match renameat2(&aside, &target, rename::NOREPLACE) {
        Ok(()) => {}
        Err(Errno::EEXIST) => fs::remove_file(&aside).map_err(failed)?,
        Err(e) => return Err(failed(e.into())),
    }
    sync_dir(dir).map(|()| false)
}

/// Removes `dir/name`; a file already gone is fine.
pub fn remove(dir: &Path, name: &str) -> Result<bool> {
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => sync_dir(dir).map(|()| true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format!("cannot remove {}", path.display()), e)),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("cannot sync {}", dir.display()), e))
}

/// Whether `file_name` is one of our temp names: `.NAME.PID.intercept-cni-tmp` or
/// `.NAME.PID-N.intercept-cni-tmp`.
fn is_temp_name(file_name: &str) -> bool {
    let Some(rest) = file_name
        .strip_prefix('.')
        .and_then(|r| r.strip_suffix(TEMP_SUFFIX))
    else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    rest.rsplit_once('.').is_some_and(|(name, id)| {
        !name.is_empty()
            && match id.split_once('-') {
                Some((pid, n)) => digits(pid) && digits(n),
                None => digits(id),
            }
    })
}

/// Removes temp files left by killed runs of any installer, and the locks of watchers that are
/// gone: our name patterns, a regular file owned by our user, not locked by a live process.
/// Returns how many it removed.
pub fn sweep_temps(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let euid = nix::unistd::geteuid().as_raw();
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let lock_file = name.starts_with(LOCK_PREFIX) && name.ends_with(".lock");
        if !is_temp_name(&name) && !lock_file {
            continue;
        }
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if !meta.file_type().is_file() || meta.uid() != euid {
            continue;
        }
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        else {
            continue;
        };
        let same = file
            .metadata()
            .is_ok_and(|m| m.ino() == meta.ino() && m.is_file());
        if same && lock(&file, true).is_ok() && fs::remove_file(&path).is_ok() {
            log::info!("removed {}, left by a run that is gone", path.display());
            removed += 1;
        }
    }
    removed
}

/// The lock a running watcher holds for its stamp, so that others can tell a live installer's
/// entry from one left by an installer that is gone (`LOCK_PREFIX.GENERATION.STARTED.lock`).
pub fn lock_path(dir: &Path, generation: u64, started: u64) -> PathBuf {
    dir.join(format!("{LOCK_PREFIX}.{generation}.{started}.lock"))
}

const LOCK_PREFIX: &str = ".intercept-cni-installer";

/// Creates and locks `path` for as long as the returned file is open.
pub fn hold_lock(path: &Path) -> Result<File> {
    let failed = |e: std::io::Error| Error::io(format!("cannot lock {}", path.display()), e);
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(failed)?;
        lock(&file, false).map_err(failed)?;
        // A sweep may have removed the name between create and lock: lock a file that has it.
        let ino = file.metadata().map_err(failed)?.ino();
        if fs::symlink_metadata(path).is_ok_and(|m| m.ino() == ino) {
            return Ok(file);
        }
    }
}

/// Whether a live process holds the lock at `path` (a regular file of ours).
pub fn is_locked(path: &Path) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return false;
    };
    if !meta.file_type().is_file() {
        return false;
    }
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .is_ok_and(|f| {
            // SAFETY: flock on an fd we own.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
        })
}

/// Whether `dir/name` is a regular executable file with exactly the bytes of `source`.
pub fn binary_matches(source: &Path, dir: &Path, name: &str) -> Result<bool> {
    let (content, _) = read_capped(source, true, MAX_BINARY_BYTES)
        .map_err(|e| Error::io(format!("cannot read {}", source.display()), e))?;
    Ok(matches_content(&dir.join(name), &content))
}

fn matches_content(target: &Path, content: &[u8]) -> bool {
    read_capped(target, false, MAX_BINARY_BYTES).is_ok_and(|(bytes, meta)| {
        bytes == content && meta.permissions().mode() & 0o7777 == BINARY_MODE
    })
}

/// Puts a copy of `source` at `dir/name`, executable, unless an identical executable is there.
/// Whatever else holds the name (a symlink, an old version) is replaced by rename. Returns
/// whether it wrote.
pub fn install_binary(source: &Path, dir: &Path, name: &str) -> Result<bool> {
    let (content, _) = read_capped(source, true, MAX_BINARY_BYTES)
        .map_err(|e| Error::io(format!("cannot read {}", source.display()), e))?;
    let target = dir.join(name);
    if matches_content(&target, &content) {
        return Ok(false);
    }
    let temp = Temp::create(dir, name, &content, BINARY_MODE)
        .and_then(|temp| fs::rename(&temp.path, &target).map(|()| temp))
        .map_err(|e| Error::io(format!("cannot write {}", target.display()), e))?;
    drop(temp);
    sync_dir(dir)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn read(dir: &Path, name: &str) -> ConfFile {
        read_conf_dir(dir)
            .unwrap()
            .into_iter()
            .find(|f| f.name == name)
            .unwrap()
    }

    #[test]
    fn commit_keeps_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.conflist"), "old").unwrap();
        let old = read(dir.path(), "a.conflist");
        let done = commit(dir.path(), "a.conflist", Some(&old), b"new", 0o600).unwrap();
        assert_eq!(done, Commit::Written);
        assert_eq!(fs::read(dir.path().join("a.conflist")).unwrap(), b"new");
        assert_eq!(
            mode_of(&dir.path().join("a.conflist")).unwrap(),
            Some(0o600)
        );
        assert_eq!(names(dir.path()), ["a.conflist"]);
        // Creating where a file appeared meanwhile is a conflict, not an overwrite.
        let done = commit(dir.path(), "a.conflist", None, b"x", 0o644).unwrap();
        assert_eq!(done, Commit::Conflict);
        assert_eq!(fs::read(dir.path().join("a.conflist")).unwrap(), b"new");
        assert_eq!(names(dir.path()), ["a.conflist"]);
    }

    #[test]
    fn commit_never_overwrites_a_newer_write() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.conflist"), "old").unwrap();
        let old = read(dir.path(), "a.conflist");
        // Rewritten in place, and replaced by rename, since it was read.
        fs::write(dir.path().join("a.conflist"), "in place").unwrap();
        let done = commit(dir.path(), "a.conflist", Some(&old), b"ours", 0o644).unwrap();
        assert_eq!(done, Commit::Conflict);
        assert_eq!(
            fs::read(dir.path().join("a.conflist")).unwrap(),
            b"in place"
        );
        let old = read(dir.path(), "a.conflist");
        fs::write(dir.path().join("b"), "renamed over").unwrap();
        fs::rename(dir.path().join("b"), dir.path().join("a.conflist")).unwrap();
        let done = commit(dir.path(), "a.conflist", Some(&old), b"ours", 0o644).unwrap();
        assert_eq!(done, Commit::Conflict);
        assert_eq!(
            fs::read(dir.path().join("a.conflist")).unwrap(),
            b"renamed over"
        );
        assert_eq!(names(dir.path()), ["a.conflist"]);
    }

    #[test]
    fn failed_write_leaves_target_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty directory fails after the temp file is written.
        fs::create_dir(dir.path().join("d.conflist")).unwrap();
        fs::write(dir.path().join("d.conflist/keep"), "x").unwrap();
        assert!(install_binary(Path::new("/proc/self/exe"), dir.path(), "d.conflist").is_err());
        assert_eq!(names(dir.path()), ["d.conflist"]);
        assert_eq!(fs::read(dir.path().join("d.conflist/keep")).unwrap(), b"x");
    }

    #[test]
    fn read_conf_dir_lists_regular_config_files_only_sorted() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "b.conf",
            "a.conflist",
            "c.json",
            "notes.txt",
            ".x.conf.1.intercept-cni-tmp",
        ] {
            fs::write(dir.path().join(name), name).unwrap();
        }
        fs::create_dir(dir.path().join("sub.conf")).unwrap();
        nix::unistd::mkfifo(
            &dir.path().join("fifo.conflist"),
            nix::sys::stat::Mode::S_IRWXU,
        )
        .unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("00-zero.conf")).unwrap();
        std::os::unix::fs::symlink("b.conf", dir.path().join("link.conf")).unwrap();
        fs::write(
            dir.path().join("big.conf"),
            vec![b' '; MAX_CONFIG_BYTES as usize + 1],
        )
        .unwrap();
        let files = read_conf_dir(dir.path()).unwrap();
        let listed: Vec<(&str, bool)> =
            files.iter().map(|f| (f.name.as_str(), f.symlink)).collect();
        assert_eq!(
            listed,
            [
                ("a.conflist", false),
                ("b.conf", false),
                ("c.json", false),
                ("link.conf", true)
            ]
        );
        assert_eq!(files[1].bytes, b"b.conf");
        assert_eq!(files[3].bytes, b"b.conf");
    }

    #[test]
    fn temp_names_and_sweep() {
        assert!(is_temp_name(".10-x.conflist.123.intercept-cni-tmp"));
        assert!(is_temp_name(".intercept-cni.9.intercept-cni-tmp"));
        assert!(is_temp_name(".intercept-cni.1-123456.intercept-cni-tmp"));
        assert!(!is_temp_name(".intercept-cni.1-.intercept-cni-tmp"));
        assert!(!is_temp_name(".intercept-cni.-1.intercept-cni-tmp"));
        for bad in [
            "10-x.conflist.123.intercept-cni-tmp",
            ".10-x.conflist.12a.intercept-cni-tmp",
            "..1.intercept-cni-tmp",
            ".10-x.conflist.123.intercept-cni-tmp.bak",
        ] {
            assert!(!is_temp_name(bad), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let stale = ".a.conflist.4000000.intercept-cni-tmp";
        fs::write(dir.path().join(stale), "x").unwrap();
        fs::create_dir(dir.path().join(".d.conflist.1.intercept-cni-tmp")).unwrap();
        std::os::unix::fs::symlink(
            "/etc/hostname",
            dir.path().join(".l.conf.2.intercept-cni-tmp"),
        )
        .unwrap();
        // A live writer's temp file is locked and stays; so is a live watcher's lock.
        let live = Temp::create(dir.path(), "b.conflist", b"y", 0o644).unwrap();
        let held = hold_lock(&lock_path(dir.path(), 1, 2)).unwrap();
        fs::write(lock_path(dir.path(), 3, 4), "").unwrap();
        assert!(is_locked(&lock_path(dir.path(), 1, 2)));
        assert!(!is_locked(&lock_path(dir.path(), 3, 4)));
        assert_eq!(sweep_temps(dir.path()), 2);
        assert!(lock_path(dir.path(), 1, 2).exists());
        fs::remove_file(lock_path(dir.path(), 1, 2)).unwrap();
        drop(held);
        assert!(live.path.exists());
        assert_eq!(
            names(dir.path()),
            [
                live.path.file_name().unwrap().to_str().unwrap().to_owned(),
                ".d.conflist.1.intercept-cni-tmp".into(),
                ".l.conf.2.intercept-cni-tmp".into()
            ]
        );
    }

    #[test]
    fn binary_copy_is_skipped_when_identical() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        fs::write(&source, "binary").unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        assert!(!binary_matches(&source, &bin, "tool").unwrap());
        assert!(install_binary(&source, &bin, "tool").unwrap());
        assert!(binary_matches(&source, &bin, "tool").unwrap());
        assert_eq!(mode_of(&bin.join("tool")).unwrap(), Some(BINARY_MODE));
        assert!(!install_binary(&source, &bin, "tool").unwrap());
        fs::write(&source, "binary v2").unwrap();
        assert!(install_binary(&source, &bin, "tool").unwrap());
        assert_eq!(fs::read(bin.join("tool")).unwrap(), b"binary v2");
        assert_eq!(names(&bin), ["tool"]);
        assert!(remove(&bin, "tool").unwrap());
        assert!(!remove(&bin, "tool").unwrap());
    }
}
