//! `install --watch`: keep everything the installer owns in place until SIGTERM or SIGINT: our
//! entry in the active network (another agent rewrites it), our binary in the bin dir (deleted
//! or replaced), and the plugin config (a ConfigMap update swaps its `..data` symlink).
//!
//! - Every relevant change triggers a full pass that reads the conf dir again and writes only
//!   what differs, so its own writes end in a pass that changes nothing (no "last hash" to trust).
//! - A failed pass is retried with backoff (0.5 s doubling to 30 s) even without a new event.
//! - A watched dir removed (or replaced) is looked for with the same backoff and watched again
//!   once it is back, our lock re-made in a new conf dir.
//! - A plugin config the plugin would refuse is not chained: the last good entry stays (the one
//!   this process loaded, or the one already on the node), and the state says not ready.
//! - On SIGTERM or SIGINT the entry and binary stay (a rolling update must not open a window in
//!   which new pods start unintercepted); `--uninstall-on-exit` removes them, but only while the
//!   entry is still this installer's own (a newer installer may own it by then).
//!
//! inotify and signalfd come from nix: one thread polls both fds, so a signal never interrupts a
//! write half-way, and no extra crate (notify, signal-hook) is needed for what is Linux-only.

use super::conflist::{self, Entry, Stamp, PLUGIN_TYPE};
use super::{fsops, load_plugin_config, uninstall, Installer, Pass, SELF_EXE};
use crate::agent::{self, metrics};
use crate::cni::error::{Error, Result};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde_json::{Map, Value};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// Quiet time after the last event before acting: an agent often removes, writes and renames in
/// quick succession, and one pass over the settled dir is enough.
const SETTLE: Duration = Duration::from_millis(100);
const MAX_SETTLE: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct Options {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub plugin_config: Option<PathBuf>,
    pub stamp: Stamp,
    pub uninstall_on_exit: bool,
}

/// Where the watch loop stands after its last pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Starting,
    /// Our entry is last in the active network and our binary is in place.
    Installed,
    /// No valid network config in the conf dir yet.
    Waiting,
    /// A newer installer's entry is in place; this one leaves the node to it.
    Superseded,
    /// The plugin config is refused: the last good entry is kept, nothing new is chained.
    ConfigRefused,
    /// The last pass failed; retried with backoff.
    Failing,
}

static STATE: AtomicU8 = AtomicU8::new(State::Starting as u8);

/// The watch loop's state, for whoever reports readiness from this process.
pub fn state() -> State {
    State::from_u8(STATE.load(Ordering::Relaxed))
}

impl State {
    fn from_u8(value: u8) -> State {
        [
            State::Installed,
            State::Waiting,
            State::Superseded,
            State::ConfigRefused,
            State::Failing,
        ]
        .into_iter()
        .find(|s| *s as u8 == value)
        .unwrap_or(State::Starting)
    }
}

