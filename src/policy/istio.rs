//! Istio: what istio-cni reads from an injected pod (`sidecar.istio.io/`,
//! `traffic.sidecar.istio.io/` annotations) and its defaults.

use super::annotations::{invalid, Annotations, HostBits, ListForm, Reader};
use crate::cni::config::{ModeKey, SettingsOverlay};
use crate::cni::error::Result;

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
    if metadata.dns_capture.is_some() || metadata.drop_invalid.is_some() {
        used.push(ISTIO_PROXY_CONFIG.to_string());
    }
    Ok(SettingsOverlay {
        dns_capture: metadata.dns_capture,
        drop_invalid: metadata.drop_invalid,
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
        ..SettingsOverlay::default()
    })
}
