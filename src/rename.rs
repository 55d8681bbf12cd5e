//! `renameat2(2)` by its raw system call: nix wraps it for glibc targets only, and the plugin
//! also builds against musl.

use nix::errno::Errno;
use nix::libc;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Fails with EEXIST when `to` exists.
pub const NOREPLACE: libc::c_uint = libc::RENAME_NOREPLACE;
/// Swaps `from` and `to` atomically; both must exist.
pub const EXCHANGE: libc::c_uint = libc::RENAME_EXCHANGE;

/// Renames `from` to `to` (paths relative to the working directory when not absolute) with
/// `flags` (`NOREPLACE` or `EXCHANGE`).
pub fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> Result<(), Errno> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL);
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that live across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    Errno::result(rc).map(drop)
}
