//! Istio: what istio-cni reads from an injected pod (`sidecar.istio.io/`,
//! `traffic.sidecar.istio.io/` annotations) and its defaults.

use super::annotations::{invalid, quote, Annotations, HostBits, ListForm, Reader};
use crate::cni::config::{ModeKey, SettingsOverlay};
use crate::cni::error::Result;
use crate::plan::{PortRange, Semantics};
use serde::Deserialize;

pub(super) const ISTIO_STATUS: &str = "sidecar.istio.io/status";
pub(super) const ISTIO_INJECT: &str = "sidecar.istio.io/inject";
pub(super) const ISTIO_INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
pub(super) const ISTIO_PROXY_CONFIG: &str = "proxy.istio.io/config";
pub(super) const ISTIO_INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub(super) const ISTIO_EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub(super) const ISTIO_EXCLUDE_OUTBOUND_PORTS: &str =
    "traffic.sidecar.istio.io/excludeOutboundPorts";
pub(super) const ISTIO_INCLUDE_OUTBOUND_RANGES: &str =
    "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub(super) const ISTIO_EXCLUDE_OUTBOUND_RANGES: &str =
    "traffic.sidecar.istio.io/excludeOutboundIPRanges";
pub(super) const ISTIO_INCLUDE_OUTBOUND_PORTS: &str =
    "traffic.sidecar.istio.io/includeOutboundPorts";
pub(super) const ISTIO_EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
pub(super) const ISTIO_KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
pub(super) const ISTIO_REROUTE_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
pub(super) const ISTIO_STATUS_PORT: &str = "status.sidecar.istio.io/port";
pub(super) const ISTIO_TEMPLATES: &str = "inject.istio.io/templates";

/// Istio's injector injects only for y, yes, true or on (any case); any other non-empty value
/// leaves the pod without a sidecar.
pub(super) fn istio_reads_as_false(value: &str) -> bool {
    !value.is_empty()
        && !["y", "yes", "true", "on"]
            .iter()
            .any(|t| value.eq_ignore_ascii_case(t))
}

/// What `sidecar.istio.io/interceptionMode` asks for.
pub(super) enum IstioMode {
    /// NONE: the proxy wants no redirection at all.
    Skip(String),
    Set(ModeKey),
    Unset,
}

pub(super) fn istio_interception_mode(a: &Annotations) -> Result<IstioMode> {
    match a.get(ISTIO_INTERCEPTION_MODE) {
        None => Ok(IstioMode::Unset),
        Some("REDIRECT") => Ok(IstioMode::Set(ModeKey::Redirect)),
        Some("TPROXY") => Ok(IstioMode::Set(ModeKey::Tproxy)),
        Some("NONE") => Ok(IstioMode::Skip(format!(
            "annotation {ISTIO_INTERCEPTION_MODE}=\"NONE\" (the proxy wants no redirection)"
        ))),
        Some(other) => Err(invalid(
            ISTIO_INTERCEPTION_MODE,
            other,
            "must be REDIRECT, TPROXY or NONE",
        )),
    }
}

/// The modes Istio's proxy asks for in `proxy.istio.io/config` (`proxyMetadata`, which the
/// injector turns into the proxy's environment, where istio-cni reads it).
pub(super) fn istio_proxy_config(
    a: &Annotations,
    used: &mut Vec<String>,
) -> Result<SettingsOverlay> {
    let Some(text) = a.get(ISTIO_PROXY_CONFIG) else {
        return Ok(SettingsOverlay::default());
    };
    let metadata = super::proxy_config::ProxyMetadata::parse(text)
        .map_err(|why| invalid(ISTIO_PROXY_CONFIG, text, why))?;
    if metadata != super::proxy_config::ProxyMetadata::default() {
        used.push(ISTIO_PROXY_CONFIG.to_string());
    }
    Ok(SettingsOverlay {
        dns_capture: metadata.dns_capture,
        drop_invalid: metadata.drop_invalid,
        // ISTIO_DUAL_STACK: the proxy serves IPv6, so istio-cni programs ip6tables too.
        dual_stack: metadata.dual_stack,
        ..SettingsOverlay::default()
    })
}

