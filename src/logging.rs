//! A minimal `log` sink: stderr, and optionally a file appended to. Never stdout, which belongs
//! to the CNI answer.

use crate::cni::error::{Error, Result};
use log::{LevelFilter, Log, Metadata, Record};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

struct Logger {
    file: Mutex<Option<File>>,
}

static LOGGER: Logger = Logger {
    file: Mutex::new(None),
};

/// Installs the logger at `warn`: until the config is read, only trouble is worth printing.
pub fn init() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Warn);
    }
}

/// Applies the config's level and, when given, starts appending to `file`.
pub fn configure(level: LevelFilter, file: Option<&Path>) -> Result<()> {
    log::set_max_level(level);
    let Some(path) = file else {
        return Ok(());
    };
    let opened = open_log_file(path)?;
    if let Ok(mut slot) = LOGGER.file.lock() {
        *slot = Some(opened);
    }
    Ok(())
}

/// Created 0600; a symlink (or anything but a regular file) is refused, since the plugin runs
/// as root and must not be tricked into appending to another file.
fn open_log_file(path: &Path) -> Result<File> {
    let what = || format!("cannot open logFile {}", path.display());
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(open_flags())
        .open(path)
        .map_err(|e| Error::io(what(), e))?;
    let meta = file.metadata().map_err(|e| Error::io(what(), e))?;
    if !meta.is_file() {
        return Err(Error::io(what(), "not a regular file"));
    }
    Ok(file)
}

/// O_NOFOLLOW refuses a symlink; O_NONBLOCK keeps a FIFO planted there from blocking the open.
fn open_flags() -> i32 {
    (nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
        .bits()
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
        let line = format!(
            "{} {:<5} intercept-cni[{}]: {}\n",
            utc_timestamp(SystemTime::now()),
            record.level(),
            std::process::id(),
            record.args()
        );
        // A log that cannot be written must not turn into a failed CNI call.
        let _ = std::io::stderr().write_all(line.as_bytes());
        if let Ok(mut slot) = self.file.lock() {
            if let Some(file) = slot.as_mut() {
                let _ = file.write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// RFC 3339 in UTC, to the millisecond, without a date crate.
fn utc_timestamp(now: SystemTime) -> String {
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
}
