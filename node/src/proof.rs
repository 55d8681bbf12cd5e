//! Before the audit enters a pod's netns it proves the path the runtime named is that pod's:
//! a plain file (no symlink) directly in one of the runtime's netns directories, holding a
//! network namespace (nsfs), not the node's own, and the very namespace the sandbox's process
//! lives in. A path failing any of these is reported and never entered.

use intercept_cni::netns::{Lookup, PodNetns};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where containerd and CRI-O pin pod netns by default (`/var/run` is a link to `/run`).
pub const DEFAULT_NETNS_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// Proves `netns` is the network namespace of the process `pid`; `Err` says why not.
pub fn prove(netns: &Path, pid: Option<u32>, dirs: &[PathBuf]) -> Result<(), String> {
    let parent = netns
        .parent()
        .filter(|_| netns.is_absolute() && netns.file_name().is_some())
        .ok_or_else(|| format!("{} is not an absolute file path", netns.display()))?;
    let parent = fs::canonicalize(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let in_dir = dirs
        .iter()
        .filter_map(|d| fs::canonicalize(d).ok())
        .any(|d| d == parent);
    if !in_dir {
        return Err(format!(
            "{} is not in the runtime's netns directory ({})",
            netns.display(),
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let link = fs::symlink_metadata(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
    if !link.file_type().is_file() {
        return Err(format!("{} is not a regular (nsfs) file", netns.display()));
    }
    let ns = match PodNetns::lookup(netns) {
        Ok(Lookup::Found(ns)) => ns,
        Ok(Lookup::Missing) => return Err(format!("{} is gone", netns.display())),
        Ok(Lookup::NotNetns(why)) => {
            return Err(format!(
                "{} is not a network namespace: {why}",
                netns.display()
            ))
        }
        Err(e) => return Err(e.msg),
    };
    if ns.is_own() {
        return Err(format!(
            "{} is the node's own network namespace",
            netns.display()
        ));
    }
    let pid = pid.ok_or("the runtime reports no sandbox process to compare with")?;
    let proc_ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let theirs = fs::metadata(&proc_ns).map_err(|e| {
        format!(
            "cannot read the sandbox process's netns {}: {e}",
            proc_ns.display()
        )
    })?;
    let ours = fs::metadata(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
    if (theirs.dev(), theirs.ino()) != (ours.dev(), ours.ino()) {
        return Err(format!(
            "{} is not the netns of the sandbox's process {pid}",
            netns.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(d: &Path) -> Vec<PathBuf> {
        vec![d.to_path_buf()]
    }

    #[test]
    fn a_path_outside_the_netns_dirs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let why = prove(Path::new("/proc/self/ns/net"), Some(1), &dirs(dir.path())).unwrap_err();
        assert!(
            why.contains("not in the runtime's netns directory"),
            "{why}"
        );
    }

    #[test]
    fn relative_paths_and_symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let why = prove(Path::new("netns/x"), Some(1), &dirs(dir.path())).unwrap_err();
        assert!(why.contains("not an absolute file path"), "{why}");
        // A link to the node's own netns, planted in the netns dir.
        let link = dir.path().join("cni-evil");
        std::os::unix::fs::symlink("/proc/self/ns/net", &link).unwrap();
        let why = prove(&link, Some(1), &dirs(dir.path())).unwrap_err();
        assert!(why.contains("not a regular (nsfs) file"), "{why}");
    }

    #[test]
    fn a_plain_file_is_not_a_netns() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cni-plain");
        std::fs::write(&file, b"").unwrap();
        let why = prove(&file, Some(1), &dirs(dir.path())).unwrap_err();
        assert!(why.contains("not a network namespace"), "{why}");
    }
}