/// Every pass ends here: the one place that logs its outcome and publishes the state.
fn report(outcome: &Result<Pass>, config_refused: bool) -> State {
    let state = match outcome {
        Err(e) => {
            log::error!("install pass failed: {e}; retrying with backoff");
            State::Failing
        }
        Ok(Pass::Waiting) => State::Waiting,
        Ok(Pass::Superseded { .. }) => State::Superseded,
        Ok(Pass::Installed { .. }) if config_refused => State::ConfigRefused,
        Ok(Pass::Installed { .. }) => State::Installed,
    };
    metrics::pass(match state {
        State::Installed | State::Superseded => metrics::Pass::Chained,
        State::Waiting | State::Starting => metrics::Pass::Waiting,
        State::ConfigRefused | State::Failing => metrics::Pass::Failed,
    });
    let previous = State::from_u8(STATE.swap(state as u8, Ordering::Relaxed));
    // Pods started while the plugin was not chained are repaired now, not at the next interval.
    let chained_now = matches!(outcome, Ok(Pass::Installed { wrote: true, .. }));
    if state == State::Installed && (previous != State::Installed || chained_now) {
        agent::repair::request();
    }
    if previous != state {
        match outcome {
            Ok(Pass::Waiting) => log::info!("no valid CNI network config yet: waiting for one"),
            Ok(Pass::Superseded { file_name, by }) => log::warn!(
                "{file_name} holds the entry of a newer installer (generation {}, started {}): \
                 leaving entry and binary to it",
                by.generation,
                by.started
            ),
            _ => {}
        }
    }
    state
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// Which dir an inotify watch is on.
enum Role {
    Conf,
    Bin,
    Config,
}

/// One inotify watch, and the dir it was put on: a dir removed (or replaced) while watched is
/// watched again once it is back, instead of being silently no longer watched.
struct Watch {
    /// `None` while the dir is missing (the agent may start before it exists).
    wd: Option<WatchDescriptor>,
    role: Role,
    dir: PathBuf,
    events: AddWatchFlags,
    identity: Option<(u64, u64)>,
}

impl Watch {
    fn new(inotify: &Inotify, dir: &Path, events: AddWatchFlags, role: Role) -> Watch {
        let identity = identity(dir);
        let wd = match identity {
            Some(_) => add_watch(inotify, dir, events)
                .map_err(|e| log::warn!("{e}: waiting for a directory there"))
                .ok(),
            None => {
                log::warn!("{} does not exist yet: waiting for it", dir.display());
                None
            }
        };
        Watch {
            wd,
            role,
            dir: dir.to_path_buf(),
            events,
            identity,
        }
    }

    /// Not watching the dir at its path: missing, or replaced since the watch was put on it.
    fn stale(&self) -> bool {
        self.wd.is_none() || identity(&self.dir) != self.identity
    }

    /// Watches the dir again if it is not watched at its path; whether it did. A dir made
    /// again can have the inode number of the removed one: the kernel's IN_IGNORED (the watch
    /// is gone) is what tells, not the identity alone.
    fn renew(&mut self, inotify: &Inotify) -> bool {
        let now = identity(&self.dir);
        if now.is_none() || (self.wd.is_some() && now == self.identity) {
            return false;
        }
        match add_watch(inotify, &self.dir, self.events) {
            Ok(wd) => {
                log::info!("{} is back: watching it again", self.dir.display());
                (self.wd, self.identity) = (Some(wd), now);
                true
            }
            Err(e) => {
                log::warn!("{e}");
                false
            }
        }
    }
}

fn identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

enum Wake {
    Stop(Signal),
    /// Something we own changed; `config`: the plugin config may have.
    Changed {
        config: bool,
    },
    /// The backoff after a failed pass ran out.
    Retry,
}

/// `signals`: from `block_stop_signals`, called before any other thread is started (a thread
/// with the signals unblocked would take SIGTERM's default action: death without a word).
pub fn run(options: &Options, signals: SignalFd) -> Result<()> {
    // Set up before the first pass so that no change after it is missed.
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(|e| Error::io("cannot start inotify", e))?;
    let mut watches = vec![
        Watch::new(&inotify, &options.conf_dir, conf_events(), Role::Conf),
        Watch::new(&inotify, &options.bin_dir, bin_events(), Role::Bin),
    ];
    if let Some(dir) = options.plugin_config.as_deref().and_then(Path::parent) {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        watches.push(Watch::new(&inotify, dir, config_events(), Role::Config));
    }

    // Held while we run: others tell our entry from one of an installer that is gone.
    let lock = fsops::lock_path(
        &options.conf_dir,
        options.stamp.generation,
        options.stamp.started,
    );
    let mut held = fsops::hold_lock(&lock)
        .map_err(|e| log::warn!("{e}: taken once the conf dir exists"))
        .ok();
    let outcome = watch(options, &signals, &inotify, &mut watches, &lock, &mut held);
    let _ = std::fs::remove_file(&lock);
    outcome
}

fn watch(
    options: &Options,
    signals: &SignalFd,
    inotify: &Inotify,
    watches: &mut [Watch],
    lock: &Path,
    held: &mut Option<std::fs::File>,
) -> Result<()> {
    let mut installer = None;
    let mut config_refused = reload(options, &mut installer);
    let mut backoff = None;
    loop {
        // Before the pass, so that no change after it is missed.
        for watch in watches.iter_mut() {
            if watch.renew(inotify) {
                match watch.role {
                    // A new conf dir lacks our lock: without it our entry looks abandoned.
                    Role::Conf => match fsops::hold_lock(lock) {
                        Ok(file) => *held = Some(file),
                        Err(e) => log::warn!("{e}"),
                    },
                    Role::Config => config_refused = reload(options, &mut installer),
                    Role::Bin => {}
                }
            }
        }
        let outcome = match &installer {
            Some(installer) => installer.install(),
            None => keep_binary_of_entry(options),
        };
        let state = report(&outcome, config_refused);
        // A watched dir still gone is looked for again, like a failed pass.
        let unwatched = watches.iter().any(Watch::stale);
        backoff = (state == State::Failing || unwatched)
            .then(|| backoff.map_or(FIRST_BACKOFF, |b: Duration| (b * 2).min(MAX_BACKOFF)));
        match wait(signals, inotify, watches, backoff)? {
            Wake::Stop(signal) => return stop(options, signal),
            Wake::Changed { config: true } => config_refused = reload(options, &mut installer),
            Wake::Changed { config: false } | Wake::Retry => {}
        }
    }
}

/// Loads the plugin config into `installer`; true when it is refused (the old one stays).
fn reload(options: &Options, installer: &mut Option<Installer>) -> bool {
    let config: Map<String, Value> = match load_plugin_config(options.plugin_config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            log::error!(
                "{e}; not chaining it: the last good entry stays in place until the config is fixed"
            );
            return true;
        }
    };
    if installer.as_ref().is_some_and(|i| i.entry.config == config) {
        return false;
    }
    if installer.is_some() {
        log::info!("plugin config changed: chaining the new one");
    }
    *installer = Some(Installer {
        conf_dir: options.conf_dir.clone(),
        bin_dir: options.bin_dir.clone(),
        entry: Entry {
            config,
            stamp: options.stamp,
        },
        restamp: true,
        binary: PathBuf::from(SELF_EXE),
    });
    false
}

