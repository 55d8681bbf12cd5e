//! Version negotiation (SPEC.md "Version considerations").

use super::env::Command;
use super::error::{Code, Error, Result};

/// Every spec version this plugin speaks, oldest first.
pub const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Answer and error version when the input names none we can use.
pub const LATEST: &str = "1.1.0";

/// A config without `cniVersion` predates versioning (SPEC.md).
const UNVERSIONED: &str = "0.1.0";

/// The spec version that introduced each verb beyond ADD/DEL/VERSION.
fn introduced_in(command: Command) -> Option<&'static str> {
    match command {
        Command::Check => Some("0.4.0"),
        Command::Status | Command::Gc => Some("1.1.0"),
        Command::Add | Command::Del | Command::Version => None,
    }
}

fn position(version: &str) -> Option<usize> {
    SUPPORTED.iter().position(|v| *v == version)
}

pub fn is_supported(version: &str) -> bool {
    position(version).is_some()
}

/// Accepts the config's `cniVersion` for `command`, returning it; code 1 otherwise.
pub fn negotiate(config_version: Option<&str>, command: Command) -> Result<&str> {
    let version = config_version.unwrap_or(UNVERSIONED);
    let Some(at) = position(version) else {
        return Err(Error::new(
            Code::IncompatibleVersion,
            format!(
                "cniVersion {version} is not supported (supported: {})",
                SUPPORTED.join(", ")
            ),
        ));
    };
    if let Some(first) = introduced_in(command) {
        if position(first).is_some_and(|f| at < f) {
            return Err(Error::new(
                Code::IncompatibleVersion,
                format!("{command} needs cniVersion {first} or later, config has {version}"),
            ));
        }
    }
    Ok(version)
}

/// The VERSION answer: the input's `cniVersion` echoed (or the latest), and what we support.
pub fn version_answer(input_version: Option<&str>) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": input_version.unwrap_or(LATEST),
        "supportedVersions": SUPPORTED,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Command; 6] = [
        Command::Add,
        Command::Del,
        Command::Check,
        Command::Status,
        Command::Gc,
        Command::Version,
    ];

    #[test]
    fn every_supported_version_serves_add_and_del() {
        for v in SUPPORTED {
            for command in [Command::Add, Command::Del] {
                assert_eq!(negotiate(Some(v), command).unwrap(), v);
            }
        }
    }

    #[test]
    fn newer_verbs_need_their_version() {
        for v in SUPPORTED {
            let check = negotiate(Some(v), Command::Check);
            assert_eq!(check.is_ok(), !v.starts_with("0.3."), "CHECK at {v}");
            for command in [Command::Status, Command::Gc] {
                let r = negotiate(Some(v), command);
                assert_eq!(r.is_ok(), v == "1.1.0", "{command} at {v}");
                if let Err(e) = r {
                    assert_eq!(e.code, Code::IncompatibleVersion);
                }
            }
        }
    }

    #[test]
    fn unknown_or_missing_versions_are_code_1() {
        for command in ALL {
            for bad in [
                None,
                Some("0.1.0"),
                Some("0.2.0"),
                Some("1.2.0"),
                Some("1.0"),
                Some(""),
            ] {
                let e = negotiate(bad, command).unwrap_err();
                assert_eq!(e.code, Code::IncompatibleVersion, "{command} {bad:?}");
            }
        }
    }

    #[test]
    fn version_answer_echoes_input() {
        let a = version_answer(Some("0.4.0"));
        assert_eq!(a["cniVersion"], "0.4.0");
        assert_eq!(a["supportedVersions"].as_array().unwrap().len(), 5);
        assert_eq!(version_answer(None)["cniVersion"], LATEST);
    }
}