/// Istio's `traffic.sidecar.istio.io/` annotations, with Istio's meaning of `*` and "".
pub(super) fn overlay(a: &Annotations, used: &mut Vec<String>) -> Result<SettingsOverlay> {
    let mut r = Reader {
        annotations: a,
        empty_is_unset: false,
        used,
    };
    Ok(SettingsOverlay {
        include_inbound_ports: r.ports(ISTIO_INCLUDE_INBOUND_PORTS, ListForm::Include)?,
        exclude_inbound_ports: r.excluded_ports(ISTIO_EXCLUDE_INBOUND_PORTS)?,
        exclude_outbound_ports: r.excluded_ports(ISTIO_EXCLUDE_OUTBOUND_PORTS)?,
        include_outbound_cidrs: r.cidrs(
            ISTIO_INCLUDE_OUTBOUND_RANGES,
            ListForm::Include,
            HostBits::Mask,
        )?,
        exclude_outbound_cidrs: r.excluded_cidrs(ISTIO_EXCLUDE_OUTBOUND_RANGES, HostBits::Mask)?,
        include_outbound_ports: r.excluded_ports(ISTIO_INCLUDE_OUTBOUND_PORTS)?,
        exclude_interfaces: r.interfaces(ISTIO_EXCLUDE_INTERFACES)?,
        // istio-cni prefers the new name and reads the deprecated one only without it.
        reroute_interfaces: match r.interfaces(ISTIO_REROUTE_INTERFACES)? {
            Some(list) => Some(list),
            None => r.interfaces(ISTIO_KUBEVIRT_INTERFACES)?,
        },
        // The injector adds the status port to excludeInboundPorts; kept excluded if it did not.
        more_exclude_inbound_ports: r.port(ISTIO_STATUS_PORT)?.map(port).into_iter().collect(),
        ..SettingsOverlay::default()
    })
}

/// The `traffic.sidecar.istio.io/` annotations read here; any other is warned about.
const TRAFFIC_KNOWN: [&str; 8] = [
    ISTIO_INCLUDE_INBOUND_PORTS,
    ISTIO_EXCLUDE_INBOUND_PORTS,
    ISTIO_EXCLUDE_OUTBOUND_PORTS,
    ISTIO_INCLUDE_OUTBOUND_RANGES,
    ISTIO_EXCLUDE_OUTBOUND_RANGES,
    ISTIO_INCLUDE_OUTBOUND_PORTS,
    ISTIO_EXCLUDE_INTERFACES,
    ISTIO_KUBEVIRT_INTERFACES,
];

/// istio-cni's defaults (`cni/pkg/plugin/sidecar_redirect.go`): UID and GID 1337, and the
/// status port 15020 excluded outbound while `excludeOutboundPorts` is absent.
pub(super) fn defaults() -> SettingsOverlay {
    SettingsOverlay {
        semantics: Some(Semantics::Istio),
        inbound_port: Some(15006),
        outbound_port: Some(15001),
        proxy_uids: Some(vec![1337]),
        proxy_gids: Some(vec![1337]),
        exclude_outbound_ports: Some(vec![port(15020)]),
        ..SettingsOverlay::default()
    }
}

fn port(p: u16) -> PortRange {
    PortRange::single(p).unwrap_or_else(|_| unreachable!("not port 0"))
}

/// The part of the injector's status annotation that tells which containers it added.
#[derive(Deserialize)]
struct Status {
    #[serde(default, rename = "initContainers")]
    init_containers: Option<Vec<String>>,
    #[serde(default)]
    containers: Option<Vec<String>>,
}

/// `Some(reason)` for a pod istio-cni leaves alone although it is injected: one that carries
/// `istio-init` (it programs itself), a gateway (`inject.istio.io/templates` naming `gateway`:
/// a gateway has no inbound listener), or one whose status lists no `istio-proxy`.
pub(super) fn programs_itself(a: &Annotations) -> Result<Option<String>> {
    if let Some(templates) = a.get(ISTIO_TEMPLATES) {
        if templates.split(',').any(|t| t.trim() == "gateway") {
            return Ok(Some(format!(
                "annotation {ISTIO_TEMPLATES} names the gateway template (istio-cni skips gateways)"
            )));
        }
    }
    let Some(raw) = a.get(ISTIO_STATUS) else {
        return Ok(None);
    };
    let status: Status = serde_json::from_str(raw).map_err(|_| {
        invalid(
            ISTIO_STATUS,
            raw,
            "is not the injector's JSON status object",
        )
    })?;
    let init = status.init_containers.unwrap_or_default();
    let main = status.containers.unwrap_or_default();
    if init.iter().any(|c| c == "istio-init") {
        return Ok(Some(format!(
            "annotation {ISTIO_STATUS} lists the istio-init container (the pod programs itself)"
        )));
    }
    let listed = !init.is_empty() || !main.is_empty();
    if listed && !init.iter().chain(&main).any(|c| c == "istio-proxy") {
        return Ok(Some(format!(
            "annotation {ISTIO_STATUS} lists no istio-proxy container"
        )));
    }
    Ok(None)
}

/// Annotations under Istio's traffic prefix that this plugin does not read: never silent.
pub(super) fn warn_unsupported(a: &Annotations) {
    for key in a.0.keys() {
        if key.starts_with("traffic.sidecar.istio.io/") && !TRAFFIC_KNOWN.contains(key) {
            log::warn!(
                "pod annotation {} affects Istio's capture and is not supported: ignored",
                quote(key)
            );
        }
    }
}
