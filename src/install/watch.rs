//! `install --watch`: install, then keep our entry in the active network while other agents
//! rewrite the conf dir; on SIGTERM or SIGINT, uninstall and return.
//!
//! inotify and signalfd come from nix, already a dependency: one thread polls both fds, so a
//! signal can never interrupt a write half-way, and no extra crate (notify, signal-hook) is needed
//! for what is Linux-only anyway.

use super::{conflist, content_hash, fsops, uninstall, Installed, Installer};
use crate::agent::metrics::{self, Pass};
use crate::cni::error::{Error, Result};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::AsFd;

/// Quiet time after the last event before acting: an agent often removes, writes and renames in
/// quick succession, and one pass over the settled dir is enough.
const SETTLE_MS: u16 = 100;

/// Files replaced or removed, and the dir itself going away. Not IN_MODIFY or IN_CREATE: a file
/// being written in place is read once it is closed (IN_CLOSE_WRITE).
fn watched_events() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

enum Wake {
    Stop(Signal),
    ConfDirChanged,
}

pub fn run(installer: &Installer) -> Result<()> {
    // Both are set up before the first pass so that no change or signal after it is missed.
    let signals = block_stop_signals()?;
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| Error::io("cannot start inotify", e))?;
    inotify
        .add_watch(&installer.conf_dir, watched_events())
        .map_err(|e| Error::io(format!("cannot watch {}", installer.conf_dir.display()), e))?;

    // A failing first pass ends the run: a DaemonSet pod in a crash loop is seen at once.
    let mut last = installer
        .install()
        .inspect_err(|_| metrics::pass(Pass::Failed))?;
    log_waiting_if_none(installer, &last);
    loop {
        match wait(&signals, &inotify)? {
            Wake::Stop(signal) => {
                log::info!("{signal}: removing {}", conflist::PLUGIN_TYPE);
                return uninstall(&installer.conf_dir, &installer.bin_dir);
            }
            Wake::ConfDirChanged => {}
        }
        if is_unchanged(installer, last.as_ref()) {
            continue;
        }
        last = match installer.install() {
            Ok(installed) => {
                log_waiting_if_none(installer, &installed);
                installed
            }
            Err(e) => {
                metrics::pass(Pass::Failed);
                log::error!("{e}; trying again at the next change");
                None
            }
        };
    }
}

fn log_waiting_if_none(installer: &Installer, installed: &Option<Installed>) {
    metrics::pass(if installed.is_some() {
        Pass::Chained
    } else {
        Pass::Waiting
    });
    if installed.is_none() {
        log::info!(
            "no valid CNI network config in {} yet: waiting for one",
            installer.conf_dir.display()
        );
    }
}

/// True when the active network is still the file of our last pass, byte for byte: the events
/// were our own writes, or touched files that do not matter.
fn is_unchanged(installer: &Installer, last: Option<&Installed>) -> bool {
    let Some(last) = last else {
        return false;
    };
    let Ok(files) = fsops::read_conf_dir(&installer.conf_dir) else {
        return false;
    };
    let (Some(active), _) = conflist::active_network(&files) else {
        return false;
    };
    active.file_name == last.file_name
        && files
            .iter()
            .find(|f| f.name == last.file_name)
            .is_some_and(|f| content_hash(&f.bytes) == last.content_hash)
}

fn block_stop_signals() -> Result<SignalFd> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // Blocked signals stay pending for the signalfd, even when we run as PID 1 in a container.
    set.thread_block()
        .map_err(|e| Error::io("cannot block SIGTERM and SIGINT", e))?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| Error::io("cannot create signalfd", e))
}

/// Blocks until a stop signal, or until a relevant change in the conf dir has settled.
fn wait(signals: &SignalFd, inotify: &Inotify) -> Result<Wake> {
    let mut changed = false;
    loop {
        // Wait without end for a first event, then only while events keep coming.
        let timeout = if changed {
            PollTimeout::from(SETTLE_MS)
        } else {
            PollTimeout::NONE
        };
        let mut fds = [
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(0) => return Ok(Wake::ConfDirChanged),
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::io("cannot poll", e)),
        }
        if let Some(signal) = read_stop_signal(signals)? {
            return Ok(Wake::Stop(signal));
        }
        changed |= drain_events(inotify)?;
    }
}

fn read_stop_signal(signals: &SignalFd) -> Result<Option<Signal>> {
    match signals.read_signal() {
        Ok(Some(info)) => Ok(i32::try_from(info.ssi_signo)
            .ok()
            .and_then(|n| Signal::try_from(n).ok())),
        Ok(None) => Ok(None),
        Err(e) => Err(Error::io("cannot read signalfd", e)),
    }
}

/// Reads every queued event; true if one may change the active network.
fn drain_events(inotify: &Inotify) -> Result<bool> {
    let mut relevant = false;
    loop {
        let events = match inotify.read_events() {
            Ok(events) => events,
            Err(Errno::EAGAIN) => return Ok(relevant),
            Err(e) => return Err(Error::io("cannot read inotify events", e)),
        };
        for event in events {
            if event.mask.intersects(
                AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_MOVE_SELF
                    | AddWatchFlags::IN_IGNORED,
            ) {
                return Err(Error::io(
                    "the CNI conf dir",
                    "removed or moved while watched",
                ));
            }
            // After an overflow the lost events could be anything.
            let matters = event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
                || event
                    .name
                    .as_ref()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| conflist::FileKind::of(n).is_some());
            relevant |= matters;
        }
    }
}
