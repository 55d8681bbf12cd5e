//! A minimal `log` sink: stderr, and optionally a file appended to. Never stdout, which belongs
//! to the CNI answer. Every record is one line (control characters are escaped), so a log
//! line cannot be forged from input and each verb's summary stays one line.
//!
//! Only a log file of ours is ever appended to, chmodded or rotated: one that starts with a
//! record in our format. A new one appears with its first line already in it (written to a
//! temp file, renamed into place only if the path is still free), so no empty or foreign file
//! is ever taken for ours; any other file at the path (`/etc/passwd`, another program's log) is
//! left as it is, and the plugin logs to stderr only, with a warning: the CNI answer never
//! fails because of the log file.
//!
//! The file is bounded: once it would grow past `logFileMaxBytes`, it is renamed to `<file>.1`
//! (replacing the previous one, only if that is ours too) and a new file is started. Many
//! plugin processes append at once (O_APPEND keeps their lines whole); the one holding the
//! flock of the full file renames it, and the others, finding the path moved on, reopen.

use crate::cni::error::{Error, Result};
use crate::trusted_path;
use log::{LevelFilter, Log, Metadata, Record};
use nix::fcntl::{Flock, FlockArg};
use std::borrow::Cow;
use std::cell::Cell;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// `logFileMaxBytes` when the config sets none.
pub const DEFAULT_MAX_BYTES: u64 = 10 << 20;
/// Below this, rotation would happen every few lines.
pub const MIN_MAX_BYTES: u64 = 4096;

struct Logger {
    file: Mutex<Option<LogFile>>,
}

static LOGGER: Logger = Logger {
    file: Mutex::new(None),
};

/// This invocation's warnings, for its event record (bounded, see `agent::events`).
static WARNINGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The warnings logged so far, emptied.
pub fn take_warnings() -> Vec<String> {
    std::mem::take(&mut *WARNINGS.lock().unwrap_or_else(PoisonError::into_inner))
}

fn keep_warning(message: &str) {
    let mut warnings = WARNINGS.lock().unwrap_or_else(PoisonError::into_inner);
    if warnings.len() < crate::agent::events::MAX_WARNINGS {
        warnings.push(crate::agent::events::bounded(message));
    }
}

/// Installs the logger at `warn`: until the config is read, only trouble is worth printing.
pub fn init() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Warn);
    }
}

/// Applies the config's level and, when given, starts appending to `file`.
pub fn configure(level: LevelFilter, file: Option<&Path>, max_bytes: u64) -> Result<()> {
    log::set_max_level(level);
    let Some(path) = file else {
        return Ok(());
    };
    let opened = LogFile::open(path, max_bytes)?;
    if let Ok(mut slot) = LOGGER.file.lock() {
        *slot = Some(opened);
    }
    Ok(())
}

/// The log file, appended to, and what rotating it needs. `file` is `None` until the first
/// line creates it (or while the path is absent after another process rotated it).
struct LogFile {
    file: Option<File>,
    path: PathBuf,
    max_bytes: u64,
}

impl LogFile {
    fn open(path: &Path, max_bytes: u64) -> Result<LogFile> {
        let what = || format!("cannot open logFile {}", path.display());
        let parent = path
            .parent()
            .ok_or_else(|| Error::io(what(), "has no parent directory"))?;
        trusted_path::trusted_dir(parent).map_err(|e| Error::io(what(), e))?;
        Ok(LogFile {
            file: open_ours(path)?,
            path: path.to_path_buf(),
            max_bytes,
        })
    }

