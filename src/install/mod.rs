//! The node installer: chain the plugin into the active CNI network config and keep it there.
//!
//! `intercept-cni install --cni-conf-dir DIR --cni-bin-dir DIR [--plugin-config FILE] [--watch]
//! [--generation N] [--uninstall-on-exit]` validates the plugin config with the plugin's own
//! parser, copies the running binary into the bin dir, then appends our entry last to the active
//! network (see `conflist` for which file that is). `--watch` keeps entry, binary and config in
//! step until SIGTERM or SIGINT, and then leaves them in place (see `watch`).
//! `intercept-cni uninstall --cni-conf-dir DIR --cni-bin-dir DIR` removes every `intercept-cni`
//! entry from the conflists of the conf dir, then the binary, unless an entry it could not
//! remove still names it: a network pointing at a missing binary would fail every pod. A
//! conflist that install made from a `.conf` becomes that `.conf` again, byte for byte.

pub mod conflist;
mod deep_json;
pub mod fsops;
pub mod splice;
pub mod watch;

use crate::agent;
use crate::cni::error::{Code, Error, Result};
use conflist::{ConfFile, Entry, Network, Plan, Stamp, Uninstall, PLUGIN_TYPE};
use fsops::Commit;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// The running executable: still readable through this link if its file was replaced.
pub const SELF_EXE: &str = "/proc/self/exe";

/// Exit status for a bad command line, as distinct from a failed install.
const EXIT_USAGE: i32 = 2;

/// How often a pass plans again after another agent changed a file under it.
const CONFLICT_RETRIES: usize = 8;

/// What one install pass found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// No valid network config yet; nothing was changed.
    Waiting,
    /// Our entry is last in the active file (`wrote`: this pass put it there).
    Installed {
        file_name: String,
        wrote: bool,
        binary_copied: bool,
    },
    /// A higher-stamped installer's entry is in the active file: left to it.
    Superseded { file_name: String, by: Stamp },
}

/// Everything install needs, validated.
pub struct Installer {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub entry: Entry,
    /// Rewrite an entry of the same config but a lower stamp (a watcher claims the entry).
    pub restamp: bool,
    /// The binary to copy into the bin dir.
    pub binary: PathBuf,
}

impl Installer {
    /// One install pass: plans from what it reads and writes only if nothing changed since;
    /// after a conflict it reads again.
    pub fn install(&self) -> Result<Pass> {
        for _ in 0..CONFLICT_RETRIES {
            if let Some(pass) = self.try_install()? {
                return Ok(pass);
            }
            log::info!("the conf dir changed while installing: reading it again");
        }
        Err(Error::new(
            Code::TryAgainLater,
            format!(
                "{} kept changing under {CONFLICT_RETRIES} install attempts",
                self.conf_dir.display()
            ),
        ))
    }

    /// `None`: another writer changed a file first.
    fn try_install(&self) -> Result<Option<Pass>> {
        let plan = match self.plan()? {
            (_, None) => return Ok(Some(Pass::Waiting)),
            (_, Some(Plan::Superseded { file_name, by })) => {
                // Its binary is the winner's to keep; only a missing one is put back.
                if fsops::mode_of(&self.bin_dir.join(PLUGIN_TYPE))?.is_none() {
                    self.install_binary()?;
                }
                return Ok(Some(Pass::Superseded { file_name, by }));
            }
            (_, Some(Plan::Unchanged { file_name })) => {
                return Ok(Some(Pass::Installed {
                    file_name,
                    wrote: false,
                    binary_copied: self.install_binary()?,
                }))
            }
            (_, Some(Plan::Write(plan))) => plan,
        };
        // The binary before the config: a network naming our plugin must never exist without it.
        let binary_copied = self.install_binary()?;
        // Planned again from a fresh read, so that the copy is not part of the window in which
        // another agent's write makes us start over.
        let (files, Some(Plan::Write(again))) = self.plan()? else {
            return Ok(None);
        };
        if again.file_name != plan.file_name {
            return Ok(None);
        }
        let plan = again;
        let existing = files.iter().find(|f| f.name == plan.file_name);
        let mode_source = plan.replaces.as_deref().unwrap_or(&plan.file_name);
        let mode =
            fsops::mode_of(&self.conf_dir.join(mode_source))?.unwrap_or(fsops::NEW_CONFIG_MODE);
        let written = fsops::commit(
            &self.conf_dir,
            &plan.file_name,
            existing,
            &plan.content,
            mode,
        )?;
        if written == Commit::Conflict {
            return Ok(None);
        }
        agent::metrics::conflist_written();
        if let Some(replaced) = files
            .iter()
            .find(|f| Some(&f.name) == plan.replaces.as_ref())
        {
            if fsops::remove_unchanged(&self.conf_dir, replaced)? {
                log::info!("converted {} to {}", replaced.name, plan.file_name);
            }
        }
        log::info!("chained {PLUGIN_TYPE} last in {}", plan.file_name);
        Ok(Some(Pass::Installed {
            file_name: plan.file_name,
            wrote: true,
            binary_copied,
        }))
    }

