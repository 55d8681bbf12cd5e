//! Running code inside a network namespace: the only place that calls setns. Work always happens
//! on a dedicated thread, so the main thread never leaves the plugin's own namespace.

use crate::cni::error::{Code, Error, Result};
use nix::sched::{unshare, CloneFlags};
use std::path::Path;

mod nsfs {
    // NS_GET_NSTYPE, from <linux/nsfs.h>: _IO(0xb7, 0x3).
    nix::ioctl_none!(ns_get_nstype, 0xb7, 0x3);
}

/// An opened pod namespace. Holding the file keeps the identity stable between the host-netns
/// check and the setns, even if the path is re-mounted in between.
pub struct PodNetns {
    ns: netns_rs::NetNs,
}

impl PodNetns {
    /// Opens `path`; `Ok(None)` when it does not exist (DEL treats that as already gone).
    pub fn open(path: &Path) -> Result<Option<Self>> {
        match netns_rs::get_from_path(path) {
            Ok(ns) => Ok(Some(PodNetns { ns })),
            Err(netns_rs::Error::OpenNsError(_, e)) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(Error::io(
                format!("cannot open netns {}", path.display()),
                e,
            )),
        }
    }

    /// False for a file that is not a network namespace: a bind-mount target left behind after
    /// the runtime unmounted it (DEL treats that as already gone), or another namespace type.
    pub fn is_namespace(&self) -> bool {
        use std::os::fd::AsRawFd;
        let on_nsfs = nix::sys::statfs::fstatfs(self.ns.file())
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC);
        // SAFETY: NS_GET_NSTYPE reads nothing from user memory; the fd is open for the call.
        match unsafe { nsfs::ns_get_nstype(self.ns.file().as_raw_fd()) } {
            Ok(kind) => on_nsfs && kind == CloneFlags::CLONE_NEWNET.bits(),
            // Kernels before 4.11 cannot tell the type; entering names a wrong one (see `run`).
            Err(_) => on_nsfs,
        }
    }

    /// True when this is the namespace the plugin itself runs in (the host's): compared by
    /// namespace identity (device and inode), never by path.
    pub fn is_own(&self) -> Result<bool> {
        let own = netns_rs::get_from_current_thread()
            .map_err(|e| Error::io("cannot open the plugin's own netns", e))?;
        Ok(own == self.ns)
    }

    /// Refuses the host's namespace: programming it would redirect the whole node's traffic.
    pub fn refuse_own(&self) -> Result<()> {
        if self.is_own()? {
            return Err(Error::new(
                Code::HostNetns,
                format!(
                    "CNI_NETNS {} is the host's network namespace; refusing to intercept the node's traffic",
                    self.ns.path().display()
                ),
            ));
        }
        Ok(())
    }

    /// Runs `f` on a new thread that has entered this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let ns = &self.ns;
        let path = ns.path().display().to_string();
        join(std::thread::scope(|s| {
            s.spawn(|| {
                ns.enter().map_err(|e| match e {
                    netns_rs::Error::SetnsError(nix::Error::EINVAL) => Error::new(
                        Code::Io,
                        format!("cannot enter {path}: not a network namespace"),
                    ),
                    e => Error::io(format!("cannot enter netns {path}"), e),
                })?;
                f()
            })
            .join()
        }))
    }
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

/// A panic on the namespace thread becomes an error answer, never a crash.
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
}
