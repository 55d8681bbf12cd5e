//! The CNI environment (SPEC.md "Parameters"), read once and validated into typed values.
//! Empty variables count as absent, as the spec's reference implementation does.

use super::error::{Error, Result};
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

/// The six CNI verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    /// `None` when `CNI_COMMAND` is absent or empty: the caller prints the "about" line.
    pub fn from_env(value: Option<&str>) -> Result<Option<Command>> {
        let command = match value {
            None | Some("") => return Ok(None),
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(Error::env(
                    "CNI_COMMAND",
                    format!(
                    "unknown command {other:?} (expected ADD, DEL, CHECK, STATUS, GC or VERSION)"
                ),
                ))
            }
        };
        Ok(Some(command))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A container ID matching `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$` (SPEC.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerId(String);

impl ContainerId {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut bytes = s.bytes();
        let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
        if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
            return Err(format!(
                "{s:?} must start with a letter or digit and contain only letters, digits, '_', '.' or '-'"
            ));
        }
        Ok(ContainerId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Linux interface name as the kernel accepts it (IFNAMSIZ - 1 bytes; SPEC.md rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfName(String);

impl IfName {
    const MAX_LEN: usize = 15;

    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() > Self::MAX_LEN {
            return Err(format!("{s:?} is longer than {} bytes", Self::MAX_LEN));
        }
        if s == "." || s == ".." {
            return Err(format!("{s:?} is not a valid interface name"));
        }
        if s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
            return Err(format!("{s:?} contains '/', ':' or whitespace"));
        }
        Ok(IfName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The pod identity runtimes pass in `CNI_ARGS` (CONVENTIONS.md): for logs, and the namespace
/// for `excludeNamespaces`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl PodRef {
    /// Parses `K=V;K=V`. Malformed pieces and unknown keys are tolerated (the spec lets runtimes
    /// send keys a plugin does not know); values are kept only when safe to print in a log line.
    pub fn from_cni_args(args: &str) -> PodRef {
        let mut pod = PodRef::default();
        for piece in args.split(';').filter(|p| !p.is_empty()) {
            let Some((key, value)) = piece.split_once('=') else {
                log::debug!("CNI_ARGS: ignoring {piece:?} (not KEY=VALUE)");
                continue;
            };
            let slot = match key {
                "K8S_POD_NAMESPACE" => &mut pod.namespace,
                "K8S_POD_NAME" => &mut pod.name,
                _ => continue,
            };
            if is_kubernetes_name(value) {
                *slot = Some(value.to_string());
            } else {
                log::debug!("CNI_ARGS: ignoring {key} (not a Kubernetes object name)");
            }
        }
        pod
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.namespace.as_deref().unwrap_or("-");
        let name = self.name.as_deref().unwrap_or("-");
        write!(f, "{ns}/{name}")
    }
}

/// DNS-subdomain characters only, so a value cannot forge log lines.
fn is_kubernetes_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The validated environment of one invocation. `CNI_PATH` is not read: this plugin
/// delegates to no other plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    /// Set for ADD, DEL and CHECK.
    pub container_id: Option<ContainerId>,
    /// Set for ADD, DEL and CHECK.
    pub ifname: Option<IfName>,
    /// Set for ADD and CHECK; optional for DEL.
    pub netns: Option<PathBuf>,
    pub pod: PodRef,
}

impl CniEnv {
    /// Reads the variables `command` needs through `get` (the process environment in `main`).
    pub fn read(command: Command, get: impl Fn(&str) -> Option<OsString>) -> Result<CniEnv> {
        let var = |name: &str| -> Result<Option<String>> {
            match get(name) {
                None => Ok(None),
                Some(v) if v.is_empty() => Ok(None),
                Some(v) => v
                    .into_string()
                    .map(Some)
                    .map_err(|_| Error::env(name, "not valid UTF-8")),
            }
        };
        let required = |name: &str| -> Result<String> {
            var(name)?.ok_or_else(|| Error::env(name, format!("required for {command}")))
        };
        let attachment = matches!(command, Command::Add | Command::Del | Command::Check);

        let container_id = if attachment {
            let raw = required("CNI_CONTAINERID")?;
            Some(ContainerId::parse(&raw).map_err(|e| Error::env("CNI_CONTAINERID", e))?)
        } else {
            None
        };
        let ifname = if attachment {
            let raw = required("CNI_IFNAME")?;
            Some(IfName::parse(&raw).map_err(|e| Error::env("CNI_IFNAME", e))?)
        } else {
            None
        };
        let netns = match command {
            Command::Add | Command::Check => Some(required("CNI_NETNS")?),
            Command::Del => var("CNI_NETNS")?,
            _ => None,
        };
        let netns = match netns.map(PathBuf::from) {
            // A relative path would depend on the runtime's working directory.
            Some(p) if !p.is_absolute() => {
                return Err(Error::env(
                    "CNI_NETNS",
                    format!("{} is not an absolute path", p.display()),
                ))
            }
            other => other,
        };
        let pod = var("CNI_ARGS")?
            .map(|a| PodRef::from_cni_args(&a))
            .unwrap_or_default();
        Ok(CniEnv {
            command,
            container_id,
            ifname,
            netns,
            pod,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::error::Code;
    use std::collections::HashMap;

    fn read(command: Command, vars: &[(&str, &str)]) -> Result<CniEnv> {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        CniEnv::read(command, |k| map.get(k).cloned())
    }

    const FULL: &[(&str, &str)] = &[
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/var/run/netns/pod"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
        ),
    ];

    #[test]
    fn commands_parse_and_unknown_is_code_4() {
        assert_eq!(Command::from_env(Some("ADD")).unwrap(), Some(Command::Add));
        assert_eq!(Command::from_env(Some("GC")).unwrap(), Some(Command::Gc));
        assert_eq!(Command::from_env(Some("")).unwrap(), None);
        assert_eq!(Command::from_env(None).unwrap(), None);
        for bad in ["add", "DELETE", " ADD"] {
            let e = Command::from_env(Some(bad)).unwrap_err();
            assert_eq!(e.code, Code::InvalidEnv);
            assert!(e.msg.contains("CNI_COMMAND"));
        }
    }

    #[test]
    fn full_add_environment() {
        let env = read(Command::Add, FULL).unwrap();
        assert_eq!(env.container_id.unwrap().as_str(), "abc123");
        assert_eq!(env.ifname.unwrap().as_str(), "eth0");
        assert_eq!(env.netns.unwrap(), PathBuf::from("/var/run/netns/pod"));
        assert_eq!(env.pod.to_string(), "default/web-0");
    }

    #[test]
    fn each_required_variable_is_named_when_missing_or_empty() {
        for (command, var) in [
            (Command::Add, "CNI_CONTAINERID"),
            (Command::Add, "CNI_IFNAME"),
            (Command::Add, "CNI_NETNS"),
            (Command::Check, "CNI_NETNS"),
            (Command::Del, "CNI_CONTAINERID"),
            (Command::Del, "CNI_IFNAME"),
        ] {
            for replacement in [None, Some("")] {
                let vars: Vec<(&str, &str)> = FULL
                    .iter()
                    .filter(|(k, _)| *k != var)
                    .copied()
                    .chain(replacement.map(|r| (var, r)))
                    .collect();
                let e = read(command, &vars).unwrap_err();
                assert_eq!(e.code, Code::InvalidEnv);
                assert!(e.msg.contains(var), "{command} {var}: {}", e.msg);
            }
        }
    }

    #[test]
    fn del_netns_is_optional_and_other_verbs_need_nothing() {
        let vars: Vec<_> = FULL
            .iter()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .copied()
            .collect();
        assert_eq!(read(Command::Del, &vars).unwrap().netns, None);
        let mut with_empty = vars.clone();
        with_empty.push(("CNI_NETNS", ""));
        assert_eq!(read(Command::Del, &with_empty).unwrap().netns, None);
        for command in [Command::Status, Command::Gc, Command::Version] {
            let env = read(command, &[]).unwrap();
            assert_eq!(env.container_id, None);
            assert_eq!(env.netns, None);
        }
    }

    #[test]
    fn relative_netns_is_refused() {
        let mut vars: Vec<_> = FULL.to_vec();
        vars.retain(|(k, _)| *k != "CNI_NETNS");
        vars.push(("CNI_NETNS", "netns/pod"));
        let e = read(Command::Add, &vars).unwrap_err();
        assert!(e.msg.contains("CNI_NETNS"));
    }

    #[test]
    fn container_ids() {
        for good in ["a", "0", "abc-DEF_1.2", "f".repeat(64).as_str()] {
            assert!(ContainerId::parse(good).is_ok(), "{good:?}");
        }
        for bad in ["", "-a", "_a", ".a", "a b", "a/b", "a;b", "é", "a\n"] {
            assert!(ContainerId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn interface_names() {
        for good in ["eth0", "net1", "a", "123456789012345", "veth-x.y_z"] {
            assert!(IfName::parse(good).is_ok(), "{good:?}");
        }
        for bad in [
            "1234567890123456",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "a\n",
        ] {
            assert!(IfName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_container_id_or_ifname_is_code_4_naming_the_variable() {
        for (var, value) in [("CNI_CONTAINERID", "-x"), ("CNI_IFNAME", "eth0:1")] {
            let mut vars: Vec<_> = FULL.to_vec();
            vars.retain(|(k, _)| *k != var);
            vars.push((var, value));
            let e = read(Command::Del, &vars).unwrap_err();
            assert_eq!(e.code, Code::InvalidEnv);
            assert!(e.msg.contains(var), "{}", e.msg);
        }
    }

    #[test]
    fn cni_args_are_tolerated() {
        let pod =
            PodRef::from_cni_args("garbage;;K8S_POD_NAME=web;X=;=y;K8S_POD_NAMESPACE=Bad\nLine");
        assert_eq!(pod.name.as_deref(), Some("web"));
        assert_eq!(pod.namespace, None);
        assert_eq!(pod.to_string(), "-/web");
        assert_eq!(PodRef::from_cni_args("").to_string(), "-/-");
    }
}
