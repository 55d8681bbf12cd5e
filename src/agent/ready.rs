//! Readiness: interception is in place on this node only when (1) the runtime's active network
//! config chains our entry last, (2) the plugin in the bin dir is byte for byte the binary this
//! agent ships (its own executable), and (3) the host check passes for the backend the plugin
//! will use. Computed from the files at each request, so it can never lag behind the node.

use crate::cni::config::NetConf;
use crate::cni::version;
use crate::host::{self, HostRoot};
use crate::install::{self, conflist, fsops, watch};
use serde_json::{Map, Value};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What readiness looks at.
pub struct Target {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// The binary we ship: our own executable.
    pub own_binary: PathBuf,
    /// The operator's plugin config (`--plugin-config`), read again at each request: a
    /// ConfigMap edit may pick another backend.
    pub plugin_config: Option<PathBuf>,
    /// Where the host's `/` is mounted; `None`: this system, with the functional probe.
    pub host_root: Option<PathBuf>,
}

/// Each condition: `Ok(what holds)` or `Err(why not)`.
#[derive(Debug)]
pub struct Readiness {
    pub chained: Result<String, String>,
    pub binary: Result<String, String>,
    pub host: Result<String, String>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.conditions().iter().all(|(_, holds)| *holds)
    }

    /// Metric labels and whether each holds.
    pub fn conditions(&self) -> [(&'static str, bool); 3] {
        [
            ("chained", self.chained.is_ok()),
            ("binary", self.binary.is_ok()),
            ("host", self.host.is_ok()),
        ]
    }

    /// One line per condition, for the probe's body (kubelet shows it in events).
    pub fn describe(&self) -> String {
        [
            ("chained", &self.chained),
            ("binary", &self.binary),
            ("host", &self.host),
        ]
        .iter()
        .map(|(name, result)| match result {
            Ok(what) => format!("{name}: ok: {what}\n"),
            Err(why) => format!("{name}: NOT READY: {why}\n"),
        })
        .collect()
    }
}

pub fn assess(target: &Target) -> Readiness {
    let config = install::load_plugin_config(target.plugin_config.as_deref())
        .map_err(|e| format!("the plugin config is refused: {e}"));
    Readiness {
        chained: chained(&target.conf_dir, config.as_ref().ok()),
        binary: same_binary(
            &target.own_binary,
            &target.bin_dir.join(conflist::PLUGIN_TYPE),
        ),
        host: config.and_then(|c| host_check(&c, target.host_root.as_deref())),
    }
}

/// Our entry last in the active network, carrying `config` (the plugin config as it is now,
/// when it loads) apart from the installer's stamp: an edited config is not ready until chained.
fn chained(conf_dir: &Path, config: Option<&Map<String, Value>>) -> Result<String, String> {
    if watch::state() == watch::State::ConfigRefused {
        return Err(
            "the plugin config is refused (see the log): the last good entry stays, the new \
             config is not chained"
                .into(),
        );
    }
    let files = fsops::read_conf_dir(conf_dir).map_err(|e| e.to_string())?;
    let (network, _) = conflist::active_network(&files);
    let network = network.ok_or_else(|| {
        format!(
            "no valid network config in {} (has the network provider started?)",
            conf_dir.display()
        )
    })?;
    let mut chained = network
        .doc
        .get("plugins")
        .and_then(Value::as_array)
        .and_then(|p| p.last())
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    chained.remove(conflist::STAMP_KEY);
    if conflist::chains_us_last(&network) && config.is_some_and(|c| *c != chained) {
        Err(format!(
            "{} chains an entry that is not the current plugin config yet",
            network.file_name
        ))
    } else if conflist::chains_us_last(&network) {
        Ok(format!(
            "{} chains {} last",
            network.file_name,
            conflist::PLUGIN_TYPE
        ))
    } else {
        Err(format!(
            "the active network {} does not chain {} last",
            network.file_name,
            conflist::PLUGIN_TYPE
        ))
    }
}

/// A regular executable file with exactly our bytes (compared in chunks, nothing kept).
fn same_binary(ours: &Path, installed: &Path) -> Result<String, String> {
    let meta = std::fs::symlink_metadata(installed)
        .map_err(|e| format!("{}: {e}", installed.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", installed.display()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not executable", installed.display()));
    }
    let open = |p: &Path| File::open(p).map_err(|e| format!("{}: {e}", p.display()));
    let (mut a, mut b) = (open(ours)?, open(installed)?);
    let differs = || format!("{} is not the binary this agent ships", installed.display());
    let (mut buf_a, mut buf_b) = (vec![0; 64 * 1024], vec![0; 64 * 1024]);
    loop {
        let n = read_full(&mut a, &mut buf_a).map_err(|e| format!("{}: {e}", ours.display()))?;
        let m =
            read_full(&mut b, &mut buf_b).map_err(|e| format!("{}: {e}", installed.display()))?;
        if n != m || buf_a[..n] != buf_b[..m] {
            return Err(differs());
        }
        if n == 0 {
            return Ok(format!("{} is current", installed.display()));
        }
    }
}

/// Fills `buf` unless the file ends first; the count read.
fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// The host check for the backend `config` selects.
fn host_check(config: &Map<String, Value>, host_root: Option<&Path>) -> Result<String, String> {
    let conf = NetConf::from_object(config, version::LATEST)
        .map_err(|e| format!("the plugin config is refused: {e}"))?;
    let (choice, options) = (conf.backend, conf.backend_options);
    let (root, probe) = match host_root {
        Some(dir) => (HostRoot::new(dir), false),
        None => (HostRoot::real(), true),
    };
    let chosen = host::choose(choice, &options, &root, false, probe);
    if chosen.report.ok {
        Ok(format!("{} backend ({})", chosen.backend(), chosen.why))
    } else {
        Err(format!(
            "the {} backend cannot work on this host: {}",
            chosen.backend(),
            chosen.report.problems.join(" ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_must_be_ours_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours");
        let bytes: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        std::fs::write(&ours, &bytes).unwrap();
        let installed = dir.path().join("installed");
        assert!(same_binary(&ours, &installed).is_err(), "missing");
        std::fs::write(&installed, &bytes).unwrap();
        let err = same_binary(&ours, &installed).unwrap_err();
        assert!(err.contains("not executable"), "{err}");
        std::fs::set_permissions(&installed, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(same_binary(&ours, &installed).is_ok());
        let mut changed = bytes.clone();
        changed[150_000] ^= 1;
        std::fs::write(&installed, &changed).unwrap();
        assert!(same_binary(&ours, &installed).is_err(), "one byte differs");
        std::fs::write(&installed, &bytes[..100_000]).unwrap();
        assert!(same_binary(&ours, &installed).is_err(), "truncated");
        std::fs::remove_file(&installed).unwrap();
        std::os::unix::fs::symlink(&ours, &installed).unwrap();
        assert!(same_binary(&ours, &installed).is_err(), "a symlink");
    }
}
