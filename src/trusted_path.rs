//! Directories the plugin writes into as root (`stateDir`, the `logFile`'s directory): nobody
//! else may be able to steer those writes into another owner's files.
//!
//! A directory is trusted when, after resolving symlinks, it and every ancestor is owned by root
//! or by us and is not writable by group or others unless sticky (as /tmp is: others cannot
//! rename or remove what is ours there, and whatever they create there is theirs, so refused),
//! and when every symlink met on the literal path is itself owned by root or us (so the
//! default `/var/run/...` through Debian's root-owned `/var/run -> /run` is fine).
//! Once a path is trusted, only root or we can change it, so checking before use is not a race.

use crate::cni::error::{Error, Result};
use nix::fcntl::OFlag;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Refuses `dir` (which must exist) unless it is trusted; see the module comment.
pub fn trusted_dir(dir: &Path) -> Result<()> {
    check_literal(dir, false)?;
    let canonical = fs::canonicalize(dir)
        .map_err(|e| Error::io(format!("cannot resolve {}", dir.display()), e))?;
    check_resolved(dir, &canonical)
}

/// Makes `dir` usable as the plugin's state directory, changing no mode of anything: missing
/// components are created 0700 (so they are ours); an existing `dir` owned by us is used as it
/// is when it is private (no group or other bits), or when it is not writable by others and
/// holds entries, all named as ours (`ours`: the default state dir is shared with the agent's
/// events socket, which may have made it first); anything else is refused with code 7. Whether
/// the path is trusted (see the module comment) is judged first. A failure to create is an I/O
/// error (code 5), which callers may tolerate.
pub fn private_dir(dir: &Path, ours: impl Fn(&str) -> bool) -> Result<()> {
    check_literal(dir, true)?;
    let existing = prefixes(dir)
        .into_iter()
        .rev()
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/"));
    trusted_dir(&existing)?;
    if fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(untrusted(dir, dir, "is a symlink; give the real directory"));
    }
    for prefix in prefixes(dir) {
        match fs::DirBuilder::new().mode(0o700).create(&prefix) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("cannot create {}", prefix.display()), e)),
        }
    }
    // Whatever appeared in the meantime (a planted symlink, say) is judged again here.
    trusted_dir(dir)?;
    usable_existing(dir, ours)
}

/// What `private_dir` would refuse, judged without creating or changing anything (the
/// installer checks a config before chaining it). A missing `dir` would be created 0700: fine
/// when its nearest existing ancestor is trusted.
pub fn check_private_dir(dir: &Path, ours: impl Fn(&str) -> bool) -> Result<()> {
    check_literal(dir, true)?;
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => {
            Err(untrusted(dir, dir, "is a symlink; give the real directory"))
        }
        Ok(_) => {
            trusted_dir(dir)?;
            usable_existing(dir, ours)
        }
        Err(_) => {
            let existing = prefixes(dir)
                .into_iter()
                .rev()
                .find(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from("/"));
            trusted_dir(&existing)
        }
    }
}

/// An existing state dir is usable as it is: ours, and private or holding only our entries.
fn usable_existing(dir: &Path, ours: impl Fn(&str) -> bool) -> Result<()> {
    let what = || format!("state dir {}", dir.display());
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .open(dir)
        .map_err(|e| Error::io(what(), e))?;
    let meta = opened.metadata().map_err(|e| Error::io(what(), e))?;
    let mode = meta.permissions().mode() & 0o7777;
    let only_ours = || {
        let mut names = fs::read_dir(dir).into_iter().flatten().map(|entry| {
            entry
                .ok()
                .and_then(|e| e.file_name().into_string().ok())
                .is_some_and(|name| ours(&name))
        });
        names.next() == Some(true) && names.all(|ok| ok)
    };
    let usable = mode & 0o077 == 0 || (mode & 0o022 == 0 && only_ours());
    if meta.uid() != nix::unistd::geteuid().as_raw() || !usable {
        // Not ours to tighten: it may be `/`, `/proc` or another program's directory.
        return Err(Error::config(format!(
            "refusing stateDir {}: it exists and is not private (owner uid {}, mode {mode:o}); \
             give a directory of its own (created 0700 when missing), its mode is never changed",
            dir.display(),
            meta.uid()
        )));
    }
    Ok(())
}