/// With no valid config loaded yet, the conf dir is left alone; but a network already naming
/// our plugin must not lose its binary.
fn keep_binary_of_entry(options: &Options) -> Result<Pass> {
    let files = fsops::read_conf_dir(&options.conf_dir)?;
    let Some(network) = conflist::active_network(&files).0 else {
        return Ok(Pass::Waiting);
    };
    let binary_copied = conflist::chains_us_last(&network)
        && fsops::mode_of(&options.bin_dir.join(PLUGIN_TYPE))?.is_none()
        && fsops::install_binary(Path::new(SELF_EXE), &options.bin_dir, PLUGIN_TYPE)?;
    Ok(Pass::Installed {
        file_name: network.file_name,
        wrote: false,
        binary_copied,
    })
}

fn stop(options: &Options, signal: Signal) -> Result<()> {
    if options.uninstall_on_exit {
        log::info!("{signal}: removing {PLUGIN_TYPE} (--uninstall-on-exit)");
        return uninstall(&options.conf_dir, &options.bin_dir, Some(options.stamp));
    }
    log::info!(
        "{signal}: leaving {PLUGIN_TYPE} chained and installed, so that pods starting before the \
         next installer are intercepted; `intercept-cni uninstall` removes it for good"
    );
    Ok(())
}

fn add_watch(inotify: &Inotify, dir: &Path, events: AddWatchFlags) -> Result<WatchDescriptor> {
    // IN_MASK_ADD: two roles on one dir (a config next to the conf dir) keep both masks.
    inotify
        .add_watch(dir, events | AddWatchFlags::IN_ONLYDIR | mask_add())
        .map_err(|e| Error::io(format!("cannot watch {}", dir.display()), e))
}

/// nix 0.29 lacks the flag; its value is Linux's.
fn mask_add() -> AddWatchFlags {
    AddWatchFlags::from_bits_retain(nix::libc::IN_MASK_ADD)
}

/// Files replaced or removed, and the dir itself going away. Not IN_MODIFY or IN_CREATE: a file
/// being written in place is read once it is closed (IN_CLOSE_WRITE).
fn conf_events() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
}

/// Our binary also when only its mode changes.
fn bin_events() -> AddWatchFlags {
    conf_events() | AddWatchFlags::IN_ATTRIB
}

