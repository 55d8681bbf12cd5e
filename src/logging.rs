//! A minimal `log` sink: stderr, and optionally a file appended to. Never stdout, which belongs
//! to the CNI answer. Every record is one line (control characters are escaped), so a log
//! line cannot be forged from input and each verb's summary stays one line.
//!
//! The file is bounded: once it would grow past `logFileMaxBytes`, it is renamed to `<file>.1`
//! (replacing the previous one) and a new file is started. Many plugin processes append at
//! once (O_APPEND keeps their lines whole); the one holding the flock of the full file renames
//! it, and the others, finding the path moved on, reopen.

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

/// The log file, appended to, and what rotating it needs.
struct LogFile {
    file: File,
    path: PathBuf,
    max_bytes: u64,
}

impl LogFile {
    fn open(path: &Path, max_bytes: u64) -> Result<LogFile> {
        Ok(LogFile {
            file: open_log_file(path)?,
            path: path.to_path_buf(),
            max_bytes,
        })
    }

    /// Appends one line in one write, rotating first when it would pass the bound.
    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        let size = self.file.metadata()?.len();
        let rotated = if size > 0 && size + line.len() as u64 > self.max_bytes {
            self.rotate()
        } else {
            Ok(())
        };
        // A failed rotation still leaves a file to write to; its error is reported after.
        self.file.write_all(line)?;
        rotated
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let locked = Flock::lock(self.file.try_clone()?, FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))?;
        let ours = locked.metadata()?;
        // Still the file at our path, and still full: nobody rotated it while we waited.
        let unrotated = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|at_path| at_path.dev() == ours.dev() && at_path.ino() == ours.ino());
        if unrotated {
            std::fs::rename(&self.path, rotated_path(&self.path))?;
        }
        drop(locked);
        self.file = open_log_file(&self.path).map_err(std::io::Error::other)?;
        Ok(())
    }
}

/// `<file>.1`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".1");
    PathBuf::from(name)
}

/// Created 0600 in a trusted directory (see `trusted_path`); a symlink, a hard link, anything
/// but a regular file, or a file of another owner is refused: the plugin runs as root and must
/// not be tricked into appending to another file.
fn open_log_file(path: &Path) -> Result<File> {
    let what = || format!("cannot open logFile {}", path.display());
    let parent = path
        .parent()
        .ok_or_else(|| Error::io(what(), "has no parent directory"))?;
    trusted_path::trusted_dir(parent).map_err(|e| Error::io(what(), e))?;
    // A file rotated away twice between our open and fstat has no link left: open again.
    let (file, meta) = (0..3)
        .map(|_| {
            let file = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .custom_flags(open_flags())
                .open(path)
                .map_err(|e| Error::io(what(), e))?;
            let meta = file.metadata().map_err(|e| Error::io(what(), e))?;
            Ok((file, meta))
        })
        .find(|opened| !matches!(opened, Ok((_, meta)) if meta.nlink() == 0))
        .unwrap_or_else(|| Err(Error::io(what(), "it keeps being removed")))?;
    if !meta.is_file() {
        return Err(Error::io(what(), "not a regular file"));
    }
    if meta.nlink() > 1 {
        return Err(Error::io(what(), "it has other hard links"));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(Error::io(what(), format!("owned by uid {}", meta.uid())));
    }
    if meta.permissions().mode() & 0o777 != 0o600 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(what(), e))?;
    }
    Ok(file)
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

    #[test]
    fn log_file_is_0600_and_symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.log");
        drop(open_log_file(&path).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(open_log_file(&link).is_err());
        assert!(open_log_file(dir.path()).is_err());
    }

    /// Root: files and directories of another owner are what is refused.
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
        std::fs::write(&theirs, "").unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), None).unwrap();
        let e = open_log_file(&theirs).unwrap_err();
        assert!(e.msg.contains("owned by uid 65534"), "{}", e.msg);

        let their_dir = dir.path().join("their-dir");
        std::fs::create_dir(&their_dir).unwrap();
        std::os::unix::fs::chown(&their_dir, Some(65534), None).unwrap();
        let e = open_log_file(&their_dir.join("cni.log")).unwrap_err();
        assert!(e.msg.contains("owned by uid 65534"), "{}", e.msg);
        assert!(!their_dir.join("cni.log").exists());

        let loose = dir.path().join("loose.log");
        std::fs::write(&loose, "").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(open_log_file(&loose).unwrap());
        let mode = std::fs::metadata(&loose).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&precious).unwrap(), "root's\n");
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

    fn line(n: usize) -> Vec<u8> {
        format!("line {n:05} {}\n", "x".repeat(80)).into_bytes()
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
        assert!(previous.starts_with("line 00000 "));
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
