//! Running code inside a network namespace: the only place that calls setns. A pod's namespace
//! is entered by the calling thread, which returns to its own namespace before `run` returns,
//! panic or not: the plugin runs nothing concurrently that could see it away.

use crate::cni::error::{Code, Error, Result};
use nix::fcntl::OFlag;
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::statfs::NSFS_MAGIC;
use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

mod nsfs {
    // NS_GET_NSTYPE, from <linux/nsfs.h>: _IO(0xb7, 0x3).
    nix::ioctl_none!(ns_get_nstype, 0xb7, 0x3);
}

/// An opened pod namespace. Holding the file keeps the identity stable between the host-netns
/// check and the setns, even if the path is re-mounted in between.
pub struct PodNetns {
    ns: File,
    path: PathBuf,
    /// The namespace the opening thread was in, where `run` returns to.
    home: File,
}

/// What a `CNI_NETNS` path names.
pub enum Lookup {
    /// Nothing there (DEL: already gone).
    Missing,
    /// Something that is not a network namespace, and why: a FIFO, a device, a directory, a
    /// plain file (a bind-mount target left after the runtime unmounted it), another namespace
    /// type. Never opened when its type already tells (a FIFO or device could block or act).
    NotNetns(String),
    Found(PodNetns),
}

/// `NSFS_MAGIC` is `statfs.f_type`, whose integer type differs between libcs.
fn on_nsfs(file: &File) -> bool {
    nix::sys::statfs::fstatfs(file).is_ok_and(|fs| fs.filesystem_type() == NSFS_MAGIC)
}

/// The initial network namespace's fixed inode on kernels that fix it (PROC_NET_INIT_INO);
/// below the dynamic range (from 0xF0000000), so no other namespace ever has it.
const INIT_NET_INODE: u64 = 0xEFFF_FFF9;

impl PodNetns {
    /// Opens `path`; `Ok(None)` when it does not exist (DEL treats that as already gone), code 5
    /// when it is not a network namespace.
    pub fn open(path: &Path) -> Result<Option<Self>> {
        match Self::lookup(path)? {
            Lookup::Missing => Ok(None),
            Lookup::NotNetns(why) => Err(Error::new(
                Code::Io,
                format!(
                    "CNI_NETNS {} is not a network namespace: {why}",
                    path.display()
                ),
            )),
            Lookup::Found(ns) => Ok(Some(ns)),
        }
    }

    /// Finds out what `path` is, opening it only when it may be a namespace file, and then
    /// without blocking (O_NONBLOCK: a FIFO swapped in after the stat cannot hang the open).
    pub fn lookup(path: &Path) -> Result<Lookup> {
        let what = || format!("cannot open netns {}", path.display());
        let kind = match std::fs::metadata(path) {
            Ok(meta) => meta.file_type(),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Lookup::Missing),
            // `/var/run/netns/x/`: a path through a file names no namespace.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOTDIR) => {
                return Ok(Lookup::NotNetns("a path through a file".into()))
            }
            Err(e) => return Err(Error::io(what(), e)),
        };
        if let Some(why) = not_a_file(kind) {
            return Ok(Lookup::NotNetns(why.into()));
        }
        let ns = match open_nonblocking(path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Lookup::Missing),
            Err(e) => return Err(Error::io(what(), e)),
        };
        let meta = ns.metadata().map_err(|e| Error::io(what(), e))?;
        if let Some(why) = not_a_file(meta.file_type()) {
            return Ok(Lookup::NotNetns(why.into()));
        }
        if !on_nsfs(&ns) {
            return Ok(Lookup::NotNetns(
                "not a namespace file (a mount point whose namespace is gone, or a plain file)"
                    .into(),
            ));
        }
        // SAFETY: NS_GET_NSTYPE reads nothing from user memory; the fd is open for the call.
        // Kernels before 4.11 cannot tell the type; entering names a wrong one (see `run`).
        if let Ok(kind) = unsafe { nsfs::ns_get_nstype(ns.as_raw_fd()) } {
            if kind != CloneFlags::CLONE_NEWNET.bits() {
                return Ok(Lookup::NotNetns("a namespace of another kind".into()));
            }
        }
        let home = open_nonblocking(Path::new("/proc/thread-self/ns/net"))
            .map_err(|e| Error::io("cannot open the plugin's own netns", e))?;
        Ok(Lookup::Found(PodNetns {
            ns,
            path: path.to_path_buf(),
            home,
        }))
    }

    /// True when this is the host's namespace: the plugin's own, PID 1's, or the initial one,
    /// compared by namespace identity (device and inode), never by path. A plugin started from
    /// inside another namespace still recognises the node's.
    pub fn is_own(&self) -> bool {
        let Ok(ns) = self.ns.metadata() else {
            return true;
        };
        let same = |other: &std::fs::Metadata| other.dev() == ns.dev() && other.ino() == ns.ino();
        // PID 1's namespace files are unreadable in some containers: then the others decide.
        let pid1 = std::fs::metadata("/proc/1/ns/net");
        ns.ino() == INIT_NET_INODE
            || self.home.metadata().is_ok_and(|home| same(&home))
            || pid1.is_ok_and(|init| same(&init))
    }

    /// Refuses the host's namespace: programming it would redirect the whole node's traffic.
    pub fn refuse_own(&self) -> Result<()> {
        if self.is_own() {
            return Err(Error::new(
                Code::HostNetns,
                format!(
                    "CNI_NETNS {} is the host's network namespace; refusing to intercept the node's traffic",
                    self.path.display()
                ),
            ));
        }
        Ok(())
    }

    /// Runs `f` inside this namespace on the calling thread, then returns the thread to its own
    /// namespace; a panic in `f` comes back as an error. The calling thread, not a new one: a
    /// thread costs two cross-CPU wake-ups, about a fifth of a whole ADD.
    pub fn run<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let path = self.path.display();
        setns(&self.ns, CloneFlags::CLONE_NEWNET).map_err(|e| match e {
            nix::Error::EINVAL => Error::new(
                Code::Io,
                format!("cannot enter {path}: not a network namespace"),
            ),
            e => Error::io(format!("cannot enter netns {path}"), e),
        })?;
        let outcome = join(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        // Nothing after `f` needs the host's namespace, but a thread left in a pod's would be a
        // trap for whatever is added later: failing to return is an error of its own.
        let returned = setns(&self.home, CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::io("cannot return to the plugin's own netns", e));
        let value = outcome?;
        returned?;
        Ok(value)
    }
}