    /// Appends one line in one write, rotating first when it would pass the bound.
    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            self.file = Some(create_with(&self.path, line)?);
            return Ok(());
        };
        let size = file.metadata()?.len();
        if size > 0 && size + line.len() as u64 > self.max_bytes {
            match self.rotate() {
                Ok(()) => {}
                // `<file>.1` is not ours: the file stays bounded by taking no more lines.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Err(e),
                // A failed rotation still leaves a file to write to; its error is reported after.
                Err(e) => {
                    file_write(self.file.as_mut(), line)?;
                    return Err(e);
                }
            }
        }
        match self.file.as_mut() {
            Some(file) => file.write_all(line),
            None => {
                self.file = Some(create_with(&self.path, line)?);
                Ok(())
            }
        }
    }

    /// Renames the full file to `<file>.1` (only over a `.1` of ours) unless another process
    /// did already; the next line goes to the file at the path, created by whoever writes first.
    fn rotate(&mut self) -> std::io::Result<()> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let locked =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| std::io::Error::from(e))?;
        let ours = locked.metadata()?;
        // Still the file at our path, and still full: nobody rotated it while we waited.
        let unrotated = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|at_path| at_path.dev() == ours.dev() && at_path.ino() == ours.ino());
        if unrotated {
            let rotated = rotated_path(&self.path);
            if let Err(why) = replaceable(&rotated) {
                self.file = Some(locked.unlock().map_err(|(_, e)| std::io::Error::from(e))?);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "not rotating over {}: {why}; lines go to stderr only",
                        rotated.display()
                    ),
                ));
            }
            std::fs::rename(&self.path, rotated)?;
        }
        drop(locked);
        self.file = open_ours(&self.path).map_err(std::io::Error::other)?;
        Ok(())
    }
}

fn file_write(file: Option<&mut File>, line: &[u8]) -> std::io::Result<()> {
    file.map_or(Ok(()), |f| f.write_all(line))
}

/// `<file>.1`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".1");
    PathBuf::from(name)
}

/// Whether the rotated file may be replaced: absent, or a log file of ours.
fn replaceable(rotated: &Path) -> std::result::Result<(), String> {
    match open_regular(rotated, false) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.to_string()),
        Ok(file) => judge(&file),
    }
}

/// Opens `path` (for appending too when `append`) only if it is a regular file: a device is
/// never opened (opening some, a watchdog say, acts), nor a FIFO, nor a symlink (O_NOFOLLOW).
/// The directory is trusted, so nobody but root can swap the file between the look and the open.
fn open_regular(path: &Path, append: bool) -> std::io::Result<File> {
    let kind = std::fs::symlink_metadata(path)?.file_type();
    if !kind.is_file() {
        let what = if kind.is_symlink() {
            "a symlink"
        } else {
            "not a regular file"
        };
        return Err(std::io::Error::other(what));
    }
    OpenOptions::new()
        .read(true)
        .append(append)
        .custom_flags(open_flags())
        .open(path)
}

/// The log file at `path` when it is one of ours (see `judge`); `None` when there is none.
/// Never created here: a new log file appears with its first line (`create_with`), so any
/// file at the path without a line of ours at its start was not made by the plugin.
fn open_ours(path: &Path) -> Result<Option<File>> {
    let what = || format!("cannot open logFile {}", path.display());
    let file = match open_regular(path, true) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(what(), e)),
    };
    judge(&file).map_err(|why| Error::io(what(), why))?;
    Ok(Some(file))
}

