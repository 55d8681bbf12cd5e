//! The node installer: chain the plugin into the active CNI network config and keep it there.
//!
//! `intercept-cni install --cni-conf-dir DIR --cni-bin-dir DIR [--plugin-config FILE] [--watch]`
//! copies the running binary into the bin dir, then appends our entry last to the active
//! network (see `conflist` for which file that is). `--watch` keeps it there until SIGTERM or
//! SIGINT, then uninstalls. `intercept-cni uninstall --cni-conf-dir DIR --cni-bin-dir DIR`
//! removes every `intercept-cni` entry from the conflists of the conf dir, then the binary: a
//! network left pointing at a missing binary would fail every pod. A conflist that install made
//! from a `.conf` stays a conflist (its primary plugin alone): runtimes read it the same way, and
//! the primary agent rewrites its own file on its next start anyway.

pub mod conflist;
pub mod fsops;
pub mod watch;

use crate::agent;
use crate::cni::error::{Code, Error, Result};
use conflist::{ConfFile, Network, PLUGIN_TYPE};
use serde_json::{Map, Value};
use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};

/// The running executable: still readable through this link if its file was replaced.
const SELF_EXE: &str = "/proc/self/exe";

/// Exit status for a bad command line, as distinct from a failed install.
const EXIT_USAGE: i32 = 2;

/// What one install pass left in the conf dir: the active file and a hash of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub file_name: String,
    pub content_hash: u64,
}

/// Everything install needs, validated.
pub struct Installer {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub entry: Map<String, Value>,
    /// The binary to copy into the bin dir.
    pub binary: PathBuf,
}

impl Installer {
    /// One install pass. `Ok(None)`: no valid network config yet, nothing was changed.
    pub fn install(&self) -> Result<Option<Installed>> {
        let files = fsops::read_conf_dir(&self.conf_dir)?;
        let Some(network) = active_network_logged(&files) else {
            return Ok(None);
        };
        let plan = conflist::plan_install(&network, &files, &self.entry)?;
        // The binary before the config: a network naming our plugin must never exist without it.
        if fsops::install_binary(&self.binary, &self.bin_dir, PLUGIN_TYPE)? {
            agent::metrics::binary_written();
            log::info!("copied {PLUGIN_TYPE} to {}", self.bin_dir.display());
        }
        let current = files.iter().find(|f| f.name == plan.file_name);
        if current.is_some_and(|f| f.bytes == plan.content) && plan.replaces.is_none() {
            log::debug!("{} already chains {PLUGIN_TYPE} last", plan.file_name);
        } else {
            let mode_source = plan.replaces.as_deref().unwrap_or(&plan.file_name);
            let mode =
                fsops::mode_of(&self.conf_dir.join(mode_source))?.unwrap_or(fsops::NEW_CONFIG_MODE);
            fsops::write_atomic(&self.conf_dir, &plan.file_name, &plan.content, mode)?;
            if let Some(replaced) = &plan.replaces {
                fsops::remove(&self.conf_dir, replaced)?;
                log::info!("converted {replaced} to {}", plan.file_name);
            }
            agent::metrics::conflist_written();
            log::info!("chained {PLUGIN_TYPE} last in {}", plan.file_name);
        }
        Ok(Some(Installed {
            content_hash: content_hash(&plan.content),
            file_name: plan.file_name,
        }))
    }
}

fn active_network_logged(files: &[ConfFile]) -> Option<Network> {
    let (network, skipped) = conflist::active_network(files);
    for (name, why) in skipped {
        log::warn!("skipping {name}: {why}");
    }
    network
}

/// Identifies what a pass left in a file, so the watcher can ignore the events of its own writes.
pub fn content_hash(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    hasher.write(bytes);
    hasher.finish()
}

/// Removes our entries from every conflist of `conf_dir`, then our binary from `bin_dir`.
/// Keeps going after a failure and reports them all.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<()> {
    let mut errors = Vec::new();
    match fsops::read_conf_dir(conf_dir) {
        Ok(files) => {
            for file in &files {
                if let Err(e) = remove_entry(conf_dir, file) {
                    errors.push(e);
                }
            }
        }
        Err(e) => errors.push(e),
    }
    match fsops::remove(bin_dir, PLUGIN_TYPE) {
        Ok(true) => log::info!("removed {PLUGIN_TYPE} from {}", bin_dir.display()),
        Ok(false) => {}
        Err(e) => errors.push(e),
    }
    Error::collect(errors).map_or(Ok(()), Err)
}