/// Refuses a program the plugin would run as root unless nobody but root (or us) can change
/// it: its directory is trusted, a symlink to it is root's (or ours), and the file it resolves
/// to is owned by root or us, not writable by group or others, in a trusted directory.
pub fn trusted_executable(path: &Path) -> Result<()> {
    let parent = path
        .parent()
        .ok_or_else(|| Error::config(format!("{}: has no directory", path.display())))?;
    trusted_dir(parent)?;
    let link = fs::symlink_metadata(path)
        .map_err(|e| Error::io(format!("cannot inspect {}", path.display()), e))?;
    if link.file_type().is_symlink() && !trusted_owner(link.uid()) {
        return Err(untrusted(
            path,
            path,
            format!("is a symlink owned by uid {}", link.uid()),
        ));
    }
    let real = fs::canonicalize(path)
        .map_err(|e| Error::io(format!("cannot resolve {}", path.display()), e))?;
    if let Some(real_dir) = real.parent() {
        check_resolved(path, real_dir)?;
    }
    let meta = fs::metadata(&real)
        .map_err(|e| Error::io(format!("cannot inspect {}", real.display()), e))?;
    if !trusted_owner(meta.uid()) {
        return Err(untrusted(
            path,
            &real,
            format!("is owned by uid {}", meta.uid()),
        ));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(untrusted(
            path,
            &real,
            format!("is writable by group or others (mode {:o})", mode & 0o7777),
        ));
    }
    Ok(())
}

/// `/a`, `/a/b`, `/a/b/c` for `/a/b/c`.
fn prefixes(path: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = path.ancestors().map(Path::to_path_buf).collect();
    all.reverse();
    all.retain(|p| p.parent().is_some());
    all
}

fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// The path as written: it must be absolute, free of `..`, and each existing component a
/// directory or a symlink owned by root or us. `missing_ok`: trailing components may be absent.
fn check_literal(path: &Path, missing_ok: bool) -> Result<()> {
    if !path.is_absolute()
        || path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(Error::config(format!(
            "{}: must be an absolute path without '..'",
            path.display()
        )));
    }
    for prefix in prefixes(path) {
        let meta = match fs::symlink_metadata(&prefix) {
            Ok(meta) => meta,
            Err(e) if e.kind() == ErrorKind::NotFound && missing_ok => return Ok(()),
            Err(e) => return Err(Error::io(format!("cannot inspect {}", prefix.display()), e)),
        };
        if meta.file_type().is_symlink() {
            if !trusted_owner(meta.uid()) {
                return Err(untrusted(
                    path,
                    &prefix,
                    format!("is a symlink owned by uid {}", meta.uid()),
                ));
            }
        } else if !meta.is_dir() {
            return Err(untrusted(path, &prefix, "is not a directory"));
        }
    }
    Ok(())
}

/// The resolved directory and each of its ancestors: owned by root or us, and not writable by
/// group or others unless sticky.
fn check_resolved(path: &Path, canonical: &Path) -> Result<()> {
    for dir in canonical.ancestors() {
        let meta = fs::metadata(dir)
            .map_err(|e| Error::io(format!("cannot inspect {}", dir.display()), e))?;
        if !trusted_owner(meta.uid()) {
            return Err(untrusted(
                path,
                dir,
                format!("is owned by uid {}", meta.uid()),
            ));
        }
        let mode = meta.permissions().mode();
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(untrusted(
                path,
                dir,
                format!("is writable by group or others (mode {:o})", mode & 0o7777),
            ));
        }
    }
    Ok(())
}

