//! The plugin's network configuration (its object in the conflist) and the pure step from
//! validated settings to an `InterceptPlan`.
//!
//! Each key is decoded on its own, so an error names the key and the value it had: malformed
//! JSON is code 6, a wrong type or value is code 7. Unknown keys are ignored (debug log).
//! CIDRs with host bits set (`10.1.2.3/8`) are refused rather than silently widened or
//! narrowed: the intent is ambiguous, and the error says which forms would be accepted.

use super::error::{Code, Error, Result};
use crate::agent::events;
use crate::backend::{BackendChoice, BackendOptions, IptablesMode};
use crate::host::Policy as HostPolicy;
use crate::logging;
use crate::plan::{
    DnsCapture, Families, IfName, InboundPorts, InterceptPlan, InterceptionMode, OutboundCidrs,
    PortRange, Semantics, Tproxy,
};
use ipnetwork::IpNetwork;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::PathBuf;

/// Which pods get interception (see `crate::policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodSelection {
    /// Every pod the plugin is called for, unless its annotations opt out.
    All,
    /// Only pods whose annotations opt in or show an injected sidecar: the default, because
    /// intercepting a pod that has no proxy cuts off all its TCP traffic.
    Annotated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum BackendKey {
    Auto,
    Nftables,
    Iptables,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum IptablesModeKey {
    Legacy,
    Nft,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LogLevelKey {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// One entry of GC's `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The interception knobs, as the config sets them. A per-pod policy overlays its own values on
/// a copy of these, then `build_plan` validates the combination once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanSettings {
    pub semantics: Semantics,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    pub exclude_inbound_ports: Vec<PortRange>,
    /// Inbound connections from these sources are not redirected (Linkerd's skip-subnets).
    pub exclude_inbound_sources: Vec<IpNetwork>,
    pub exclude_outbound_ports: Vec<PortRange>,
    /// `None`: every inbound port; `Some`: only these.
    pub include_inbound_ports: Option<Vec<PortRange>>,
    pub exclude_outbound_cidrs: Vec<IpNetwork>,
    /// `None`: every destination; `Some`: only these.
    pub include_outbound_cidrs: Option<Vec<IpNetwork>>,
    // Modes (see `plan::InterceptPlan`).
    pub dns_capture: bool,
    pub interception_mode: ModeKey,
    pub drop_invalid: bool,
    pub include_outbound_ports: Vec<PortRange>,
    pub exclude_interfaces: Vec<IfName>,
    pub reroute_interfaces: Vec<IfName>,
    /// Whether the proxy serves IPv6 (`None`: the mesh's default, see `families_for`).
    pub dual_stack: Option<bool>,
}

/// `interceptionMode` (Istio's names; NONE is a per-pod opt-out handled by the policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ModeKey {
    #[serde(rename = "REDIRECT")]
    Redirect,
    #[serde(rename = "TPROXY")]
    Tproxy,
}

impl Default for PlanSettings {
    fn default() -> Self {
        PlanSettings {
            semantics: Semantics::Own,
            inbound_port: 15006,
            outbound_port: 15001,
            proxy_uids: vec![1337],
            proxy_gids: Vec::new(),
            exclude_inbound_ports: Vec::new(),
            exclude_inbound_sources: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_inbound_ports: None,
            exclude_outbound_cidrs: Vec::new(),
            include_outbound_cidrs: None,
            dns_capture: false,
            interception_mode: ModeKey::Redirect,
            drop_invalid: false,
            include_outbound_ports: Vec::new(),
            exclude_interfaces: Vec::new(),
            reroute_interfaces: Vec::new(),
            dual_stack: None,
        }
    }
}

impl PlanSettings {
    /// Rules that span several keys (each key alone was checked while decoding).
    pub fn validate(&self) -> Result<()> {
        // The meshes accept equal ports (Linkerd's own tests use them); a plain pod's unknown
        // proxy could not tell its two directions apart.
        if self.semantics == Semantics::Own && self.inbound_port == self.outbound_port {
            return Err(Error::config(format!(
                "inboundPort and outboundPort must differ (both are {})",
                self.inbound_port
            )));
        }
        Ok(())
    }
}

/// The knobs one layer of configuration sets (the netconf, a mesh's defaults, a pod's
/// annotations); `None` keeps the value of the layer below. A list replaces the one below, as
/// Istio's and Linkerd's annotations replace their installation defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettingsOverlay {
    pub semantics: Option<Semantics>,
    pub inbound_port: Option<u16>,
    pub outbound_port: Option<u16>,
    pub proxy_uids: Option<Vec<u32>>,
    pub proxy_gids: Option<Vec<u32>>,
    pub exclude_inbound_ports: Option<Vec<PortRange>>,
    pub exclude_inbound_sources: Option<Vec<IpNetwork>>,
    pub exclude_outbound_ports: Option<Vec<PortRange>>,
    /// `Some(None)`: every inbound port again (Istio's `*`).
    pub include_inbound_ports: Option<Option<Vec<PortRange>>>,
    pub exclude_outbound_cidrs: Option<Vec<IpNetwork>>,
    /// `Some(None)`: every destination again (Istio's `*`).
    pub include_outbound_cidrs: Option<Option<Vec<IpNetwork>>>,
    pub dns_capture: Option<bool>,
    pub interception_mode: Option<ModeKey>,
    pub drop_invalid: Option<bool>,
    pub include_outbound_ports: Option<Vec<PortRange>>,
    pub exclude_interfaces: Option<Vec<IfName>>,
    pub reroute_interfaces: Option<Vec<IfName>>,
    pub dual_stack: Option<bool>,
    /// Added to the inbound exclusions below instead of replacing them (linkerd-cni appends
    /// `config.linkerd.io/skip-inbound-ports` to its configured list).
    pub more_exclude_inbound_ports: Vec<PortRange>,
}