    /// The conf dir as read now, and what to do with it (`None`: no network yet).
    fn plan(&self) -> Result<(Vec<ConfFile>, Option<Plan>)> {
        let files = fsops::read_conf_dir(&self.conf_dir)?;
        let Some(network) = active_network_logged(&files) else {
            return Ok((files, None));
        };
        let live = |stamp: Stamp| {
            fsops::is_locked(&fsops::lock_path(
                &self.conf_dir,
                stamp.generation,
                stamp.started,
            ))
        };
        let plan = conflist::plan_install(&network, &files, &self.entry, self.restamp, &live)?;
        Ok((files, Some(plan)))
    }

    fn install_binary(&self) -> Result<bool> {
        let copied = fsops::install_binary(&self.binary, &self.bin_dir, PLUGIN_TYPE)?;
        if copied {
            agent::metrics::binary_written();
            log::info!("copied {PLUGIN_TYPE} to {}", self.bin_dir.display());
        }
        Ok(copied)
    }
}

fn active_network_logged(files: &[ConfFile]) -> Option<Network> {
    let (network, skipped) = conflist::active_network(files);
    for (name, why) in skipped {
        log::warn!("skipping {name}: {why}");
    }
    network
}

/// For readiness: whether the runtime's active network in `conf_dir` chains our plugin last
/// (and once).
pub fn entry_is_active(conf_dir: &Path) -> Result<bool> {
    let files = fsops::read_conf_dir(conf_dir)?;
    Ok(conflist::active_network(&files)
        .0
        .is_some_and(|n| conflist::chains_us_last(&n)))
}

/// For readiness: whether `bin_dir` holds the binary we run, byte for byte and executable.
pub fn binary_is_current(bin_dir: &Path) -> Result<bool> {
    fsops::binary_matches(Path::new(SELF_EXE), bin_dir, PLUGIN_TYPE)
}

/// Removes our entries from every conflist of `conf_dir` (`only`: only entries carrying this
/// stamp), then our binary from `bin_dir` unless a network still names it. Keeps going after
/// a failure and reports them all.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path, only: Option<Stamp>) -> Result<()> {
    let mut errors = Vec::new();
    let mut still_named = false;
    match fsops::read_conf_dir(conf_dir) {
        Ok(files) => {
            for file in &files {
                match remove_entry(conf_dir, file, only) {
                    Ok(true) => {}
                    Ok(false) => still_named |= names_us(file),
                    Err(e) => {
                        still_named = true;
                        errors.push(e);
                    }
                }
            }
        }
        Err(e) => errors.push(e),
    }
    if still_named {
        log::warn!(
            "a network in {} still names {PLUGIN_TYPE}: keeping {} so that its pods keep starting",
            conf_dir.display(),
            bin_dir.join(PLUGIN_TYPE).display()
        );
    } else {
        match fsops::remove(bin_dir, PLUGIN_TYPE) {
            Ok(true) => log::info!("removed {PLUGIN_TYPE} from {}", bin_dir.display()),
            Ok(false) => {}
            Err(e) => errors.push(e),
        }
    }
    Error::collect(errors).map_or(Ok(()), Err)
}

/// Whether a loadable network in `file` names our plugin.
fn names_us(file: &ConfFile) -> bool {
    conflist::load_network(file).is_ok_and(|n| {
        n.doc.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
            || n.doc
                .get("plugins")
                .and_then(Value::as_array)
                .is_some_and(|p| p.iter().any(|p| p["type"] == PLUGIN_TYPE))
    })
}

/// Removes our entries from `file`; false when it holds none to remove (or not ours to).
fn remove_entry(conf_dir: &Path, file: &ConfFile, only: Option<Stamp>) -> Result<bool> {
    let mut file = file.clone();
    for _ in 0..CONFLICT_RETRIES {
        let Some(plan) = conflist::plan_uninstall(&file, only)? else {
            return Ok(false);
        };
        let mode = fsops::mode_of(&conf_dir.join(&file.name))?.unwrap_or(fsops::NEW_CONFIG_MODE);
        match plan {
            Uninstall::Rewrite(content) => {
                if fsops::commit(conf_dir, &file.name, Some(&file), &content, mode)?
                    == Commit::Written
                {
                    log::info!("removed {PLUGIN_TYPE} from {}", file.name);
                    return Ok(true);
                }
            }
            Uninstall::Restore { name, content } => {
                // The single-plugin file first (never over one the primary agent wrote again),
                // then our conflist: at no moment is there no network.
                if fsops::commit(conf_dir, &name, None, &content, mode)? == Commit::Written {
                    log::info!("restored {name}, from which {} was made", file.name);
                }
                if fsops::remove_unchanged(conf_dir, &file)? {
                    log::info!("removed {}, made by install", file.name);
                    return Ok(true);
                }
            }
        }
        match fsops::read_conf_dir(conf_dir)?
            .into_iter()
            .find(|f| f.name == file.name)
        {
            Some(again) => file = again,
            None => return Ok(false),
        }
    }
    Err(Error::new(
        Code::TryAgainLater,
        format!("{} kept changing while removing our entry", file.name),
    ))
}