/// Code 7: the config names a path the plugin must not use.
fn untrusted(path: &Path, at: &Path, why: impl std::fmt::Display) -> Error {
    Error::config(format!(
        "refusing {}: {} {why}; only root or the plugin's user may control this path",
        path.display(),
        at.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{lchown, symlink};

    const NOBODY: u32 = 65534;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn refused(result: Result<()>, expected: &str) {
        let e = result.expect_err("must be refused");
        assert!(e.msg.contains(expected), "{expected:?} not in {:?}", e.msg);
    }

    #[test]
    fn creates_missing_dirs_0700_and_never_changes_an_existing_ones_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("a/b/state");
        private_dir(&state, |_| false).unwrap();
        for dir in [tmp.path().join("a"), tmp.path().join("a/b"), state.clone()] {
            assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        }
        private_dir(&state, |_| false).unwrap();
        // A directory that is not private is refused (code 7), not tightened: it may be `/`.
        for loose in [0o755, 0o750, 0o701, 0o555] {
            chmod(&state, loose);
            let e = private_dir(&state, |_| false).unwrap_err();
            assert_eq!(e.code, crate::cni::error::Code::InvalidConfig, "{e}");
            assert!(e.msg.contains("not private"), "{e}");
            assert_eq!(mode(&state), loose);
        }
        // Not private, but holding only entries named as ours: used as it is.
        chmod(&state, 0o755);
        fs::write(state.join("ours"), "").unwrap();
        private_dir(&state, |name| name == "ours").unwrap();
        fs::write(state.join("theirs"), "").unwrap();
        refused(private_dir(&state, |name| name == "ours"), "not private");
        assert_eq!(mode(&state), 0o755);
        // Private but another user's: refused (its owner is untrusted), mode unchanged.
        chmod(&state, 0o700);
        std::os::unix::fs::chown(&state, Some(NOBODY), None).unwrap();
        refused(private_dir(&state, |_| false), "owned by uid 65534");
        assert_eq!(mode(&state), 0o700);
    }

    /// Root: ownership of the planted files is what is judged.
    #[test]
    fn symlinks_are_refused_unless_owned_by_root_and_leading_to_trusted_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        symlink(&real, &link).unwrap();

        // The state dir itself as a symlink: refused even when it leads somewhere trusted.
        refused(private_dir(&link, |_| false), "is a symlink");
        // A root-owned symlink on the way to a trusted place is fine (like /var/run -> /run).
        private_dir(&link.join("state"), |_| false).unwrap();
        trusted_dir(&link).unwrap();
        assert!(real.join("state").is_dir());

        // A symlink planted by another user is refused, wherever it points.
        lchown(&link, Some(NOBODY), None).unwrap();
        refused(
            private_dir(&link.join("other"), |_| false),
            "symlink owned by uid 65534",
        );
        refused(trusted_dir(&link), "symlink owned by uid 65534");
        assert!(!real.join("other").exists());

        // A root-owned symlink into another user's directory is refused too.
        let theirs = tmp.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(NOBODY), None).unwrap();
        let into_theirs = tmp.path().join("into-theirs");
        symlink(&theirs, &into_theirs).unwrap();
        refused(
            private_dir(&into_theirs.join("state"), |_| false),
            "is owned by uid 65534",
        );
        assert!(!theirs.join("state").exists());
    }

    #[test]
    fn foreign_or_writable_ancestors_are_refused_sticky_ones_are_not() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        fs::create_dir(&shared).unwrap();

        chmod(&shared, 0o775);
        refused(
            private_dir(&shared.join("state"), |_| false),
            "writable by group or others",
        );
        refused(trusted_dir(&shared), "writable by group or others");
        chmod(&shared, 0o1777);
        private_dir(&shared.join("state"), |_| false).unwrap();

        std::os::unix::fs::chown(&shared, Some(NOBODY), None).unwrap();
        chmod(&shared, 0o755);
        refused(
            private_dir(&shared.join("state"), |_| false),
            "owned by uid 65534",
        );
        refused(trusted_dir(&shared.join("state")), "owned by uid 65534");
    }

    #[test]
    fn odd_paths_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        fs::write(&file, "").unwrap();
        refused(
            private_dir(&file.join("state"), |_| false),
            "is not a directory",
        );
        refused(private_dir(&file, |_| false), "is not a directory");
        refused(
            private_dir(Path::new("relative/state"), |_| false),
            "absolute path",
        );
        refused(
            private_dir(&tmp.path().join("a/../state"), |_| false),
            "without '..'",
        );
    }
}
