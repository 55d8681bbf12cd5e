//! Linkerd: what linkerd-cni reads from an injected pod (`config.linkerd.io/` annotations) and
//! its defaults.

use super::annotations::{quote, Annotations, HostBits, Reader};
use crate::cni::config::SettingsOverlay;
use crate::cni::error::Result;
use crate::plan::{PortRange, Semantics};

pub(super) const LINKERD_PROXY_VERSION: &str = "linkerd.io/proxy-version";
pub(super) const LINKERD_INJECT: &str = "linkerd.io/inject";
pub(super) const LINKERD_SKIP_INBOUND_PORTS: &str = "config.linkerd.io/skip-inbound-ports";
pub(super) const LINKERD_SKIP_OUTBOUND_PORTS: &str = "config.linkerd.io/skip-outbound-ports";
pub(super) const LINKERD_SKIP_SUBNETS: &str = "config.linkerd.io/skip-subnets";
pub(super) const LINKERD_PROXY_UID: &str = "config.linkerd.io/proxy-uid";
pub(super) const LINKERD_PROXY_GID: &str = "config.linkerd.io/proxy-gid";
pub(super) const LINKERD_INBOUND_PORT: &str = "config.linkerd.io/inbound-port";
pub(super) const LINKERD_OUTBOUND_PORT: &str = "config.linkerd.io/outbound-port";
pub(super) const LINKERD_ADMIN_PORT: &str = "config.linkerd.io/admin-port";
pub(super) const LINKERD_CONTROL_PORT: &str = "config.linkerd.io/control-port";
/// Read by linkerd-init only (a sysctl in the pod): not applied here, warned about.
const LINKERD_CLOSE_WAIT: &str = "config.linkerd.io/close-wait-timeout";

/// linkerd-cni's defaults (its chart's netconf): 4143 and 4140, UID 2102, no GID.
pub(super) fn defaults() -> SettingsOverlay {
    SettingsOverlay {
        semantics: Some(Semantics::Linkerd),
        inbound_port: Some(4143),
        outbound_port: Some(4140),
        proxy_uids: Some(vec![2102]),
        proxy_gids: Some(Vec::new()),
        ..SettingsOverlay::default()
    }
}

pub(super) fn warn_unsupported(a: &Annotations) {
    if a.get(LINKERD_CLOSE_WAIT).is_some() {
        log::warn!(
            "pod annotation {} is applied by linkerd-init only, not by CNI plugins: ignored",
            quote(LINKERD_CLOSE_WAIT)
        );
    }
}

/// Linkerd's `config.linkerd.io/` annotations, read as linkerd-cni reads them: an empty value
/// is no override, and `skip-subnets` exempts inbound connections by their source.
pub(super) fn overlay(a: &Annotations, used: &mut Vec<String>) -> Result<SettingsOverlay> {
    let mut r = Reader {
        annotations: a,
        empty_is_unset: true,
        used,
    };
    Ok(SettingsOverlay {
        inbound_port: r.port(LINKERD_INBOUND_PORT)?,
        outbound_port: r.port(LINKERD_OUTBOUND_PORT)?,
        // linkerd-cni appends skip-inbound-ports to its configured list, and replaces its
        // skip-outbound-ports and skip-subnets (linkerd2-proxy-init `cni-plugin/main.go`).
        more_exclude_inbound_ports: [LINKERD_ADMIN_PORT, LINKERD_CONTROL_PORT]
            .into_iter()
            .map(|key| r.port(key))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .map(|p| PortRange::single(p).unwrap_or_else(|_| unreachable!("not port 0")))
            .chain(
                r.excluded_ports(LINKERD_SKIP_INBOUND_PORTS)?
                    .unwrap_or_default(),
            )
            .collect(),
        exclude_outbound_ports: r.excluded_ports(LINKERD_SKIP_OUTBOUND_PORTS)?,
        exclude_inbound_sources: r.excluded_cidrs(LINKERD_SKIP_SUBNETS, HostBits::Mask)?,
        proxy_uids: r.id(LINKERD_PROXY_UID)?.map(|id| vec![id]),
        proxy_gids: r.id(LINKERD_PROXY_GID)?.map(|id| vec![id]),
        ..SettingsOverlay::default()
    })
}
