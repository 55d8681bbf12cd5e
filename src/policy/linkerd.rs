//! Linkerd: what linkerd-cni reads from an injected pod (`config.linkerd.io/` annotations) and
//! its defaults.

use super::annotations::{Annotations, HostBits, Reader};
use crate::cni::config::SettingsOverlay;
use crate::cni::error::Result;

pub(super) const LINKERD_PROXY_VERSION: &str = "linkerd.io/proxy-version";
pub(super) const LINKERD_INJECT: &str = "linkerd.io/inject";
pub(super) const LINKERD_SKIP_INBOUND_PORTS: &str = "config.linkerd.io/skip-inbound-ports";
pub(super) const LINKERD_SKIP_OUTBOUND_PORTS: &str = "config.linkerd.io/skip-outbound-ports";
pub(super) const LINKERD_SKIP_SUBNETS: &str = "config.linkerd.io/skip-subnets";
pub(super) const LINKERD_PROXY_UID: &str = "config.linkerd.io/proxy-uid";

/// is no override, and `skip-subnets` exempts inbound connections by their source.
pub(super) fn overlay(a: &Annotations, used: &mut Vec<String>) -> Result<SettingsOverlay> {
    let mut r = Reader {
        annotations: a,
        empty_is_unset: true,
        used,
    };
    Ok(SettingsOverlay {
        exclude_inbound_ports: r.excluded_ports(LINKERD_SKIP_INBOUND_PORTS)?,
        exclude_outbound_ports: r.excluded_ports(LINKERD_SKIP_OUTBOUND_PORTS)?,
        exclude_inbound_sources: r.excluded_cidrs(LINKERD_SKIP_SUBNETS, HostBits::Mask)?,
        proxy_uid: r.id(LINKERD_PROXY_UID)?,
        ..SettingsOverlay::default()
    })
}