/// Why a file of this type cannot be a namespace file (those are regular files on nsfs).
fn not_a_file(kind: std::fs::FileType) -> Option<&'static str> {
    if kind.is_file() {
        None
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() || kind.is_block_device() {
        Some("a device")
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    }
}

fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY).bits())
        .open(path)
}

/// The inode numbers of the network namespaces something still holds: a bind mount (`ip netns
/// add`, a runtime's pinned namespace) or a task. One held only by an open file descriptor is
/// not seen.
pub fn live_namespaces() -> std::io::Result<std::collections::HashSet<u64>> {
    let net_inode =
        |link: &str| -> Option<u64> { link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok() };
    let mut live = std::collections::HashSet::new();
    // "ID PARENT MAJ:MIN ROOT MOUNTPOINT ... - FSTYPE SOURCE OPTIONS": an nsfs mount's root
    // names the namespace, e.g. `net:[4026532177]`.
    for line in std::fs::read_to_string("/proc/self/mountinfo")?.lines() {
        if line
            .split(" - ")
            .nth(1)
            .is_some_and(|fs| fs.starts_with("nsfs "))
        {
            live.extend(line.split(' ').nth(3).and_then(net_inode));
        }
    }
    // Every thread, not only every process: a thread may have entered another namespace.
    let tasks = std::fs::read_dir("/proc")?
        .flatten()
        .filter(|pid| {
            pid.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|pid| std::fs::read_dir(pid.path().join("task")).ok())
        .flat_map(|tasks| tasks.flatten());
    for task in tasks {
        // Tasks come and go while this runs: one that is gone holds nothing.
        if let Ok(link) = std::fs::read_link(task.path().join("ns/net")) {
            live.extend(link.to_str().and_then(net_inode));
        }
    }
    Ok(live)
}

/// Runs `f` on a new thread inside a brand-new, empty network namespace that disappears when the
/// thread ends. Used by the host prerequisite probe and by root-only tests.
pub fn run_in_new<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    join(std::thread::scope(|s| {
        s.spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::io("cannot create a network namespace", e))?;
            f()
        })
        .join()
    }))
}

/// A panic inside a namespace becomes an error answer, never a crash.
fn join<T>(joined: std::thread::Result<Result<T>>) -> Result<T> {
    joined.unwrap_or_else(|payload| Err(Error::from_panic(payload.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root: a panic inside the namespace thread comes back as a code-199 error, not a crash.
    #[test]
    fn a_panic_in_the_netns_thread_is_an_error() {
        let e = run_in_new(|| -> Result<()> { panic!("rule rendering bug") }).unwrap_err();
        assert_eq!(e.code, Code::Internal);
        assert!(e.msg.contains("rule rendering bug"), "{}", e.msg);
    }

    /// Root: `run` enters the pod's namespace on the calling thread and comes back from it,
    /// also when `f` fails or panics.
    #[test]
    fn run_returns_to_the_callers_namespace() {
        use std::sync::mpsc;
        // The pod: a namespace held by a helper thread until the test is done with it.
        let (tid_tx, tid_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            unshare(CloneFlags::CLONE_NEWNET).expect("unshare (root needed)");
            tid_tx.send(nix::unistd::gettid()).unwrap();
            done_rx.recv().ok();
        });
        let tid = tid_rx.recv().expect("the holder thread made a namespace");
        let path = format!("/proc/self/task/{tid}/ns/net");
        let current = || std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let home = current();
        let pod = PodNetns::open(Path::new(&path))
            .unwrap()
            .expect("the pod netns");
        assert!(!pod.is_own());
        let pod_link = std::fs::read_link(&path).unwrap();
        assert_ne!(pod_link, home);

        let inside = pod.run(|| Ok(current())).unwrap();
        assert_eq!((inside, current()), (pod_link, home.clone()));
        let e = pod
            .run(|| -> Result<()> { Err(Error::config("refused")) })
            .unwrap_err();
        assert_eq!((e.code, current()), (Code::InvalidConfig, home.clone()));
        let e = pod
            .run(|| -> Result<()> { panic!("rendering bug") })
            .unwrap_err();
        assert_eq!((e.code, current()), (Code::Internal, home));

        done_tx.send(()).unwrap();
        holder.join().unwrap();
    }
}