/// A log file of ours: a regular file with one link, owned by us, whose first line is a record
/// in our format. Anything else (an empty file, `/etc/passwd`, another program's log) is left
/// alone: never appended to, chmodded or rotated.
fn judge(file: &File) -> std::result::Result<(), String> {
    use std::os::unix::fs::FileExt;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.nlink() > 1 {
        return Err("it has other hard links".into());
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(format!("owned by uid {}", meta.uid()));
    }
    let mut head = [0u8; 80];
    let n = file.read_at(&mut head, 0).map_err(|e| e.to_string())?;
    if !is_our_record(&head[..n]) {
        return Err(
            "not a log file of intercept-cni (its first line is not one of our records); \
             give a path of its own"
                .into(),
        );
    }
    // Ours, so ours to keep private.
    if meta.permissions().mode() & 0o777 != 0o600 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `2026-01-02T03:04:05.678Z INFO  intercept-cni[123]: ` at the start of `head`.
fn is_our_record(head: &[u8]) -> bool {
    const STAMP: &[u8] = b"dddd-dd-ddTdd:dd:dd.dddZ ";
    if head.len() < STAMP.len() + 6 {
        return false;
    }
    let stamp = head.iter().zip(STAMP).all(|(b, p)| {
        if *p == b'd' {
            b.is_ascii_digit()
        } else {
            b == p
        }
    });
    let rest = &head[STAMP.len()..];
    let level = [b"ERROR", b"WARN ", b"INFO ", b"DEBUG", b"TRACE"]
        .iter()
        .any(|l| rest.starts_with(*l));
    let Some(pid) = rest[5..].strip_prefix(b" intercept-cni[") else {
        return false;
    };
    let digits = pid.iter().take_while(|b| b.is_ascii_digit()).count();
    stamp && level && digits > 0 && pid[digits..].starts_with(b"]: ")
}

/// `renameat2(RENAME_NOREPLACE)`: EEXIST when `to` exists.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    crate::rename::renameat2(from, to, crate::rename::NOREPLACE).map_err(std::io::Error::from)
}