#[derive(Debug, PartialEq, Eq)]
struct Args {
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    plugin_config: Option<PathBuf>,
    watch: bool,
    generation: u64,
    uninstall_on_exit: bool,
}

/// Parses the words after the subcommand; `install_flags` allows the flags of `install`.
fn parse_args(words: &[String], install_flags: bool) -> std::result::Result<Args, String> {
    let mut conf_dir = None;
    let mut bin_dir = None;
    let mut plugin_config = None;
    let mut generation = None;
    let mut watch = false;
    let mut uninstall_on_exit = false;
    let mut words = words.iter();
    while let Some(word) = words.next() {
        let (flag, inline) = match word.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_owned())),
            None => (word.as_str(), None),
        };
        let switch = match flag {
            "--watch" if install_flags => Some(&mut watch),
            "--uninstall-on-exit" if install_flags => Some(&mut uninstall_on_exit),
            _ => None,
        };
        if let Some(switch) = switch {
            if inline.is_some() {
                return Err(format!("{flag} takes no value"));
            }
            *switch = true;
            continue;
        }
        let slot = match flag {
            "--cni-conf-dir" => &mut conf_dir,
            "--cni-bin-dir" => &mut bin_dir,
            "--plugin-config" if install_flags => &mut plugin_config,
            "--generation" if install_flags => &mut generation,
            _ => return Err(format!("unexpected argument {word:?}")),
        };
        let value = inline
            .or_else(|| words.next().cloned())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("{flag} needs a value"))?;
        if slot.replace(value).is_some() {
            return Err(format!("{flag} given twice"));
        }
    }
    let generation = match generation {
        None => 0,
        Some(g) => g
            .parse()
            .map_err(|_| format!("--generation {g:?}: not a non-negative integer"))?,
    };
    Ok(Args {
        conf_dir: conf_dir.ok_or("--cni-conf-dir is required")?.into(),
        bin_dir: bin_dir.ok_or("--cni-bin-dir is required")?.into(),
        plugin_config: plugin_config.map(PathBuf::from),
        watch,
        generation,
        uninstall_on_exit,
    })
}

/// `intercept-cni install ...`; `words` are the arguments after the subcommand.
pub fn install_main(words: &[String]) -> i32 {
    init_logging();
    let (agent_options, words) = match agent::Options::extract(words) {
        Ok(extracted) => extracted,
        Err(why) => return usage_error("install", &why),
    };
    let args = match parse_args(&words, true) {
        Ok(args) => args,
        Err(why) => return usage_error("install", &why),
    };
    if args.uninstall_on_exit && !args.watch {
        return usage_error("install", "--uninstall-on-exit needs --watch");
    }
    if agent_options.given && !args.watch {
        return usage_error(
            "install",
            "--listen, --events-socket, --host-root, --repair-interval and --cri-socket need --watch",
        );
    }
    // The agent may start before the runtime's dirs exist: it waits, not ready, for them.
    let dirs = match check_dirs(&args) {
        Err(e) if args.watch => {
            log::warn!("{e}: waiting for it");
            Ok(())
        }
        checked => checked,
    };
    let result = dirs.and_then(|()| {
        sweep(&args);
        let stamp = Stamp {
            generation: args.generation,
            started: now_micros(),
        };
        if args.watch {
            let options = watch::Options {
                conf_dir: args.conf_dir.clone(),
                bin_dir: args.bin_dir.clone(),
                plugin_config: args.plugin_config.clone(),
                stamp,
                uninstall_on_exit: args.uninstall_on_exit,
            };
            let signals = watch::block_stop_signals()?;
            agent::start(&agent_options, &options)?;
            let stopped = watch::run(&options, signals);
            agent::events::unbind();
            return stopped;
        }
        let installer = Installer {
            conf_dir: args.conf_dir.clone(),
            bin_dir: args.bin_dir.clone(),
            entry: Entry {
                config: load_plugin_config(args.plugin_config.as_deref())?,
                stamp,
            },
            restamp: false,
            binary: PathBuf::from(SELF_EXE),
        };
        match installer.install()? {
            Pass::Installed { .. } => Ok(()),
            Pass::Superseded { file_name, by } => {
                log::warn!("{file_name} holds the entry of a newer installer ({by:?}): left as is");
                Ok(())
            }
            Pass::Waiting => Err(Error::new(
                Code::TryAgainLater,
                format!(
                    "no valid CNI network config in {}: has the network provider started? \
                     (--watch waits for one)",
                    args.conf_dir.display()
                ),
            )),
        }
    });
    exit_status(result)
}

