//! Plugin events: each CNI invocation sends one record to the node agent over a unix datagram
//! socket; the agent prints it on its stdout (so `kubectl logs` shows plugin activity) and counts
//! it.
//!
//! The plugin side must cost an ADD nothing and never fail it: without an agent it is one
//! `lstat` that finds nothing; with one it is an unbound, non-blocking `sendto` of one datagram.
//! A full queue drops the record (EAGAIN) rather than wait. Only a socket owned by root or by us
//! is sent to, so a file or a symlink planted at the path never receives our record.

use super::metrics;
use crate::cni::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where the agent listens and the plugin sends unless the netconf says otherwise (`eventsSocket`),
/// so neither needs configuring. Not in the plugin's state dir: that one must be private (0700,
/// never chmodded), and a DaemonSet's hostPath volume would create it 0755.
pub const DEFAULT_SOCKET: &str = "/var/run/intercept-cni-agent/events.sock";

/// A datagram larger than this is not ours; records are a few hundred bytes.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;
/// Bounds on what a record carries, so one stays well under `MAX_RECORD_BYTES`.
pub const MAX_WARNINGS: usize = 8;
pub const MAX_TEXT: usize = 1024;

/// Where a plugin invocation sends its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Socket(PathBuf),
    /// `"eventsSocket": ""`: send nothing.
    Off,
}

impl Default for Target {
    fn default() -> Self {
        Target::Socket(PathBuf::from(DEFAULT_SOCKET))
    }
}

/// The CNI verbs a record may name; anything else is refused by the agent (metric labels stay
/// bounded).
pub const VERBS: [&str; 6] = ["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
        }
    }
}

/// One invocation, as sent by the plugin (one JSON object per datagram; see README "Plugin
/// events").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Event {
    pub verb: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    pub outcome: Outcome,
    /// The CNI error code; 0 on success.
    pub code: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg: Option<String>,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub pid: u32,
}

impl Event {
    /// The verb as one of `VERBS`, if the record is one the agent accepts.
    pub fn checked_verb(&self) -> Option<&'static str> {
        let verb = VERBS.iter().copied().find(|v| *v == self.verb)?;
        let consistent = match self.outcome {
            Outcome::Ok => self.code == 0,
            Outcome::Error => (1..1000).contains(&self.code),
        };
        (consistent && self.duration_ms.is_finite() && self.duration_ms >= 0.0).then_some(verb)
    }
}

/// Cuts `text` to `MAX_TEXT` bytes on a character boundary.
pub fn bounded(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_string();
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// Sends `event` to the agent if one listens at `target`; every failure is silent (debug log):
/// the invocation's outcome never depends on the agent.
pub fn send(target: &Target, event: impl FnOnce() -> Event) {
    let Target::Socket(path) = target else {
        return;
    };
    if !is_agent_socket(path) {
        return;
    }
    let Ok(bytes) = serde_json::to_vec(&event()) else {
        return;
    };
    if let Err(e) = send_datagram(path, &bytes) {
        log::debug!("events: cannot send to {}: {e}", path.display());
    }
}

/// A socket (not a symlink, file or FIFO) owned by root or by us.
fn is_agent_socket(path: &Path) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return false;
    };
    let owner_ok = meta.uid() == 0 || meta.uid() == nix::unistd::geteuid().as_raw();
    meta.file_type().is_socket() && owner_ok
}

fn send_datagram(path: &Path, bytes: &[u8]) -> nix::Result<()> {
    use nix::sys::socket::{sendto, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
    let addr = UnixAddr::new(path)?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    sendto(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        bytes,
        &addr,
        MsgFlags::MSG_DONTWAIT,
    )
    .map(drop)
}

/// The agent's side: binds `path` (creating its directory 0700 when missing, never changing an
/// existing one; replacing a stale socket but nothing else), readable and writable by us only.
pub fn bind(path: &Path) -> Result<UnixDatagram> {
    let what = || format!("cannot listen for plugin events at {}", path.display());
    if let Some(dir) = path.parent() {
        // 0700: only root sends; and a --events-socket in the plugin's stateDir must leave it
        // private (the plugin never changes an existing directory's mode).
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(what(), e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if let Err(why) = replaceable_socket(path, &meta) {
                return Err(Error::io(what(), why));
            }
            std::fs::remove_file(path).map_err(|e| Error::io(what(), e))?
        }
        Ok(_) => return Err(Error::io(what(), "a file that is not a socket is there")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(what(), e)),
    }
    let socket = UnixDatagram::bind(path).map_err(|e| Error::io(what(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(what(), e))?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let _ = BOUND.set((path.to_path_buf(), meta.dev(), meta.ino()));
    }
    Ok(socket)
}

/// Whether the socket at `path` may be removed to bind ours: a stale one (nobody listens), or a
/// live datagram socket that looks like an earlier agent's (root's or ours, mode 0600). Any
/// other (containerd's or docker's stream socket, journald's 0666 datagram one) is another
/// program's, never removed.
fn replaceable_socket(path: &Path, meta: &std::fs::Metadata) -> std::result::Result<(), String> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let probe = || -> nix::Result<()> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(path)?)
    };
    let owner_ok = meta.uid() == 0 || meta.uid() == nix::unistd::geteuid().as_raw();
    match probe() {
        Err(nix::errno::Errno::ECONNREFUSED) => Ok(()),
        Ok(()) if owner_ok && meta.permissions().mode() & 0o7777 == 0o600 => Ok(()),
        Ok(()) => Err(format!(
            "another program's datagram socket is there (owner uid {}, mode {:o}); not removed",
            meta.uid(),
            meta.permissions().mode() & 0o7777
        )),
        Err(nix::errno::Errno::EPROTOTYPE) => {
            Err("another program's stream socket is there; not removed".into())
        }
        Err(e) => Err(format!(
            "a socket is there that cannot be probed ({e}); not removed"
        )),
    }
}

