//! Our own `intercept-cni.io/` annotations.

use super::annotations::{quote, Annotations, HostBits, ListForm, Reader};
use crate::cni::config::SettingsOverlay;
use crate::cni::error::Result;

pub(super) const PREFIX: &str = "intercept-cni.io/";

pub(super) const ENABLED: &str = "intercept-cni.io/enabled";
pub(super) const INBOUND_PORT: &str = "intercept-cni.io/inbound-port";
pub(super) const OUTBOUND_PORT: &str = "intercept-cni.io/outbound-port";
pub(super) const PROXY_UID: &str = "intercept-cni.io/proxy-uid";
pub(super) const PROXY_GID: &str = "intercept-cni.io/proxy-gid";
pub(super) const INCLUDE_INBOUND_PORTS: &str = "intercept-cni.io/include-inbound-ports";
pub(super) const EXCLUDE_INBOUND_PORTS: &str = "intercept-cni.io/exclude-inbound-ports";
pub(super) const EXCLUDE_OUTBOUND_PORTS: &str = "intercept-cni.io/exclude-outbound-ports";
pub(super) const INCLUDE_OUTBOUND_CIDRS: &str = "intercept-cni.io/include-outbound-cidrs";
pub(super) const EXCLUDE_OUTBOUND_CIDRS: &str = "intercept-cni.io/exclude-outbound-cidrs";
pub(super) const INCLUDE_OUTBOUND_PORTS: &str = "intercept-cni.io/include-outbound-ports";
pub(super) const EXCLUDE_INTERFACES: &str = "intercept-cni.io/exclude-interfaces";
pub(super) const OURS: [&str; 12] = [
    INCLUDE_OUTBOUND_PORTS,
    EXCLUDE_INTERFACES,
    ENABLED,
    INBOUND_PORT,
    OUTBOUND_PORT,
    PROXY_UID,
    PROXY_GID,
    INCLUDE_INBOUND_PORTS,
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS,
    INCLUDE_OUTBOUND_CIDRS,
    EXCLUDE_OUTBOUND_CIDRS,
];

/// Our `intercept-cni.io/` annotations: `*` and "" read as in Istio's include lists.
pub(super) fn overlay(a: &Annotations, used: &mut Vec<String>) -> Result<SettingsOverlay> {
    let mut r = Reader {
        annotations: a,
        empty_is_unset: false,
        used,
    };
    Ok(SettingsOverlay {
        inbound_port: r.port(INBOUND_PORT)?,
        outbound_port: r.port(OUTBOUND_PORT)?,
        proxy_uids: r.ids(PROXY_UID)?,
        proxy_gids: r.ids(PROXY_GID)?,
        include_outbound_ports: r.excluded_ports(INCLUDE_OUTBOUND_PORTS)?,
        exclude_interfaces: r.interfaces(EXCLUDE_INTERFACES)?,
        include_inbound_ports: r.ports(INCLUDE_INBOUND_PORTS, ListForm::Include)?,
        exclude_inbound_ports: r.excluded_ports(EXCLUDE_INBOUND_PORTS)?,
        exclude_outbound_ports: r.excluded_ports(EXCLUDE_OUTBOUND_PORTS)?,
        include_outbound_cidrs: r.cidrs(
            INCLUDE_OUTBOUND_CIDRS,
            ListForm::Include,
            HostBits::Refuse,
        )?,
        exclude_outbound_cidrs: r.excluded_cidrs(EXCLUDE_OUTBOUND_CIDRS, HostBits::Refuse)?,
        ..SettingsOverlay::default()
    })
}

/// A misspelt annotation of ours is a warning, not an error: a newer plugin's annotation on a
/// node that still runs this one must not stop the pod.
pub(super) fn warn_unknown_keys(a: &Annotations) {
    for key in a.0.keys().filter(|k| k.starts_with(PREFIX)) {
        if !OURS.contains(key) {
            log::warn!("ignoring unknown pod annotation {}", quote(key));
        }
    }
}