/// `intercept-cni uninstall ...`; `words` are the arguments after the subcommand.
pub fn uninstall_main(words: &[String]) -> i32 {
    init_logging();
    match parse_args(words, false) {
        Ok(args) => exit_status(check_dirs(&args).and_then(|()| {
            sweep(&args);
            uninstall(&args.conf_dir, &args.bin_dir, None)
        })),
        Err(why) => usage_error("uninstall", &why),
    }
}

fn check_dirs(args: &Args) -> Result<()> {
    for dir in [&args.conf_dir, &args.bin_dir] {
        if !dir.is_dir() {
            return Err(Error::io(dir.display(), "not a directory"));
        }
    }
    Ok(())
}

/// Temp files of interrupted runs go first, whatever process left them.
fn sweep(args: &Args) {
    fsops::sweep_temps(&args.conf_dir);
    fsops::sweep_temps(&args.bin_dir);
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Our entry's config from the operator's file (a regular file, through ConfigMap symlinks,
/// capped), validated as ADD would; the defaults without a file.
pub fn load_plugin_config(path: Option<&Path>) -> Result<Map<String, Value>> {
    let operator_json = match path {
        Some(path) => Some(
            fsops::read_capped(path, true, fsops::MAX_CONFIG_BYTES)
                .map(|(bytes, _)| bytes)
                .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?,
        ),
        None => None,
    };
    conflist::plugin_entry(operator_json.as_deref())
}

/// One line on stderr, pointing at the help.
fn usage_error(subcommand: &str, why: &str) -> i32 {
    eprintln!("intercept-cni {subcommand}: {why} (see `intercept-cni {subcommand} --help`)");
    EXIT_USAGE
}

fn exit_status(result: Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            1
        }
    }
}

/// The installer is a long-running daemon whose only output is its log: to stderr, one line per
/// record. Does nothing if the program already set a logger.
fn init_logging() {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, metadata: &log::Metadata) -> bool {
            metadata.level() <= log::Level::Info
        }
        fn log(&self, record: &log::Record) {
            if self.enabled(record.metadata()) {
                eprintln!("intercept-cni: {}: {}", record.level(), record.args());
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: Stderr = Stderr;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_install_and_uninstall_flags() {
        let args = parse_args(
            &words("--cni-conf-dir /etc/cni/net.d --cni-bin-dir=/opt/cni/bin --watch --plugin-config /p.json"),
            true,
        )
        .unwrap();
        assert_eq!(
            args,
            Args {
                conf_dir: "/etc/cni/net.d".into(),
                bin_dir: "/opt/cni/bin".into(),
                plugin_config: Some("/p.json".into()),
                watch: true,
                generation: 0,
                uninstall_on_exit: false,
            }
        );
        let args = parse_args(&words("--cni-bin-dir b --cni-conf-dir c"), false).unwrap();
        assert_eq!((args.conf_dir, args.watch), (PathBuf::from("c"), false));
        let args = parse_args(
            &words("--cni-bin-dir b --cni-conf-dir c --generation=7 --uninstall-on-exit"),
            true,
        )
        .unwrap();
        assert_eq!((args.generation, args.uninstall_on_exit), (7, true));
    }

    #[test]
    fn rejects_bad_command_lines() {
        for (line, install_flags) in [
            ("--cni-conf-dir c", true),
            ("--cni-bin-dir b", true),
            ("--cni-conf-dir c --cni-bin-dir", true),
            ("--cni-conf-dir= --cni-bin-dir b", true),
            ("--cni-conf-dir c --cni-conf-dir d --cni-bin-dir b", true),
            ("--cni-conf-dir c --cni-bin-dir b --watch=yes", true),
            ("--cni-conf-dir c --cni-bin-dir b --watch", false),
            ("--cni-conf-dir c --cni-bin-dir b --plugin-config p", false),
            ("--cni-conf-dir c --cni-bin-dir b extra", true),
            ("--cni-conf-dir c --cni-bin-dir b --generation -1", true),
            ("--cni-conf-dir c --cni-bin-dir b --generation 1", false),
            (
                "--cni-conf-dir c --cni-bin-dir b --uninstall-on-exit",
                false,
            ),
        ] {
            assert!(parse_args(&words(line), install_flags).is_err(), "{line}");
        }
    }
}