/// The socket file this process bound: its path, device and inode.
static BOUND: OnceLock<(PathBuf, u64, u64)> = OnceLock::new();

/// The agent's side, on exit: removes the socket file if it is still the one this process bound
/// (a newer agent may have bound its own there by now), so plugins stop sending to nobody.
pub fn unbind() {
    let Some((path, dev, ino)) = BOUND.get() else {
        return;
    };
    let still_ours = std::fs::symlink_metadata(path)
        .is_ok_and(|m| m.file_type().is_socket() && m.dev() == *dev && m.ino() == *ino);
    if still_ours {
        let _ = std::fs::remove_file(path);
    }
}

/// What the agent prints for one record: the record with the time it arrived.
#[derive(Serialize)]
struct Printed<'a> {
    time: String,
    #[serde(flatten)]
    event: &'a Event,
}

/// Receives records for ever: each valid one is counted and printed as one JSON line on stdout;
/// invalid ones are counted and logged. Successful STATUS and VERSION calls (runtimes poll them)
/// are counted but not printed.
pub fn relay(socket: UnixDatagram) {
    let mut buf = vec![0; MAX_RECORD_BYTES + 1];
    loop {
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("plugin events: {e}; no more events will be relayed");
                return;
            }
        };
        let parsed = (n <= MAX_RECORD_BYTES)
            .then(|| serde_json::from_slice::<Event>(&buf[..n]).ok())
            .flatten();
        let Some((event, verb)) = parsed.and_then(|e| e.checked_verb().map(|v| (e, v))) else {
            metrics::invalid_event();
            log::warn!("plugin events: ignoring an invalid record of {n} bytes");
            continue;
        };
        metrics::invocation(verb, event.outcome, event.code, event.duration_ms);
        let polled = matches!(verb, "STATUS" | "VERSION") && event.outcome == Outcome::Ok;
        if !polled {
            print_line(&event);
        }
    }
}

fn print_line(event: &Event) {
    let printed = Printed {
        time: crate::logging::utc_timestamp(std::time::SystemTime::now()),
        event,
    };
    if let Ok(mut line) = serde_json::to_vec(&printed) {
        line.push(b'\n');
        let mut out = std::io::stdout().lock();
        // A closed stdout loses the line, not the agent.
        let _ = out.write_all(&line).and_then(|()| out.flush());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> Event {
        Event {
            verb: "ADD".into(),
            namespace: Some("default".into()),
            pod: Some("web-0".into()),
            container_id: Some("abc".into()),
            outcome: Outcome::Error,
            code: 5,
            msg: Some("no netns".into()),
            duration_ms: 1.5,
            backend: None,
            policy: None,
            warnings: vec!["careful".into()],
            pid: 42,
        }
    }

    #[test]
    fn a_record_reaches_a_listening_socket_as_one_json_object() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(&Target::Socket(path.clone()), event);
        let mut buf = vec![0; MAX_RECORD_BYTES];
        let n = listener.recv(&mut buf).unwrap();
        let got: Event = serde_json::from_slice(&buf[..n]).unwrap();
        assert_eq!(got, event());
        assert_eq!(got.checked_verb(), Some("ADD"));
    }

    #[test]
    fn nothing_but_a_socket_receives_and_no_agent_costs_no_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let real = dir.path().join("real.sock");
        let listener = UnixDatagram::bind(&real).unwrap();
        listener.set_nonblocking(true).unwrap();
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        for path in [file.clone(), link, dir.path().join("missing.sock")] {
            send(&Target::Socket(path), || {
                panic!("built a record for a non-socket")
            });
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"");
        let mut buf = [0; 64];
        assert!(listener.recv(&mut buf).is_err(), "the symlink was followed");
        send(&Target::Off, || panic!("built a record with events off"));
    }

    #[test]
    fn a_full_queue_drops_records_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.sock");
        let _listener = UnixDatagram::bind(&path).unwrap();
        let started = std::time::Instant::now();
        for _ in 0..10_000 {
            send(&Target::Socket(path.clone()), event);
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn the_agent_binds_in_a_private_dir_and_replaces_only_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/events.sock");
        let socket = bind(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("new")), 0o700);
        assert_eq!(mode(&path), 0o600);
        drop(socket);
        let again = bind(&path).expect("a stale socket is replaced");
        drop(again);
        let file = dir.path().join("file.sock");
        std::fs::write(&file, "precious").unwrap();
        assert!(bind(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    }

    #[test]
    fn inconsistent_records_are_refused() {
        let mut e = event();
        e.code = 0;
        assert_eq!(e.checked_verb(), None);
        let mut e = event();
        e.verb = "ADD\nforged".into();
        assert_eq!(e.checked_verb(), None);
        let mut e = event();
        e.duration_ms = f64::NAN;
        assert_eq!(e.checked_verb(), None);
        assert!(serde_json::from_str::<Event>(r#"{"verb":"ADD","extra":1}"#).is_err());
        assert_eq!(bounded(&"é".repeat(MAX_TEXT)).len(), MAX_TEXT + 3);
    }
}