fn remove_entry(conf_dir: &Path, file: &ConfFile) -> Result<()> {
    let Some(content) = conflist::plan_uninstall(file)? else {
        return Ok(());
    };
    let mode = fsops::mode_of(&conf_dir.join(&file.name))?.unwrap_or(fsops::NEW_CONFIG_MODE);
    fsops::write_atomic(conf_dir, &file.name, &content, mode)?;
    log::info!("removed {PLUGIN_TYPE} from {}", file.name);
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
struct Args {
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    plugin_config: Option<PathBuf>,
    watch: bool,
}

/// Parses the words after the subcommand; `install_flags` allows `--plugin-config` and `--watch`.
fn parse_args(words: &[String], install_flags: bool) -> std::result::Result<Args, String> {
    let mut conf_dir = None;
    let mut bin_dir = None;
    let mut plugin_config = None;
    let mut watch = false;
    let mut words = words.iter();
    while let Some(word) = words.next() {
        let (flag, inline) = match word.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_owned())),
            None => (word.as_str(), None),
        };
        let slot = match flag {
            "--cni-conf-dir" => &mut conf_dir,
            "--cni-bin-dir" => &mut bin_dir,
            "--plugin-config" if install_flags => &mut plugin_config,
            "--watch" if install_flags && inline.is_none() => {
                watch = true;
                continue;
            }
            _ => return Err(format!("unexpected argument {word:?}")),
        };
        let value = inline
            .or_else(|| words.next().cloned())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("{flag} needs a value"))?;
        if slot.replace(PathBuf::from(value)).is_some() {
            return Err(format!("{flag} given twice"));
        }
    }
    Ok(Args {
        conf_dir: conf_dir.ok_or("--cni-conf-dir is required")?,
        bin_dir: bin_dir.ok_or("--cni-bin-dir is required")?,
        plugin_config,
        watch,
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
    if agent_options.given && !args.watch {
        return usage_error(
            "install",
            "--listen, --events-socket and --host-root need --watch",
        );
    }
    let result = installer(&args).and_then(|installer| {
        if args.watch {
            agent::start(&agent_options, &installer)?;
            let stopped = watch::run(&installer);
            agent::events::unbind();
            stopped
        } else {
            installer.install()?.map(|_| ()).ok_or_else(|| {
                Error::new(
                    Code::TryAgainLater,
                    format!(
                        "no valid CNI network config in {}: has the network provider started? \
                         (--watch waits for one)",
                        args.conf_dir.display()
                    ),
                )
            })
        }
    });
    exit_status(result)
}

/// `intercept-cni uninstall ...`; `words` are the arguments after the subcommand.
pub fn uninstall_main(words: &[String]) -> i32 {
    init_logging();
    match parse_args(words, false) {
        Ok(args) => exit_status(uninstall(&args.conf_dir, &args.bin_dir)),
        Err(why) => usage_error("uninstall", &why),
    }
}

fn installer(args: &Args) -> Result<Installer> {
    let operator_json = match &args.plugin_config {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?,
        ),
        None => None,
    };
    for dir in [&args.conf_dir, &args.bin_dir] {
        if !dir.is_dir() {
            return Err(Error::io(dir.display(), "not a directory"));
        }
    }
    Ok(Installer {
        conf_dir: args.conf_dir.clone(),
        bin_dir: args.bin_dir.clone(),
        entry: conflist::plugin_entry(operator_json.as_deref())?,
        binary: PathBuf::from(SELF_EXE),
    })
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
            }
        );
        let args = parse_args(&words("--cni-bin-dir b --cni-conf-dir c"), false).unwrap();
        assert_eq!((args.conf_dir, args.watch), (PathBuf::from("c"), false));
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
        ] {
            assert!(parse_args(&words(line), install_flags).is_err(), "{line}");
        }
    }
}
