//! The installer's filesystem side: reading the conf dir and replacing files atomically, so a
//! runtime reading concurrently sees the old file or the new one, never a torn one.

use super::conflist::{ConfFile, FileKind};
use crate::cni::error::{Error, Result};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of a file we create from nothing (a conflist made from a `.conf` keeps the `.conf`'s).
pub const NEW_CONFIG_MODE: u32 = 0o644;
pub const BINARY_MODE: u32 = 0o755;

/// Every file of `dir` whose name a runtime reads as a network config. A file that vanishes or
/// cannot be read while listing is left out, as the runtimes would.
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
        // fs::read follows symlinks; a directory fails to read and is skipped.
        match fs::read(entry.path()) {
            Ok(bytes) => files.push(ConfFile { name, bytes }),
            Err(e) => log::warn!("skipping {}: {e}", entry.path().display()),
        }
    }
    files.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    Ok(files)
}

/// Permission bits of `path`, `None` if it does not exist.
pub fn mode_of(path: &Path) -> Result<Option<u32>> {
    match fs::metadata(path) {
        Ok(meta) => Ok(Some(meta.permissions().mode() & 0o7777)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("cannot stat {}", path.display()), e)),
    }
}

/// Replaces `dir/name` by `content` with permission bits `mode`: a temp file in the same dir is
/// written, synced and renamed over the target, then the dir is synced. On any failure the temp
/// file is removed and the target is untouched.
pub fn write_atomic(dir: &Path, name: &str, content: &[u8], mode: u32) -> Result<()> {
    let target = dir.join(name);
    // Dot-prefixed and without a config extension: no runtime ever reads it as a network.
    let temp = dir.join(format!(".{name}.{}.intercept-cni-tmp", std::process::id()));
    let written = write_new_file(&temp, content, mode)
        .and_then(|()| fs::rename(&temp, &target))
        .map_err(|e| Error::io(format!("cannot write {}", target.display()), e));
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written?;
    sync_dir(dir)
}

fn write_new_file(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    if let Err(e) = fs::remove_file(path) {
        // A temp file left by a killed run with our pid: ours to replace.
        if e.kind() != ErrorKind::NotFound {
            return Err(e);
        }
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(content)?;
    // The umask applied at open may have cleared bits of `mode`.
    file.set_permissions(Permissions::from_mode(mode))?;
    file.sync_all()
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

/// Puts a copy of `source` at `dir/name`, executable, unless an identical executable is there.
/// Returns whether it wrote.
pub fn install_binary(source: &Path, dir: &Path, name: &str) -> Result<bool> {
    let content =
        fs::read(source).map_err(|e| Error::io(format!("cannot read {}", source.display()), e))?;
    let target = dir.join(name);
    let current = match fs::read(&target) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(format!("cannot read {}", target.display()), e)),
    };
    if current.as_deref() == Some(&content[..]) && mode_of(&target)? == Some(BINARY_MODE) {
        return Ok(false);
    }
    write_atomic(dir, name, &content, BINARY_MODE)?;
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

    #[test]
    fn write_atomic_keeps_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.conflist"), "old").unwrap();
        write_atomic(dir.path(), "a.conflist", b"new", 0o600).unwrap();
        assert_eq!(fs::read(dir.path().join("a.conflist")).unwrap(), b"new");
        assert_eq!(
            mode_of(&dir.path().join("a.conflist")).unwrap(),
            Some(0o600)
        );
        assert_eq!(names(dir.path()), ["a.conflist"]);
    }

    #[test]
    fn failed_write_leaves_target_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // Renaming a file over a non-empty directory fails after the temp file is written.
        fs::create_dir(dir.path().join("d.conflist")).unwrap();
        fs::write(dir.path().join("d.conflist/keep"), "x").unwrap();
        assert!(write_atomic(dir.path(), "d.conflist", b"new", 0o644).is_err());
        assert_eq!(names(dir.path()), ["d.conflist"]);
        assert_eq!(fs::read(dir.path().join("d.conflist/keep")).unwrap(), b"x");
    }

    #[test]
    fn read_conf_dir_lists_config_names_only_sorted() {
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
        let files = read_conf_dir(dir.path()).unwrap();
        let listed: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(listed, ["a.conflist", "b.conf", "c.json"]);
        assert_eq!(files[1].bytes, b"b.conf");
    }

    #[test]
    fn binary_copy_is_skipped_when_identical() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        fs::write(&source, "binary").unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        assert!(install_binary(&source, &bin, "tool").unwrap());
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