impl SettingsOverlay {
    pub fn apply_to(&self, s: &mut PlanSettings) {
        fn set<T: Clone>(slot: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *slot = v.clone();
            }
        }
        set(&mut s.semantics, &self.semantics);
        set(&mut s.inbound_port, &self.inbound_port);
        set(&mut s.outbound_port, &self.outbound_port);
        set(&mut s.proxy_uids, &self.proxy_uids);
        set(&mut s.proxy_gids, &self.proxy_gids);
        set(&mut s.exclude_inbound_ports, &self.exclude_inbound_ports);
        s.exclude_inbound_ports
            .extend_from_slice(&self.more_exclude_inbound_ports);
        set(
            &mut s.exclude_inbound_sources,
            &self.exclude_inbound_sources,
        );
        set(&mut s.exclude_outbound_ports, &self.exclude_outbound_ports);
        set(&mut s.include_inbound_ports, &self.include_inbound_ports);
        set(&mut s.exclude_outbound_cidrs, &self.exclude_outbound_cidrs);
        set(&mut s.include_outbound_cidrs, &self.include_outbound_cidrs);
        set(&mut s.dns_capture, &self.dns_capture);
        set(&mut s.interception_mode, &self.interception_mode);
        set(&mut s.drop_invalid, &self.drop_invalid);
        set(&mut s.include_outbound_ports, &self.include_outbound_ports);
        set(&mut s.exclude_interfaces, &self.exclude_interfaces);
        set(&mut s.reroute_interfaces, &self.reroute_interfaces);
        if self.dual_stack.is_some() {
            s.dual_stack = self.dual_stack;
        }
    }
}

/// The validated configuration of one invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// Already negotiated (see `version::negotiate`).
    pub cni_version: String,
    pub name: Value,
    pub plugin_type: Value,
    pub prev_result: Option<Value>,
    pub runtime_config: Option<Value>,
    pub backend: BackendChoice,
    pub backend_options: BackendOptions,
    pub pod_selection: PodSelection,
    /// Whether pods may tune their interception with annotations (selection applies regardless).
    pub pod_overrides: bool,
    /// Namespaces (DNS-1123 labels) whose pods are never intercepted.
    pub exclude_namespaces: Vec<String>,
    /// The built-in defaults with `netconf_settings` applied.
    pub settings: PlanSettings,
    /// Only the knobs the netconf sets itself: a pod of a known mesh gets that mesh's defaults
    /// under these.
    pub netconf_settings: SettingsOverlay,
    pub state_dir: PathBuf,
    pub log_level: log::LevelFilter,
    pub log_file: Option<PathBuf>,
    /// The log file's bound before it is rotated to `<logFile>.1`.
    pub log_file_max_bytes: u64,
    pub host_prerequisites: HostPolicy,
    /// GC's attachments still in use, from either spelling of the key. Absent or null reads as
    /// empty: Go runtimes marshal an empty list as null.
    pub valid_attachments: Vec<Attachment>,
}

/// Keys the plugin reads, plus the spec's well-known ones it passes over silently.
const KNOWN_KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "args",
    "ipMasq",
    "ipam",
    "dns",
    "capabilities",
    "prevResult",
    "runtimeConfig",
    "cni.dev/valid-attachments",
    "cni.dev/attachments",
    "backend",
    "iptablesMode",
    "iptablesPath",
    "podSelection",
    "podOverrides",
    "excludeNamespaces",
    "inboundPort",
    "outboundPort",
    "proxyUID",
    "proxyGID",
    "excludeInboundPorts",
    "excludeInboundSourceCIDRs",
    "excludeOutboundPorts",
    "includeInboundPorts",
    "excludeOutboundCIDRs",
    "includeOutboundCIDRs",
    "dnsCapture",
    "interceptionMode",
    "dropInvalid",
    "includeOutboundPorts",
    "excludeInterfaces",
    "rerouteInterfaces",
    "dualStack",
    "stateDir",
    "logLevel",
    "logFile",
    "logFileMaxBytes",
    "hostPrerequisites",
    // Written by the installer: which installer chained this entry (see install::conflist).
    "installer",
    "eventsSocket",
];

pub const DEFAULT_STATE_DIR: &str = "/var/run/intercept-cni";

/// Parses stdin as a JSON object; anything else is a decode failure (code 6).
pub fn decode(stdin: &[u8]) -> Result<Map<String, Value>> {
    match serde_json::from_slice::<Value>(stdin) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(Error::new(
            Code::Decode,
            "network configuration is not a JSON object",
        )),
        Err(e) => Err(Error::new(
            Code::Decode,
            format!("cannot decode network configuration: {e}"),
        )),
    }
}

/// The config's `cniVersion`: `None` when absent; a non-string is invalid config.
pub fn cni_version(obj: &Map<String, Value>) -> Result<Option<&str>> {
    match obj.get("cniVersion") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid("cniVersion", other, "must be a string")),
    }
}

fn invalid(key: &str, value: &Value, why: impl std::fmt::Display) -> Error {
    Error::config(format!("{key}: invalid value {value}: {why}"))
}

/// Decodes `key` with serde; absent or null means "use the default".
fn field<T: DeserializeOwned>(obj: &Map<String, Value>, key: &str) -> Result<Option<T>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => T::deserialize(v).map(Some).map_err(|e| invalid(key, v, e)),
    }
}

fn port(obj: &Map<String, Value>, key: &str) -> Result<Option<u16>> {
    let Some(n) = field::<u64>(obj, key)? else {
        return Ok(None);
    };
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(Some(p)),
        _ => Err(invalid(key, &obj[key], "must be a port in 1-65535")),
    }
}

/// The array at `key`, borrowed (lists can hold thousands of entries; no copy); absent or null
/// means "use the default".
fn list<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a [Value]>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(v) => Err(invalid(key, v, "must be a list")),
    }
}