/// Creates the log file at `path` holding `line`, atomically: it is written to a private temp
/// file first and renamed into place only if nothing is there (so no empty file of ours is ever
/// seen). If another process created it first, `line` is appended to that one.
fn create_with(path: &Path, line: &[u8]) -> std::io::Result<File> {
    let mut tmp = OsString::from(path.as_os_str());
    // The thread id: unique among every process and thread writing at once.
    tmp.push(format!(".{}.intercept-cni-tmp", nix::unistd::gettid()));
    let tmp = PathBuf::from(tmp);
    for _ in 0..3 {
        let _ = std::fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(open_flags())
            .open(&tmp)?;
        let placed = file
            .write_all(line)
            .and_then(|()| rename_noreplace(&tmp, path));
        match placed {
            Ok(()) => return Ok(file),
            Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => {}
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
        std::fs::remove_file(&tmp)?;
        if let Some(mut theirs) = open_ours(path).map_err(std::io::Error::other)? {
            theirs.write_all(line)?;
            return Ok(theirs);
        }
    }
    Err(std::io::Error::other("the log file keeps being removed"))
}

/// O_NOFOLLOW refuses a symlink; O_NONBLOCK keeps a FIFO planted there from blocking the open.
fn open_flags() -> i32 {
    (nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
        .bits()
}

/// The message with control characters (newlines included) escaped.
fn one_line(message: &str) -> Cow<'_, str> {
    if !message.chars().any(char::is_control) {
        return Cow::Borrowed(message);
    }
    Cow::Owned(
        message
            .chars()
            .map(|c| match c {
                '\t' => " ".to_string(),
                c if c.is_control() => c.escape_default().to_string(),
                c => c.to_string(),
            })
            .collect(),
    )
}

thread_local! {
    static WRITING_FILE: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as writing the log file. A panic in there reaches the panic hook, which
/// logs again: that record goes to stderr only, instead of deadlocking on the file's lock.
struct WritingFile;

impl WritingFile {
    fn enter() -> Option<WritingFile> {
        (!WRITING_FILE.with(|w| w.replace(true))).then_some(WritingFile)
    }
}

impl Drop for WritingFile {
    fn drop(&mut self) {
        WRITING_FILE.with(|w| w.set(false));
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        // rustables logs every attribute it does not decode at info: noise unless debugging.
        let ceiling = if metadata.target().starts_with("rustables") {
            log::max_level().min(log::LevelFilter::Warn)
        } else {
            log::max_level()
        };
        metadata.level() <= ceiling
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        if record.level() == log::Level::Warn {
            keep_warning(&message);
        }
        let line = format!(
            "{} {:<5} intercept-cni[{}]: {}\n",
            utc_timestamp(SystemTime::now()),
            record.level(),
            std::process::id(),
            one_line(&message)
        );
        // A log that cannot be written must not turn into a failed CNI call.
        let _ = std::io::stderr().write_all(line.as_bytes());
        let Some(_writing) = WritingFile::enter() else {
            return;
        };
        // A panic elsewhere while the lock was held must not end file logging.
        let mut slot = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(file) = slot.as_mut() {
            if let Err(e) = file.append(line.as_bytes()) {
                let _ = writeln!(std::io::stderr(), "intercept-cni: logFile: {e}");
            }
        }
    }

    fn flush(&self) {}
}

/// RFC 3339 in UTC, to the millisecond, without a date crate.
pub(crate) fn utc_timestamp(now: SystemTime) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123); // 2000-02-29
        assert_eq!(utc_timestamp(t), "2000-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_735_689_599); // last second of 2024
        assert_eq!(utc_timestamp(t), "2024-12-31T23:59:59.000Z");
    }

    const RECORD: &[u8] = b"2026-01-02T03:04:05.678Z INFO  intercept-cni[42]: started\n";

    fn open_log_file(path: &Path) -> Result<()> {
        LogFile::open(path, DEFAULT_MAX_BYTES)?
            .append(RECORD)
            .map_err(|e| Error::io("append", e))
    }

    #[test]
    fn log_file_is_0600_and_symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.log");
        open_log_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), RECORD);
        open_log_file(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), [RECORD, RECORD].concat());

        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(open_log_file(&link).is_err());
        assert!(open_log_file(dir.path()).is_err());
    }

    #[test]
    fn only_files_starting_with_our_record_are_ours() {
        assert!(is_our_record(RECORD));
        assert!(is_our_record(
            b"1999-12-31T23:59:59.999Z ERROR intercept-cni[1]: x"
        ));
        for other in [
            &b""[..],
            b"root:x:0:0:root:/root:/bin/bash\n",
            b"2026-01-02T03:04:05.678Z INFO  other-cni[42]: started\n",
            b"2026-01-02T03:04:05.678Z NOTE  intercept-cni[42]: started\n",
            b"2026-01-02T03:04:05.678Z INFO  intercept-cni[]: started\n",
            b"2026-01-02 03:04:05.678Z INFO  intercept-cni[42]: started\n",
        ] {
            assert!(
                !is_our_record(other),
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }

    /// Root: files and directories of another owner are what is refused; so is a root-owned
    /// file that is not a log of ours, whatever its mode, which stays as it was.
    #[test]
    fn hard_links_foreign_files_and_foreign_dirs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let precious = dir.path().join("precious");
        std::fs::write(&precious, "root's\n").unwrap();
        let hard = dir.path().join("hard.log");
        std::fs::hard_link(&precious, &hard).unwrap();
        let e = open_log_file(&hard).unwrap_err();
        assert!(e.msg.contains("hard links"), "{}", e.msg);

        let theirs = dir.path().join("theirs.log");
        std::fs::write(&theirs, RECORD).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let e = open_log_file(&theirs).unwrap_err();
        assert!(e.msg.contains("owned by uid 65534"), "{}", e.msg);

        let their_dir = dir.path().join("their-dir");
        std::fs::create_dir(&their_dir).unwrap();
        std::os::unix::fs::chown(&their_dir, Some(65534), None).unwrap();
        let e = open_log_file(&their_dir.join("cni.log")).unwrap_err();
        assert!(e.msg.contains("owned by uid 65534"), "{}", e.msg);
        assert!(!their_dir.join("cni.log").exists());

        // A device or FIFO is never opened (some devices act on open).
        let fifo = dir.path().join("fifo.log");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        for odd in [Path::new("/dev/null"), &fifo] {
            let e = open_log_file(odd).unwrap_err();
            assert!(e.msg.contains("not a regular file"), "{}", e.msg);
        }

        for (name, content) in [
            ("empty.log", &b""[..]),
            ("passwd", b"root:x:0:0::/root:/bin/sh\n"),
        ] {
            let foreign = dir.path().join(name);
            std::fs::write(&foreign, content).unwrap();
            std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = open_log_file(&foreign).unwrap_err();
            assert!(
                e.msg.contains("not a log file of intercept-cni"),
                "{}",
                e.msg
            );
            let mode = std::fs::metadata(&foreign).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
            assert_eq!(std::fs::read(&foreign).unwrap(), content);
        }
        assert_eq!(std::fs::read_to_string(&precious).unwrap(), "root's\n");

        // A log of ours (an earlier version's too) with loose bits is tightened.
        let loose = dir.path().join("loose.log");
        std::fs::write(&loose, RECORD).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        open_log_file(&loose).unwrap();
        let mode = std::fs::metadata(&loose).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// Rotation never renames over a `<file>.1` that is not ours; the log then takes no more
    /// lines, so it stays bounded.
    #[test]
    fn rotation_never_replaces_a_foreign_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.log");
        std::fs::write(rotated_path(&path), "not ours\n").unwrap();
        let mut log = LogFile::open(&path, MIN_MAX_BYTES).unwrap();
        let mut refused = 0;
        for n in 0..200 {
            refused += usize::from(log.append(&line(n)).is_err());
        }
        assert!(refused > 0);
        assert_eq!(
            std::fs::read_to_string(rotated_path(&path)).unwrap(),
            "not ours\n"
        );
        assert!(std::fs::metadata(&path).unwrap().len() <= MIN_MAX_BYTES);
    }

    #[test]
    fn a_record_logged_while_writing_the_file_skips_the_file() {
        let outer = WritingFile::enter().expect("first entry");
        assert!(WritingFile::enter().is_none(), "re-entry from a panic hook");
        drop(outer);
        assert!(WritingFile::enter().is_some());
    }

    #[test]
    fn every_record_is_one_line() {
        assert_eq!(one_line("plain"), "plain");
        assert_eq!(one_line("a\nb\r\tc\u{1b}[31m"), "a\\nb\\r c\\u{1b}[31m");
    }

    /// A record in our format, numbered, all of one length.
    fn line(n: usize) -> Vec<u8> {
        format!(
            "2026-01-02T03:04:05.678Z INFO  intercept-cni[1]: line {n:05} {}\n",
            "x".repeat(80)
        )
        .into_bytes()
    }

    #[test]
    fn rotation_keeps_one_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.log");
        let mut log = LogFile::open(&path, MIN_MAX_BYTES).unwrap();
        let per_line = line(0).len();
        let lines = MIN_MAX_BYTES as usize / per_line * 3 / 2;
        for n in 0..lines {
            log.append(&line(n)).unwrap();
        }
        let current = std::fs::read_to_string(&path).unwrap();
        let previous = std::fs::read_to_string(rotated_path(&path)).unwrap();
        assert!(current.len() as u64 <= MIN_MAX_BYTES);
        assert!(previous.len() as u64 <= MIN_MAX_BYTES);
        assert_eq!(current.lines().count() + previous.lines().count(), lines);
        assert!(previous.contains("line 00000 "));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// Writers with their own open file (as separate processes have) rotating at once: every
    /// line stays whole, and both files stay within the bound plus one line per writer (the
    /// lines in flight when the file was renamed).
    #[test]
    fn concurrent_writers_rotate_safely() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.log");
        let writers = 8;
        std::thread::scope(|s| {
            for w in 0..writers {
                let path = &path;
                s.spawn(move || {
                    let mut log = LogFile::open(path, MIN_MAX_BYTES).unwrap();
                    for n in 0..400 {
                        log.append(&line(w * 1000 + n)).unwrap();
                    }
                });
            }
        });
        let bound = MIN_MAX_BYTES as usize + writers * line(0).len();
        for file in [path.clone(), rotated_path(&path)] {
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(
                text.len() <= bound,
                "{}: {} bytes",
                file.display(),
                text.len()
            );
            for l in text.lines() {
                assert_eq!(l.len() + 1, line(0).len(), "torn line {l:?}");
            }
        }
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2, "only the log and its .1");
    }
}