/// A ConfigMap update creates a new `..data` symlink and renames it over the old one.
fn config_events() -> AddWatchFlags {
    conf_events() | AddWatchFlags::IN_CREATE
}

/// Blocks SIGTERM and SIGINT in this thread (and the threads it starts after) and returns the
/// signalfd that receives them.
pub fn block_stop_signals() -> Result<SignalFd> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // Blocked signals stay pending for the signalfd, even when we run as PID 1 in a container.
    set.thread_block()
        .map_err(|e| Error::io("cannot block SIGTERM and SIGINT", e))?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| Error::io("cannot create signalfd", e))
}

/// Blocks until a stop signal, a relevant change that has settled, or the end of `backoff`.
fn wait(
    signals: &SignalFd,
    inotify: &Inotify,
    watches: &mut [Watch],
    backoff: Option<Duration>,
) -> Result<Wake> {
    let retry_at = backoff.map(|b| Instant::now() + b);
    let mut changed: Option<bool> = None;
    let mut act_by = None;
    loop {
        // Without a change: until the first event or the retry; after one, while events come,
        // but not longer than MAX_SETTLE (a writer that never pauses must not starve us).
        let timeout = match (changed, retry_at) {
            (Some(_), _) => {
                let left = act_by.map_or(SETTLE, |at: Instant| {
                    at.saturating_duration_since(Instant::now())
                });
                Some(left.min(SETTLE))
            }
            (None, Some(at)) => Some(at.saturating_duration_since(Instant::now())),
            (None, None) => None,
        };
        let timeout = timeout.map_or(PollTimeout::NONE, |t| {
            PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX)
        });
        let mut fds = [
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(0) => {
                return Ok(match changed {
                    Some(config) => Wake::Changed { config },
                    None => Wake::Retry,
                })
            }
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::io("cannot poll", e)),
        }
        if let Some(signal) = read_stop_signal(signals)? {
            return Ok(Wake::Stop(signal));
        }
        if let Some(config) = drain_events(inotify, watches)? {
            changed = Some(changed.unwrap_or(false) | config);
            act_by.get_or_insert_with(|| Instant::now() + MAX_SETTLE);
        }
        if changed.is_some() && act_by.is_some_and(|at| Instant::now() >= at) {
            return Ok(Wake::Changed {
                config: changed.unwrap_or(false),
            });
        }
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

/// Reads every queued event; `Some(config)` if one may matter (`config`: the plugin config's).
fn drain_events(inotify: &Inotify, watches: &mut [Watch]) -> Result<Option<bool>> {
    let mut relevant: Option<bool> = None;
    loop {
        let events = match inotify.read_events() {
            Ok(events) => events,
            Err(Errno::EAGAIN) => return Ok(relevant),
            Err(e) => return Err(Error::io("cannot read inotify events", e)),
        };
        for event in events {
            if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                // The lost events could be anything.
                relevant = Some(true);
                continue;
            }
            let name = event.name.as_ref().and_then(|n| n.to_str());
            for watch in watches.iter_mut().filter(|w| w.wd == Some(event.wd)) {
                let role = watch.role;
                if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The kernel dropped the watch (its dir is gone): put a new one on the dir
                    // at this path once there is one, whatever its inode number.
                    watch.wd = None;
                }
                if event.mask.intersects(
                    AddWatchFlags::IN_DELETE_SELF
                        | AddWatchFlags::IN_MOVE_SELF
                        | AddWatchFlags::IN_IGNORED,
                ) {
                    // The pass fails until the dir is back (retried with backoff); then it is
                    // watched again.
                    log::warn!("{} was removed or moved while watched", watch.dir.display());
                    relevant = Some(relevant.unwrap_or(false) | (role == Role::Config));
                    continue;
                }
                let (matters, config) = match role {
                    Role::Conf => (
                        name.is_some_and(|n| conflist::FileKind::of(n).is_some()),
                        false,
                    ),
                    Role::Bin => (name == Some(PLUGIN_TYPE), false),
                    Role::Config => (true, true),
                };
                if matters {
                    relevant = Some(relevant.unwrap_or(false) | config);
                }
            }
        }
    }
}