fn port_list(obj: &Map<String, Value>, key: &str) -> Result<Option<Vec<PortRange>>> {
    let Some(items) = list(obj, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .map(|item| {
            let parsed = match item {
                Value::Number(n) => match n.as_u64().and_then(|n| u16::try_from(n).ok()) {
                    Some(p) => PortRange::single(p),
                    None => Err("must be a port in 1-65535".to_string()),
                },
                Value::String(s) => s.parse::<PortRange>(),
                _ => Err("must be a port number or an \"a-b\" range string".to_string()),
            };
            parsed.map_err(|why| invalid(key, item, why))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// A network in CIDR notation (a bare address is a single host). Host bits set (`10.1.2.3/8`)
/// are refused: the intent is ambiguous.
fn parse_cidr(s: &str) -> Result<IpNetwork, String> {
    let net: IpNetwork = s.trim().parse().map_err(|e| format!("{e}"))?;
    if net.ip() != net.network() {
        return Err(format!(
            "has host bits set (did you mean {}/{} or a single address?)",
            net.network(),
            net.prefix()
        ));
    }
    Ok(net)
}

fn cidr_list(obj: &Map<String, Value>, key: &str) -> Result<Option<Vec<IpNetwork>>> {
    let Some(items) = list(obj, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .map(|item| {
            let Value::String(s) = item else {
                return Err(invalid(key, item, "must be a CIDR string"));
            };
            parse_cidr(s).map_err(|why| invalid(key, item, why))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// A proxy UID or GID: one number or a list of them (the proxy may run under several).
fn id_list(obj: &Map<String, Value>, key: &str) -> Result<Option<Vec<u32>>> {
    let Some(v) = obj.get(key).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let items = match v {
        Value::Array(items) => items.as_slice(),
        one => std::slice::from_ref(one),
    };
    if items.is_empty() || items.len() > crate::policy::MAX_LIST_ITEMS {
        return Err(invalid(key, v, "must be an ID or a list of 1-256 IDs"));
    }
    items
        .iter()
        .map(|item| u32::deserialize(item).map_err(|e| invalid(key, item, e)))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn interface_list(obj: &Map<String, Value>, key: &str) -> Result<Option<Vec<IfName>>> {
    let Some(items) = field::<Vec<Value>>(obj, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(s) => s.parse::<IfName>().map_err(|why| invalid(key, item, why)),
            _ => Err(invalid(key, item, "must be an interface name")),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// A Kubernetes namespace name: a DNS-1123 label.
fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    s.len() <= 63
        && edge_ok(bytes.first())
        && edge_ok(bytes.last())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

fn namespace_list(obj: &Map<String, Value>, key: &str) -> Result<Vec<String>> {
    let items = field::<Vec<Value>>(obj, key)?.unwrap_or_default();
    items
        .iter()
        .map(|item| match item {
            Value::String(s) if is_dns_label(s) => Ok(s.clone()),
            _ => Err(invalid(
                key,
                item,
                "must be a namespace name (lowercase letters, digits and '-', at most 63)",
            )),
        })
        .collect()
}

fn absolute_path(obj: &Map<String, Value>, key: &str) -> Result<Option<PathBuf>> {
    let Some(s) = field::<String>(obj, key)? else {
        return Ok(None);
    };
    let path = PathBuf::from(&s);
    if !path.is_absolute() {
        return Err(invalid(key, &obj[key], "must be an absolute path"));
    }
    Ok(Some(path))
}

/// Where the invocation's event record goes (`eventsSocket`): an absolute path short enough for
/// a unix socket address, `""` for nowhere, or by default the agent's socket.
pub fn events_target(obj: &Map<String, Value>) -> Result<events::Target> {
    match field::<String>(obj, "eventsSocket")? {
        None => Ok(events::Target::default()),
        Some(s) if s.is_empty() => Ok(events::Target::Off),
        // sun_path holds 108 bytes with the terminating NUL.
        Some(s) if s.starts_with('/') && s.len() < 108 => {
            Ok(events::Target::Socket(PathBuf::from(s)))
        }
        Some(_) => Err(invalid(
            "eventsSocket",
            &obj["eventsSocket"],
            "must be an absolute path shorter than 108 bytes, or \"\" for none",
        )),
    }
}

fn log_file_max_bytes(obj: &Map<String, Value>) -> Result<u64> {
    match field::<u64>(obj, "logFileMaxBytes")? {
        None => Ok(logging::DEFAULT_MAX_BYTES),
        Some(n) if n >= logging::MIN_MAX_BYTES => Ok(n),
        Some(_) => Err(invalid(
            "logFileMaxBytes",
            &obj["logFileMaxBytes"],
            format!("must be at least {}", logging::MIN_MAX_BYTES),
        )),
    }
}

/// Keys this plugin ignores; logged once logging is configured from the same config.
pub fn unknown_keys(obj: &Map<String, Value>) -> impl Iterator<Item = &String> {
    obj.keys().filter(|k| !KNOWN_KEYS.contains(&k.as_str()))
}

/// The known key an unknown one was probably meant to be: same letters in another case, or
/// at most two edits away.
pub fn suggest_key(unknown: &str) -> Option<&'static str> {
    let lower = unknown.to_ascii_lowercase();
    KNOWN_KEYS
        .iter()
        .map(|known| (edit_distance(&lower, &known.to_ascii_lowercase()), *known))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, known)| known)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Whether the config excludes `namespace`, judged from `excludeNamespaces` alone. The order
/// of the checks: a config whose other keys are invalid still leaves the namespaces it lists
/// alone (ADD passes the pod through, CHECK succeeds), so one typo cannot stop kube-system;
/// an invalid `excludeNamespaces` itself excludes nothing.
pub fn excludes_namespace(obj: &Map<String, Value>, namespace: Option<&str>) -> bool {
    let Some(namespace) = namespace else {
        return false;
    };
    namespace_list(obj, "excludeNamespaces").is_ok_and(|list| list.iter().any(|n| n == namespace))
}

impl NetConf {
    /// Validates every key of an already decoded config whose `cniVersion` was negotiated.
    pub fn from_object(obj: &Map<String, Value>, cni_version: &str) -> Result<NetConf> {
        let backend_key = field::<BackendKey>(obj, "backend")?.unwrap_or(BackendKey::Auto);
        let iptables_mode = field::<IptablesModeKey>(obj, "iptablesMode")?;
        let iptables_path = absolute_path(obj, "iptablesPath")?;
        if backend_key == BackendKey::Nftables {
            for (key, set) in [
                ("iptablesMode", iptables_mode.is_some()),
                ("iptablesPath", iptables_path.is_some()),
            ] {
                if set {
                    return Err(Error::config(format!(
                        "{key}: belongs to the other backend (backend is nftables)"
                    )));
                }
            }
        }
        let mode = match iptables_mode {
            Some(IptablesModeKey::Legacy) => Some(IptablesMode::Legacy),
            Some(IptablesModeKey::Nft) => Some(IptablesMode::Nft),
            Some(IptablesModeKey::Auto) | None => None,
        };
        let backend = match backend_key {
            BackendKey::Auto => BackendChoice::Auto,
            BackendKey::Nftables => BackendChoice::Nftables,
            BackendKey::Iptables => BackendChoice::Iptables(mode),
        };

        let netconf_settings = SettingsOverlay {
            inbound_port: port(obj, "inboundPort")?,
            outbound_port: port(obj, "outboundPort")?,
            proxy_uids: id_list(obj, "proxyUID")?,
            proxy_gids: id_list(obj, "proxyGID")?,
            exclude_inbound_ports: port_list(obj, "excludeInboundPorts")?,
            exclude_inbound_sources: cidr_list(obj, "excludeInboundSourceCIDRs")?,
            exclude_outbound_ports: port_list(obj, "excludeOutboundPorts")?,
            include_inbound_ports: port_list(obj, "includeInboundPorts")?.map(Some),
            exclude_outbound_cidrs: cidr_list(obj, "excludeOutboundCIDRs")?,
            include_outbound_cidrs: cidr_list(obj, "includeOutboundCIDRs")?.map(Some),
            dns_capture: field(obj, "dnsCapture")?,
            interception_mode: field(obj, "interceptionMode")?,
            drop_invalid: field(obj, "dropInvalid")?,
            include_outbound_ports: port_list(obj, "includeOutboundPorts")?,
            exclude_interfaces: interface_list(obj, "excludeInterfaces")?,
            reroute_interfaces: interface_list(obj, "rerouteInterfaces")?,
            dual_stack: field(obj, "dualStack")?,
            ..SettingsOverlay::default()
        };
        let mut settings = PlanSettings::default();
        netconf_settings.apply_to(&mut settings);
        // Rules across keys (equal ports) depend on the pod's mesh, known only per pod: they
        // are checked when its plan is built (policy::decide, build_plan).

        let log_level = match field::<LogLevelKey>(obj, "logLevel")?.unwrap_or(LogLevelKey::Info) {
            LogLevelKey::Error => log::LevelFilter::Error,
            LogLevelKey::Warn => log::LevelFilter::Warn,
            LogLevelKey::Info => log::LevelFilter::Info,
            LogLevelKey::Debug => log::LevelFilter::Debug,
            LogLevelKey::Trace => log::LevelFilter::Trace,
        };

        let prev_result = match obj.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(v) => return Err(invalid("prevResult", v, "must be a JSON object")),
        };

        // Read again by `cmd` even when other keys are invalid; validated here like every key.
        events_target(obj)?;

        let valid_attachments = match field(obj, "cni.dev/valid-attachments")? {
            Some(list) => list,
            None => field(obj, "cni.dev/attachments")?.unwrap_or_default(),
        };

        Ok(NetConf {
            cni_version: cni_version.to_string(),
            name: obj.get("name").cloned().unwrap_or(Value::Null),
            plugin_type: obj.get("type").cloned().unwrap_or(Value::Null),
            prev_result,
            runtime_config: obj.get("runtimeConfig").cloned(),
            backend,
            backend_options: BackendOptions { iptables_path },
            pod_selection: field(obj, "podSelection")?.unwrap_or(PodSelection::Annotated),
            pod_overrides: field(obj, "podOverrides")?.unwrap_or(true),
            exclude_namespaces: namespace_list(obj, "excludeNamespaces")?,
            settings,
            netconf_settings,
            state_dir: absolute_path(obj, "stateDir")?
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            log_level,
            log_file: absolute_path(obj, "logFile")?,
            log_file_max_bytes: log_file_max_bytes(obj)?,
            host_prerequisites: field(obj, "hostPrerequisites")?.unwrap_or(HostPolicy::Enforce),
            valid_attachments,
        })
    }
}

/// Sorted, overlapping and adjacent ranges merged: one canonical form for every backend (and
/// nftables interval sets refuse overlapping elements).
fn normalize_ports(ranges: &[PortRange]) -> Vec<PortRange> {
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let mut merged: Vec<PortRange> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match merged.last_mut() {
            Some(last) if u32::from(r.start()) <= u32::from(last.end()) + 1 => {
                if r.end() > last.end() {
                    *last = PortRange::new(last.start(), r.end()).unwrap_or(*last);
                }
            }
            _ => merged.push(r),
        }
    }
    merged
}

/// `keep` minus every port in `remove`, normalized.
fn subtract_ports(keep: &[PortRange], remove: &[PortRange]) -> Vec<PortRange> {
    let remove = normalize_ports(remove);
    let mut out = Vec::new();
    for r in normalize_ports(keep) {
        let mut start = u32::from(r.start());
        let end = u32::from(r.end());
        for cut in remove
            .iter()
            .filter(|c| c.end() >= r.start() && c.start() <= r.end())
        {
            if u32::from(cut.start()) > start {
                out.push((start, u32::from(cut.start()) - 1));
            }
            start = start.max(u32::from(cut.end()) + 1);
        }
        if start <= end {
            out.push((start, end));
        }
    }
    // Every bound stays inside the original 1..=65535 ranges, so the conversions cannot fail.
    out.into_iter()
        .filter_map(|(a, b)| PortRange::new(u16::try_from(a).ok()?, u16::try_from(b).ok()?).ok())
        .collect()
}

/// Sorted, without duplicates or networks contained in another listed one. One sweep after
/// sorting (lists of thousands are valid): two prefixes either nest or are disjoint, so a
/// network is covered exactly when it starts within the last kept network of its family.
fn normalize_cidrs(cidrs: &[IpNetwork]) -> Vec<IpNetwork> {
    let mut sorted = cidrs.to_vec();
    sorted.sort_by_key(|n| (n.is_ipv6(), n.network(), n.prefix()));
    let mut kept: Vec<IpNetwork> = Vec::with_capacity(sorted.len());
    for net in sorted {
        let covered = kept
            .last()
            .is_some_and(|k| k.is_ipv6() == net.is_ipv6() && k.contains(net.network()));
        if !covered {
            kept.push(net);
        }
    }
    kept
}

/// The families to program: the pod's, less IPv6 when its proxy does not serve IPv6. istio-cni
/// programs IPv4 always and IPv6 only with dual-stack or an IPv6-first pod (istio/istio
/// `tools/common/config/config.go`, getLocalIP); linkerd-cni only with its `ipv6` switch, off by
/// default; a plain pod gets the families it has unless `dualStack` is false.
fn families_for(settings: &PlanSettings, pod: Families, ipv6_first: bool) -> Families {
    let ipv6 = pod.ipv6
        && match settings.semantics {
            Semantics::Istio => settings.dual_stack == Some(true) || ipv6_first,
            Semantics::Linkerd => settings.dual_stack == Some(true),
            Semantics::Own => settings.dual_stack != Some(false),
        };
    let ipv4 = pod.ipv4 || settings.semantics == Semantics::Istio;
    Families { ipv4, ipv6 }
}

/// The one step from settings (config, possibly overlaid by a per-pod policy) to a plan, for a
/// pod with addresses in `pod` (`ipv6_first`: its first address is IPv6).
pub fn build_plan(
    settings: &PlanSettings,
    pod: Families,
    ipv6_first: bool,
) -> Result<InterceptPlan> {
    settings.validate()?;
    let inbound_excluded = &settings.exclude_inbound_ports;
    let inbound_ports = match &settings.include_inbound_ports {
        None => InboundPorts::AllExcept(normalize_ports(inbound_excluded)),
        // istio-iptables redirects an include list as it is, exclusions ignored.
        Some(include) if settings.semantics == Semantics::Istio && !include.is_empty() => {
            InboundPorts::Only(normalize_ports(include))
        }
        Some(include) => {
            let only = subtract_ports(include, inbound_excluded);
            if only.is_empty() {
                InboundPorts::None
            } else {
                InboundPorts::Only(only)
            }
        }
    };
    let exclude_cidrs = normalize_cidrs(&settings.exclude_outbound_cidrs);
    let outbound_cidrs = match &settings.include_outbound_cidrs {
        None => OutboundCidrs::AllExcept(exclude_cidrs),
        Some(include) => OutboundCidrs::Only {
            include: normalize_cidrs(include),
            exclude: exclude_cidrs,
        },
    };
    let mut uids = settings.proxy_uids.clone();
    let mut gids = settings.proxy_gids.clone();
    if settings.semantics == Semantics::Linkerd {
        // proxy-init writes its owner rules only for IDs above 0.
        uids.retain(|&id| id > 0);
        gids.retain(|&id| id > 0);
    }
    dedup_keep_order(&mut uids);
    dedup_keep_order(&mut gids);
    Ok(InterceptPlan {
        inbound_port: settings.inbound_port,
        outbound_port: settings.outbound_port,
        proxy_uids: uids,
        proxy_gids: gids,
        inbound_ports,
        exclude_inbound_sources: normalize_cidrs(&settings.exclude_inbound_sources),
        exclude_outbound_ports: normalize_ports(&settings.exclude_outbound_ports),
        outbound_cidrs,
        include_outbound_ports: normalize_ports(&settings.include_outbound_ports),
        exclude_interfaces: dedup_sorted(&settings.exclude_interfaces),
        reroute_interfaces: dedup_sorted(&settings.reroute_interfaces),
        semantics: settings.semantics,
        families: families_for(settings, pod, ipv6_first),
        dns: settings.dns_capture.then(DnsCapture::istio),
        mode: match settings.interception_mode {
            ModeKey::Redirect => InterceptionMode::Redirect,
            ModeKey::Tproxy => InterceptionMode::Tproxy(Tproxy::istio()),
        },
        drop_invalid: settings.drop_invalid,
    })
}

fn dedup_keep_order<T: PartialEq + Copy>(list: &mut Vec<T>) {
    let mut seen = Vec::with_capacity(list.len());
    list.retain(|x| {
        let new = !seen.contains(x);
        seen.push(*x);
        new
    });
}

fn dedup_sorted(list: &[IfName]) -> Vec<IfName> {
    let mut out = list.to_vec();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::version::SUPPORTED;
    use serde_json::json;
    use std::path::Path;

    fn fixture(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/config")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn parse(bytes: &[u8]) -> Result<NetConf> {
        let obj = decode(bytes)?;
        let version = cni_version(&obj)?.unwrap_or("1.1.0").to_string();
        NetConf::from_object(&obj, &version)
    }

    use crate::plan::test_support::{nets, ports};

    #[test]
    fn minimal_config_gets_the_defaults() {
        let conf = parse(&fixture("valid-minimal.json")).unwrap();
        assert_eq!(conf.cni_version, "1.0.0");
        assert_eq!(conf.name, json!("k8s-pod-network"));
        assert_eq!(conf.plugin_type, json!("intercept-cni"));
        assert_eq!(conf.backend, BackendChoice::Auto);
        assert_eq!(conf.backend_options, BackendOptions::default());
        assert_eq!(conf.pod_selection, PodSelection::Annotated);
        assert!(conf.pod_overrides);
        assert!(conf.exclude_namespaces.is_empty());
        assert_eq!(conf.settings, PlanSettings::default());
        assert_eq!(conf.netconf_settings, SettingsOverlay::default());
        assert_eq!(conf.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(conf.log_level, log::LevelFilter::Info);
        assert_eq!(conf.log_file, None);
        assert_eq!(conf.log_file_max_bytes, 10 << 20);
        assert_eq!(conf.host_prerequisites, HostPolicy::Enforce);
        assert_eq!(conf.prev_result, None);
        assert!(conf.valid_attachments.is_empty());
    }

    #[test]
    fn full_config_sets_every_key() {
        let bytes = fixture("valid-full.json");
        let conf = parse(&bytes).unwrap();
        assert_eq!(
            conf.backend,
            BackendChoice::Iptables(Some(IptablesMode::Legacy))
        );
        assert_eq!(
            conf.backend_options.iptables_path,
            Some(PathBuf::from("/usr/sbin"))
        );
        assert_eq!(conf.pod_selection, PodSelection::All);
        assert!(!conf.pod_overrides);
        assert_eq!(conf.exclude_namespaces, ["kube-system", "istio-system"]);
        let s = &conf.settings;
        assert_eq!((s.inbound_port, s.outbound_port), (15106, 15101));
        assert_eq!(
            (s.proxy_uids.clone(), s.proxy_gids.clone()),
            (vec![2000], vec![0])
        );
        assert_eq!(s.exclude_inbound_ports, ports(&[(22, 22), (15020, 15021)]));
        assert_eq!(s.exclude_inbound_sources, nets(&["10.96.0.0/12"]));
        assert_eq!(s.exclude_outbound_ports, ports(&[(53, 53)]));
        assert_eq!(
            s.include_inbound_ports,
            Some(ports(&[(8000, 8100), (9090, 9090)]))
        );
        assert_eq!(
            s.exclude_outbound_cidrs,
            nets(&["169.254.169.254/32", "fd00::/8"])
        );
        assert_eq!(
            s.include_outbound_cidrs,
            Some(nets(&["10.0.0.0/8", "2001:db8::/32"]))
        );
        assert_eq!(conf.state_dir, PathBuf::from("/run/intercept"));
        assert_eq!(conf.log_level, log::LevelFilter::Debug);
        assert_eq!(
            conf.log_file,
            Some(PathBuf::from("/var/log/intercept-cni.log"))
        );
        assert_eq!(conf.host_prerequisites, HostPolicy::Warn);
        // Every knob is set, so the netconf's own layer gives the same settings.
        let mut layered = PlanSettings::default();
        conf.netconf_settings.apply_to(&mut layered);
        assert_eq!(&layered, s);
        assert_eq!(conf.runtime_config, Some(json!({"portMappings": []})));
        let obj = decode(&bytes).unwrap();
        assert_eq!(unknown_keys(&obj).collect::<Vec<_>>(), ["someFutureKey"]);
    }

    #[test]
    fn unknown_keys_get_a_suggestion() {
        assert_eq!(suggest_key("excludeNamespace"), Some("excludeNamespaces"));
        assert_eq!(suggest_key("inboundport"), Some("inboundPort"));
        assert_eq!(suggest_key("proxyUid"), Some("proxyUID"));
        assert_eq!(suggest_key("somethingElse"), None);
    }

    #[test]
    fn excluded_namespaces_are_read_even_when_other_keys_are_invalid() {
        let obj =
            decode(br#"{"backend": "nftabels", "excludeNamespaces": ["kube-system"]}"#).unwrap();
        assert!(NetConf::from_object(&obj, "1.0.0").is_err());
        assert!(excludes_namespace(&obj, Some("kube-system")));
        assert!(!excludes_namespace(&obj, Some("default")));
        assert!(!excludes_namespace(&obj, None));
        let bad = decode(br#"{"excludeNamespaces": ["kube-system", "Bad_Name"]}"#).unwrap();
        assert!(!excludes_namespace(&bad, Some("kube-system")));
    }

    #[test]
    fn iptables_mode_auto_and_backend_auto_with_iptables_keys() {
        let conf = parse(br#"{"backend": "iptables", "iptablesMode": "auto"}"#).unwrap();
        assert_eq!(conf.backend, BackendChoice::Iptables(None));
        // auto may pick iptables, so its keys are accepted there.
        let conf = parse(br#"{"iptablesMode": "nft", "iptablesPath": "/sbin"}"#).unwrap();
        assert_eq!(conf.backend, BackendChoice::Auto);
        let conf = parse(br#"{"inboundPort": null, "proxyGID": null}"#).unwrap();
        assert_eq!(conf.settings, PlanSettings::default());
    }

    #[test]
    fn mesh_keys_parse() {
        let conf = parse(
            br#"{"proxyUID": [1337, 1338], "proxyGID": 7, "includeOutboundPorts": [9999],
                 "excludeInterfaces": ["net1"], "rerouteInterfaces": ["tap0"], "dualStack": false}"#,
        )
        .unwrap();
        let s = &conf.settings;
        assert_eq!(
            (s.proxy_uids.clone(), s.proxy_gids.clone()),
            (vec![1337, 1338], vec![7])
        );
        assert_eq!(s.include_outbound_ports, ports(&[(9999, 9999)]));
        assert_eq!(s.exclude_interfaces[0].as_str(), "net1");
        assert_eq!(s.reroute_interfaces[0].as_str(), "tap0");
        assert_eq!(s.dual_stack, Some(false));
        for bad in [
            r#"{"proxyUID": []}"#,
            r#"{"proxyGID": [-1]}"#,
            r#"{"rerouteInterfaces": [""]}"#,
        ] {
            assert_eq!(
                parse(bad.as_bytes()).unwrap_err().code,
                Code::InvalidConfig,
                "{bad}"
            );
        }
    }

    #[test]
    fn log_file_max_bytes_has_a_floor() {
        let conf = parse(br#"{"logFileMaxBytes": 4096}"#).unwrap();
        assert_eq!(conf.log_file_max_bytes, 4096);
        for bad in ["4095", "0", "-1", "\"1M\"", "1.5e6"] {
            let e = parse(format!(r#"{{"logFileMaxBytes": {bad}}}"#).as_bytes()).unwrap_err();
            assert_eq!(e.code, Code::InvalidConfig, "{bad}");
            assert!(e.msg.contains("logFileMaxBytes"), "{}", e.msg);
        }
    }

    #[test]
    fn gc_attachments_from_either_key() {
        let conf = parse(&fixture("valid-gc.json")).unwrap();
        assert_eq!(conf.valid_attachments.len(), 2);
        assert_eq!(conf.valid_attachments[1].container_id, "def456");
        assert_eq!(conf.valid_attachments[1].ifname, "net1");
        let old = br#"{"cni.dev/attachments": [{"containerID": "a", "ifname": "eth0"}]}"#;
        assert_eq!(parse(old).unwrap().valid_attachments.len(), 1);
        let null = br#"{"cni.dev/valid-attachments": null}"#;
        assert!(parse(null).unwrap().valid_attachments.is_empty());
    }

    #[test]
    fn every_invalid_fixture_is_code_7_naming_its_key() {
        let cases = [
            ("backend", "backend"),
            (
                "nftables-with-iptables-mode",
                "iptablesMode: belongs to the other backend",
            ),
            (
                "nftables-with-iptables-path",
                "iptablesPath: belongs to the other backend",
            ),
            ("iptables-path-relative", "iptablesPath"),
            ("iptables-mode", "iptablesMode"),
            ("pod-selection", "podSelection"),
            ("pod-overrides", "podOverrides: invalid value \"no\""),
            (
                "exclude-namespaces",
                "excludeNamespaces: invalid value \"Bad_NS\"",
            ),
            (
                "inbound-source-host-bits",
                "excludeInboundSourceCIDRs: invalid value \"10.96.0.1/12\"",
            ),
            ("inbound-port-zero", "inboundPort: invalid value 0"),
            ("outbound-port-too-big", "outboundPort: invalid value 65536"),
            ("port-as-string", "inboundPort: invalid value \"15006\""),
            ("proxy-uid-negative", "proxyUID: invalid value -1"),
            ("proxy-gid-too-big", "proxyGID: invalid value 4294967296"),
            (
                "exclude-port-reversed",
                "excludeInboundPorts: invalid value \"9000-8000\"",
            ),
            ("exclude-port-garbage", "excludeOutboundPorts"),
            ("include-ports-not-list", "includeInboundPorts"),
            (
                "cidr-garbage",
                "excludeOutboundCIDRs: invalid value \"10.0.0.0/33\"",
            ),
            (
                "cidr-host-bits",
                "includeOutboundCIDRs: invalid value \"10.1.2.3/8\"",
            ),
            ("state-dir-relative", "stateDir"),
            ("log-level", "logLevel: invalid value \"verbose\""),
            ("log-file-relative", "logFile"),
            ("host-prerequisites", "hostPrerequisites"),
            ("prev-result-not-object", "prevResult"),
            ("gc-attachments-shape", "cni.dev/valid-attachments"),
            (
                "exclude-interfaces",
                "excludeInterfaces: invalid value \"eth0 -j ACCEPT\"",
            ),
            ("proxy-uid-list", "proxyUID: invalid value \"x\""),
            ("dual-stack", "dualStack: invalid value \"yes\""),
        ];
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/config");
        let on_disk = std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().starts_with("invalid-")
            })
            .count();
        assert_eq!(
            on_disk,
            cases.len(),
            "every invalid fixture is in the table"
        );
        for (name, expected) in cases {
            let e = parse(&fixture(&format!("invalid-{name}.json"))).unwrap_err();
            assert_eq!(e.code, Code::InvalidConfig, "{name}: {e}");
            assert!(e.msg.contains(expected), "{name}: {:?}", e.msg);
        }
    }

    #[test]
    fn decode_failures_are_code_6() {
        for bad in [
            fixture("malformed.json"),
            b"".to_vec(),
            b"[]".to_vec(),
            b"\"x\"".to_vec(),
        ] {
            assert_eq!(decode(&bad).unwrap_err().code, Code::Decode);
        }
    }

    #[test]
    fn non_string_cni_version_is_code_7() {
        let obj = decode(br#"{"cniVersion": 1.0}"#).unwrap();
        assert_eq!(cni_version(&obj).unwrap_err().code, Code::InvalidConfig);
    }

    #[test]
    fn every_supported_version_parses_the_same_config() {
        for v in SUPPORTED {
            let bytes = format!(r#"{{"cniVersion": "{v}", "inboundPort": 8080}}"#);
            let conf = parse(bytes.as_bytes()).unwrap();
            assert_eq!(conf.cni_version, v);
            assert_eq!(conf.settings.inbound_port, 8080);
        }
    }

    #[test]
    fn default_settings_give_the_default_plan() {
        let plan = build_plan(&PlanSettings::default(), Families::BOTH, false).unwrap();
        assert_eq!(plan, InterceptPlan::with_defaults(Families::BOTH));
    }

    #[test]
    fn plan_merges_ranges_and_subtracts_excludes_from_includes() {
        let settings = PlanSettings {
            exclude_inbound_ports: ports(&[(8050, 8060), (22, 22), (23, 25)]),
            include_inbound_ports: Some(ports(&[(8000, 8100), (80, 80), (22, 22), (15000, 15010)])),
            exclude_outbound_ports: ports(&[(53, 53), (50, 60), (100, 200), (201, 201)]),
            ..PlanSettings::default()
        };
        let v4 = Families {
            ipv4: true,
            ipv6: false,
        };
        let plan = build_plan(&settings, v4, false).unwrap();
        assert_eq!(plan.families, v4);
        assert_eq!(
            plan.inbound_ports,
            InboundPorts::Only(ports(&[
                (80, 80),
                (8000, 8049),
                (8061, 8100),
                (15000, 15010)
            ]))
        );
        assert_eq!(plan.exclude_outbound_ports, ports(&[(50, 60), (100, 201)]));

        let settings = PlanSettings {
            exclude_inbound_ports: ports(&[(1, 65535)]),
            ..PlanSettings::default()
        };
        let plan = build_plan(&settings, Families::BOTH, false).unwrap();
        assert_eq!(
            plan.inbound_ports,
            InboundPorts::AllExcept(ports(&[(1, 65535)]))
        );
    }

    #[test]
    fn empty_or_fully_excluded_include_list_means_no_inbound_interception() {
        for include in [vec![], ports(&[(22, 22)])] {
            let settings = PlanSettings {
                exclude_inbound_ports: ports(&[(22, 22)]),
                include_inbound_ports: Some(include.clone()),
                ..PlanSettings::default()
            };
            let plan = build_plan(&settings, Families::BOTH, false).unwrap();
            assert_eq!(plan.inbound_ports, InboundPorts::None, "{include:?}");
        }
    }

    #[test]
    fn outbound_cidrs_are_normalized() {
        let settings = PlanSettings {
            exclude_outbound_cidrs: nets(&["10.1.0.0/16", "10.0.0.0/8", "fd00::/8", "10.0.0.0/8"]),
            ..PlanSettings::default()
        };
        let plan = build_plan(&settings, Families::BOTH, false).unwrap();
        assert_eq!(
            plan.outbound_cidrs,
            OutboundCidrs::AllExcept(nets(&["10.0.0.0/8", "fd00::/8"]))
        );
        let settings = PlanSettings {
            include_outbound_cidrs: Some(nets(&["2001:db8::/32", "192.168.0.0/16"])),
            exclude_outbound_cidrs: nets(&["192.168.1.0/24"]),
            ..PlanSettings::default()
        };
        let plan = build_plan(&settings, Families::BOTH, false).unwrap();
        assert_eq!(
            plan.outbound_cidrs,
            OutboundCidrs::Only {
                include: nets(&["192.168.0.0/16", "2001:db8::/32"]),
                exclude: nets(&["192.168.1.0/24"]),
            }
        );
    }

    #[test]
    fn namespace_names_are_dns_labels() {
        let ok = parse(br#"{"excludeNamespaces": ["kube-system", "a", "0-x-9"]}"#).unwrap();
        assert_eq!(ok.exclude_namespaces, ["kube-system", "a", "0-x-9"]);
        let long = "a".repeat(64);
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", "a b", long.as_str()] {
            let conf = format!(r#"{{"excludeNamespaces": [{bad:?}]}}"#);
            let e = parse(conf.as_bytes()).unwrap_err();
            assert!(e.msg.starts_with("excludeNamespaces"), "{bad:?}: {e}");
        }
        assert!(parse(br#"{"excludeNamespaces": "kube-system"}"#).is_err());
    }

    #[test]
    fn an_overlay_keeps_what_it_does_not_set() {
        let mut s = PlanSettings {
            proxy_gids: vec![7],
            include_inbound_ports: Some(ports(&[(80, 80)])),
            exclude_outbound_ports: ports(&[(53, 53)]),
            ..PlanSettings::default()
        };
        SettingsOverlay::default().apply_to(&mut s);
        assert_eq!(s.proxy_gids, vec![7]);
        let overlay = SettingsOverlay {
            outbound_port: Some(4140),
            include_inbound_ports: Some(None),
            exclude_outbound_ports: Some(vec![]),
            exclude_inbound_sources: Some(nets(&["10.0.0.0/8"])),
            ..SettingsOverlay::default()
        };
        overlay.apply_to(&mut s);
        assert_eq!(s.outbound_port, 4140);
        assert_eq!(s.inbound_port, 15006);
        assert_eq!(s.include_inbound_ports, None);
        assert!(s.exclude_outbound_ports.is_empty());
        assert_eq!(s.exclude_inbound_sources, nets(&["10.0.0.0/8"]));
        assert_eq!(s.proxy_gids, vec![7]);
    }

    #[test]
    fn inbound_sources_are_normalized_into_the_plan() {
        let settings = PlanSettings {
            exclude_inbound_sources: nets(&["10.1.0.0/16", "fd00::/8", "10.0.0.0/8"]),
            ..PlanSettings::default()
        };
        let plan = build_plan(&settings, Families::BOTH, false).unwrap();
        assert_eq!(
            plan.exclude_inbound_sources,
            nets(&["10.0.0.0/8", "fd00::/8"])
        );
    }

    #[test]
    fn equal_ports_in_the_netconf_are_left_to_the_pods_mesh() {
        // Linkerd's own setup uses one port for both directions; a plain pod is refused later,
        // when its plan is built (below).
        let conf = parse(&fixture("valid-same-ports.json")).unwrap();
        assert_eq!(conf.settings.inbound_port, conf.settings.outbound_port);
    }

    #[test]
    fn an_overlay_that_makes_the_ports_equal_is_refused() {
        let settings = PlanSettings {
            outbound_port: 15006,
            ..PlanSettings::default()
        };
        let e = build_plan(&settings, Families::BOTH, false).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
    }
}
