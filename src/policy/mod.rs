//! Per-pod policy: whether a pod gets interception and with which settings, decided from the
//! annotations the runtime hands over in `runtimeConfig["io.kubernetes.cri.pod-annotations"]`
//! (containerd >= 1.5 and CRI-O do, for a plugin entry that declares the capability). No call to
//! the Kubernetes API is ever made.
//!
//! Selection, the first rule that applies decides:
//! 1. the pod's namespace is in `excludeNamespaces`: not intercepted;
//! 2. `intercept-cni.io/enabled`: "true" or "false";
//! 3. the mesh's opt-out: `sidecar.istio.io/inject` false (any value Istio's injector does not
//!    read as true), `linkerd.io/inject: disabled`;
//! 4. the injector's mark on an injected pod: `sidecar.istio.io/status` (Istio),
//!    `linkerd.io/proxy-version` (Linkerd);
//! 5. `podSelection`: `all` intercepts, `annotated` does not.
//!
//! Settings, each layer over the one before: the built-in defaults; the defaults of the pod's
//! mesh (Istio: 15006/15001, UID and GID 1337; Linkerd: 4143/4140, UID 2102); the keys the netconf
//! sets; the mesh's own tuning annotations; the `intercept-cni.io/` ones. Then the mesh proxy's
//! own listening ports (Istio 15020, 15021, 15090; Linkerd 4190, 4191) are always added to the
//! inbound exclusions, as istio-cni and linkerd-init do. `podOverrides: false` drops both
//! annotation layers.
//!
//! Annotation values come from workloads: every value used is parsed into typed ports, ranges,
//! CIDRs and IDs, and any invalid one fails with code 7 naming it before anything is applied.

mod annotations;
mod istio;
mod linkerd;
mod own;
mod proxy_config;

use crate::cni::config::{ModeKey, NetConf, PlanSettings, PodSelection, SettingsOverlay};
use crate::cni::error::{Error, Result};
use crate::install::conflist::POD_ANNOTATIONS_CAPABILITY;
use crate::plan::PortRange;
pub use annotations::MAX_LIST_ITEMS;
use annotations::{invalid, quote, Annotations};
use istio::*;
use linkerd::*;
use own::*;

/// What to do with one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not intercepted: ADD passes `prevResult` through, CHECK passes.
    Skip { reason: String },
    /// Intercepted with these settings (not yet combined with the pod's families).
    Intercept {
        settings: Box<PlanSettings>,
        reason: String,
    },
}

/// The service mesh whose injector prepared the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mesh {
    Istio,
    Linkerd,
}

impl Mesh {
    /// The ports and IDs its proxy uses out of the box (linkerd-cni's and istio-cni's defaults).
    fn defaults(self) -> SettingsOverlay {
        match self {
            Mesh::Istio => istio::defaults(),
            Mesh::Linkerd => linkerd::defaults(),
        }
    }

    /// Ports the proxy itself serves on the pod's address (status, health, metrics, admin):
    /// never redirected inbound, whatever the annotations say.
    fn own_inbound_ports(self) -> &'static [u16] {
        match self {
            Mesh::Istio => &[15020, 15021, 15090],
            Mesh::Linkerd => &[4190, 4191],
        }
    }
}

/// Decides for the pod in `namespace` (from `K8S_POD_NAMESPACE`) under `conf`.
pub fn decide(conf: &NetConf, namespace: Option<&str>) -> Result<Decision> {
    if let Some(ns) = namespace.filter(|ns| conf.exclude_namespaces.iter().any(|e| e == ns)) {
        return Ok(Decision::Skip {
            reason: format!("namespace {ns} is in excludeNamespaces"),
        });
    }
    let Some(annotations) = Annotations::from_runtime_config(conf.runtime_config.as_ref())? else {
        return match conf.pod_selection {
            PodSelection::All => Ok(Decision::Intercept {
                settings: Box::new(conf.settings.clone()),
                reason: "podSelection all (the runtime passed no pod annotations)".into(),
            }),
            PodSelection::Annotated => Err(Error::config(format!(
                "podSelection is \"annotated\" but the runtime passed no pod annotations: declare \
                 \"capabilities\": {{\"{POD_ANNOTATIONS_CAPABILITY}\": true}} in this plugin's \
                 entry of the conflist (containerd >= 1.5 and CRI-O then pass them), or set \
                 \"podSelection\": \"all\""
            ))),
        };
    };
    let (mesh, reason) = match select(conf.pod_selection, &annotations)? {
        Selection::Skip(reason) => return Ok(Decision::Skip { reason }),
        Selection::Intercept { mesh, reason } => (mesh, reason),
    };
    // The proxy's interception mode is how it listens, not a tuning: read even without
    // podOverrides (REDIRECT towards a TPROXY listener would break the pod).
    let mut istio_mode = None;
    if mesh == Some(Mesh::Istio) {
        if let Some(reason) = istio::programs_itself(&annotations)? {
            return Ok(Decision::Skip { reason });
        }
        match istio_interception_mode(&annotations)? {
            IstioMode::Skip(reason) => return Ok(Decision::Skip { reason }),
            IstioMode::Set(mode) => istio_mode = Some(mode),
            IstioMode::Unset => {}
        }
    }

    let mut settings = PlanSettings::default();
    if let Some(mesh) = mesh {
        mesh.defaults().apply_to(&mut settings);
    }
    conf.netconf_settings.apply_to(&mut settings);
    let mut tuned_by = Vec::new();
    if conf.pod_overrides {
        let layers = [
            match mesh {
                Some(Mesh::Istio) => istio::overlay(&annotations, &mut tuned_by)?,
                Some(Mesh::Linkerd) => linkerd::overlay(&annotations, &mut tuned_by)?,
                None => SettingsOverlay::default(),
            },
            own::overlay(&annotations, &mut tuned_by)?,
        ];
        for layer in &layers {
            layer.apply_to(&mut settings);
        }
        if mesh == Some(Mesh::Istio) {
            istio_proxy_config(&annotations, &mut tuned_by)?.apply_to(&mut settings);
        }
        warn_unknown_keys(&annotations);
        match mesh {
            Some(Mesh::Istio) => istio::warn_unsupported(&annotations),
            Some(Mesh::Linkerd) => linkerd::warn_unsupported(&annotations),
            None => {}
        }
    }
    if let Some(mode) = istio_mode {
        settings.interception_mode = mode;
    }
    // Linkerd's proxy has no DNS agent and no transparent listener: the netconf's DNS capture
    // and TPROXY (Istio's modes) would cut its pods off, so they keep REDIRECT without them.
    if mesh == Some(Mesh::Linkerd)
        && (settings.dns_capture || settings.interception_mode != ModeKey::Redirect)
    {
        log::info!("Linkerd pod: DNS capture and TPROXY are Istio's modes; not applied");
        settings.dns_capture = false;
        settings.interception_mode = ModeKey::Redirect;
    }
    if let Some(mesh) = mesh {
        for &port in mesh.own_inbound_ports() {
            let range = PortRange::single(port).map_err(Error::config)?;
            if !settings.exclude_inbound_ports.contains(&range) {
                settings.exclude_inbound_ports.push(range);
            }
        }
    }
    settings.validate().map_err(|e| {
        let layers = match (mesh, tuned_by.is_empty()) {
            (_, false) => format!("annotations {}", tuned_by.join(", ")),
            (Some(_), true) => "the mesh's defaults under the netconf's keys".to_string(),
            (None, true) => "the netconf".to_string(),
        };
        Error::config(format!(
            "invalid settings for this pod from {layers}: {}",
            e.msg
        ))
    })?;
    let reason = if tuned_by.is_empty() {
        reason
    } else {
        format!("{reason}; tuned by {}", tuned_by.join(", "))
    };
    Ok(Decision::Intercept {
        settings: Box::new(settings),
        reason,
    })
}

enum Selection {
    Skip(String),
    Intercept { mesh: Option<Mesh>, reason: String },
}

fn select(pod_selection: PodSelection, a: &Annotations) -> Result<Selection> {
    let opted_in = match a.get(ENABLED) {
        None => false,
        Some("true") => true,
        Some("false") => return Ok(Selection::Skip(format!("annotation {ENABLED}=\"false\""))),
        Some(other) => return Err(invalid(ENABLED, other, "must be \"true\" or \"false\"")),
    };
    if !opted_in {
        if let Some(v) = a.get(ISTIO_INJECT).filter(|v| istio_reads_as_false(v)) {
            return Ok(Selection::Skip(format!(
                "annotation {ISTIO_INJECT}={} (Istio opt-out)",
                quote(v)
            )));
        }
        if a.get(LINKERD_INJECT) == Some("disabled") {
            return Ok(Selection::Skip(format!(
                "annotation {LINKERD_INJECT}=\"disabled\" (Linkerd opt-out)"
            )));
        }
    }
    let mesh = match (a.get(ISTIO_STATUS), a.get(LINKERD_PROXY_VERSION)) {
        (Some(_), Some(_)) => {
            return Err(Error::config(format!(
                "the pod carries both {ISTIO_STATUS} and {LINKERD_PROXY_VERSION}: it cannot have \
                 both an Istio and a Linkerd sidecar"
            )))
        }
        (Some(_), None) => Some(Mesh::Istio),
        (None, Some(_)) => Some(Mesh::Linkerd),
        (None, None) => None,
    };
    let reason = match (opted_in, mesh, pod_selection) {
        (true, _, _) => format!("annotation {ENABLED}=\"true\""),
        (false, Some(Mesh::Istio), _) => format!("annotation {ISTIO_STATUS} (Istio sidecar)"),
        (false, Some(Mesh::Linkerd), _) => {
            format!("annotation {LINKERD_PROXY_VERSION} (Linkerd proxy)")
        }
        (false, None, PodSelection::All) => "podSelection all".into(),
        (false, None, PodSelection::Annotated) => {
            return Ok(Selection::Skip(
                "podSelection annotated and no annotation selects the pod".into(),
            ))
        }
    };
    Ok(Selection::Intercept { mesh, reason })
}

#[cfg(test)]
mod tests {
    use super::annotations::quote;
    use super::*;
    use crate::cni::config::{build_plan, ModeKey};
    use crate::cni::error::Code;
    use crate::plan::{Families, InboundPorts, OutboundCidrs};
    use serde_json::json;
    use serde_json::Value;
    use std::path::Path;

    fn fixture(name: &str) -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/annotations")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    /// A netconf with `keys`, and the annotations map when `annotations` is `Some`.
    fn conf(keys: Value, annotations: Option<Value>) -> NetConf {
        let mut obj = json!({"cniVersion": "1.0.0", "name": "n", "type": "intercept-cni"});
        for (k, v) in keys.as_object().unwrap() {
            obj[k] = v.clone();
        }
        if let Some(a) = annotations {
            obj["runtimeConfig"] = json!({ POD_ANNOTATIONS_CAPABILITY: a });
        }
        NetConf::from_object(obj.as_object().unwrap(), "1.0.0").unwrap()
    }

    fn decide_with(keys: Value, annotations: Value) -> Result<Decision> {
        decide(&conf(keys, Some(annotations)), Some("default"))
    }

    fn settings_for(keys: Value, annotations: Value) -> PlanSettings {
        match decide_with(keys, annotations.clone()).unwrap() {
            Decision::Intercept { settings, .. } => *settings,
            Decision::Skip { reason } => panic!("{annotations}: skipped: {reason}"),
        }
    }

    fn skip_reason(keys: Value, annotations: Value) -> String {
        match decide_with(keys, annotations.clone()).unwrap() {
            Decision::Skip { reason } => reason,
            Decision::Intercept { reason, .. } => panic!("{annotations}: intercepted: {reason}"),
        }
    }

    fn intercept_reason(keys: Value, annotations: Value) -> String {
        match decide_with(keys, annotations.clone()).unwrap() {
            Decision::Intercept { reason, .. } => reason,
            Decision::Skip { reason } => panic!("{annotations}: skipped: {reason}"),
        }
    }

    fn error(keys: Value, annotations: Value) -> Error {
        let e = decide_with(keys, annotations.clone())
            .expect_err(&format!("{annotations} was accepted"));
        assert_eq!(e.code, Code::InvalidConfig, "{e}");
        e
    }

    use crate::plan::test_support::{nets, ports};

    const ISTIO_OWN: [(u16, u16); 3] = [(15020, 15020), (15021, 15021), (15090, 15090)];
    const LINKERD_OWN: [(u16, u16); 2] = [(4190, 4190), (4191, 4191)];

    fn istio_pod(extra: Value) -> Value {
        let mut a = json!({ISTIO_STATUS: "{}"});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        a
    }

    fn linkerd_pod(extra: Value) -> Value {
        let mut a = json!({LINKERD_PROXY_VERSION: "stable-2.14.10"});
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        a
    }

    #[test]
    fn annotated_without_the_capability_is_code_7_saying_how_to_enable_it() {
        let runtime_configs = [
            None,
            Some(json!(null)),
            Some(json!({})),
            Some(json!({"portMappings": []})),
        ];
        for rc in runtime_configs {
            let mut c = conf(json!({}), None);
            c.runtime_config = rc.clone();
            let e = decide(&c, Some("default")).unwrap_err();
            assert_eq!(e.code, Code::InvalidConfig, "{rc:?}");
            assert!(e.msg.contains("\"annotated\""), "{}", e.msg);
            assert!(
                e.msg
                    .contains("\"capabilities\": {\"io.kubernetes.cri.pod-annotations\": true}"),
                "{}",
                e.msg
            );
        }
    }

    #[test]
    fn all_without_the_capability_intercepts_with_the_netconf() {
        let c = conf(json!({"podSelection": "all", "proxyUID": 7}), None);
        let Decision::Intercept { settings, reason } = decide(&c, None).unwrap() else {
            panic!("skipped");
        };
        assert_eq!(*settings, c.settings);
        assert!(reason.contains("podSelection all"), "{reason}");
    }

    #[test]
    fn a_null_map_is_a_pod_without_annotations() {
        let reason = skip_reason(json!({}), json!(null));
        assert!(reason.contains("no annotation selects"), "{reason}");
        let s = settings_for(json!({"podSelection": "all"}), json!(null));
        assert_eq!(s, PlanSettings::default());
    }

    #[test]
    fn malformed_annotation_maps_are_code_7() {
        for bad in [json!("a=b"), json!(["a"]), json!(1)] {
            let e = error(json!({}), bad.clone());
            assert!(e.msg.contains(POD_ANNOTATIONS_CAPABILITY), "{}", e.msg);
        }
        for bad in [json!({"a": 1}), json!({"a": null}), json!({"a": ["b"]})] {
            let e = error(json!({"podSelection": "all"}), bad);
            assert!(
                e.msg.contains("\"a\": the value must be a string"),
                "{}",
                e.msg
            );
        }
        let mut c = conf(json!({}), None);
        c.runtime_config = Some(json!([]));
        assert_eq!(decide(&c, None).unwrap_err().code, Code::InvalidConfig);
    }

    #[test]
    fn an_unannotated_pod_is_left_alone_by_default() {
        let reason = skip_reason(json!({}), fixture("plain-pod.json"));
        assert_eq!(
            reason,
            "podSelection annotated and no annotation selects the pod"
        );
        let s = settings_for(json!({"podSelection": "all"}), fixture("plain-pod.json"));
        assert_eq!(s, PlanSettings::default());
    }

    #[test]
    fn excluded_namespaces_are_skipped_whatever_the_pod_says() {
        let keys = json!({"excludeNamespaces": ["kube-system"], "podSelection": "all"});
        let c = conf(keys.clone(), Some(json!({ENABLED: "true"})));
        let Decision::Skip { reason } = decide(&c, Some("kube-system")).unwrap() else {
            panic!("intercepted");
        };
        assert_eq!(reason, "namespace kube-system is in excludeNamespaces");
        // Even where the capability is missing: the namespace decides first.
        let c = conf(json!({"excludeNamespaces": ["kube-system"]}), None);
        assert!(matches!(
            decide(&c, Some("kube-system")),
            Ok(Decision::Skip { .. })
        ));
        for other in [Some("default"), Some("kube-system-2"), None] {
            let c = conf(keys.clone(), Some(json!({})));
            assert!(
                matches!(decide(&c, other), Ok(Decision::Intercept { .. })),
                "{other:?}"
            );
        }
    }

    #[test]
    fn our_enabled_annotation_opts_in_and_out() {
        let reason = intercept_reason(json!({}), json!({ENABLED: "true"}));
        assert_eq!(reason, "annotation intercept-cni.io/enabled=\"true\"");
        let s = settings_for(json!({"proxyUID": 5}), json!({ENABLED: "true"}));
        assert_eq!(s.proxy_uids, vec![5]);
        assert!(s.exclude_inbound_ports.is_empty());
        let reason = skip_reason(json!({"podSelection": "all"}), json!({ENABLED: "false"}));
        assert_eq!(reason, "annotation intercept-cni.io/enabled=\"false\"");
        // Ours has the last word over the meshes' marks and opt-outs.
        skip_reason(json!({}), istio_pod(json!({ENABLED: "false"})));
        skip_reason(json!({}), linkerd_pod(json!({ENABLED: "false"})));
        intercept_reason(json!({}), json!({ENABLED: "true", ISTIO_INJECT: "false"}));
        intercept_reason(
            json!({}),
            json!({ENABLED: "true", LINKERD_INJECT: "disabled"}),
        );
        for bad in ["yes", "True", "1", "", " true"] {
            let e = error(json!({}), json!({ENABLED: bad}));
            assert!(e.msg.contains(ENABLED), "{}", e.msg);
        }
    }

    #[test]
    fn an_istio_injected_pod_gets_istios_defaults_and_annotations() {
        let s = settings_for(json!({}), fixture("istio-injected.json"));
        assert_eq!((s.inbound_port, s.outbound_port), (15006, 15001));
        assert_eq!(
            (s.proxy_uids.clone(), s.proxy_gids.clone()),
            (vec![1337], vec![1337])
        );
        assert_eq!(s.exclude_inbound_ports, ports(&ISTIO_OWN));
        assert_eq!(
            s.exclude_outbound_ports,
            ports(&[(5432, 5432), (6379, 6380)])
        );
        // Istio accepts host bits and iptables masks them; so do we, for Istio's annotations.
        assert_eq!(
            s.exclude_outbound_cidrs,
            nets(&["169.254.169.254/32", "10.96.0.0/24"])
        );
        let reason = intercept_reason(json!({}), fixture("istio-injected.json"));
        assert!(
            reason.starts_with("annotation sidecar.istio.io/status (Istio sidecar); tuned by "),
            "{reason}"
        );
        assert!(reason.contains(ISTIO_EXCLUDE_OUTBOUND_PORTS), "{reason}");
    }

    #[test]
    fn istio_opt_out_wins_over_its_status() {
        for value in ["false", "FALSE", "no", "off", "n", "maybe"] {
            let reason = skip_reason(json!({}), istio_pod(json!({ISTIO_INJECT: value})));
            assert!(reason.contains("Istio opt-out"), "{reason}");
        }
        for value in ["true", "Yes", "on", "y", ""] {
            intercept_reason(json!({}), istio_pod(json!({ISTIO_INJECT: value})));
        }
        // An opt-out needs no status: with podSelection all it still keeps the pod out.
        skip_reason(
            json!({"podSelection": "all"}),
            json!({ISTIO_INJECT: "false"}),
        );
        // A pod that only asked for injection may not have got it: not selected.
        skip_reason(json!({}), json!({ISTIO_INJECT: "true"}));
    }

    #[test]
    fn istio_include_lists_read_star_and_empty_as_istio_does() {
        let plan = |a: Value| {
            build_plan(
                &settings_for(json!({}), istio_pod(a)),
                Families::BOTH,
                false,
            )
        };
        let p = plan(json!({ISTIO_INCLUDE_INBOUND_PORTS: "*"})).unwrap();
        assert_eq!(
            p.inbound_ports,
            InboundPorts::AllExcept(ports(&[(15020, 15021), (15090, 15090)]))
        );
        let p = plan(json!({ISTIO_INCLUDE_INBOUND_PORTS: ""})).unwrap();
        assert_eq!(p.inbound_ports, InboundPorts::None);
        // istio-iptables redirects an include list as given: its exclusions do not apply.
        let p = plan(json!({ISTIO_INCLUDE_INBOUND_PORTS: "8080, 9000-9100,15021"})).unwrap();
        assert_eq!(
            p.inbound_ports,
            InboundPorts::Only(ports(&[(8080, 8080), (9000, 9100), (15021, 15021)]))
        );
        let p = plan(json!({ISTIO_INCLUDE_OUTBOUND_RANGES: "*"})).unwrap();
        assert_eq!(p.outbound_cidrs, OutboundCidrs::AllExcept(vec![]));
        let p = plan(json!({ISTIO_INCLUDE_OUTBOUND_RANGES: ""})).unwrap();
        assert_eq!(
            p.outbound_cidrs,
            OutboundCidrs::Only {
                include: vec![],
                exclude: vec![]
            }
        );
        let p = plan(json!({
            ISTIO_INCLUDE_OUTBOUND_RANGES: "10.96.0.0/12,fd00::/8",
            ISTIO_EXCLUDE_OUTBOUND_RANGES: "10.96.0.10/32",
        }))
        .unwrap();
        assert_eq!(
            p.outbound_cidrs,
            OutboundCidrs::Only {
                include: nets(&["10.96.0.0/12", "fd00::/8"]),
                exclude: nets(&["10.96.0.10/32"]),
            }
        );
        // Excluding ports from the default "*" include.
        let s = settings_for(
            json!({}),
            istio_pod(json!({ISTIO_EXCLUDE_INBOUND_PORTS: "22,8443"})),
        );
        assert_eq!(
            s.exclude_inbound_ports,
            ports(&[
                (22, 22),
                (8443, 8443),
                (15020, 15020),
                (15021, 15021),
                (15090, 15090)
            ])
        );
        for key in [ISTIO_EXCLUDE_INBOUND_PORTS, ISTIO_EXCLUDE_OUTBOUND_PORTS] {
            let e = error(json!({}), istio_pod(json!({key: "*"})));
            assert!(e.msg.contains(key), "{}", e.msg);
        }
    }

    #[test]
    fn linkerd_pods_keep_redirect_without_dns_capture() {
        let s = settings_for(
            json!({"dnsCapture": true, "interceptionMode": "TPROXY", "dropInvalid": true}),
            json!({"linkerd.io/proxy-version": "stable-2.14.10"}),
        );
        assert!(!s.dns_capture && s.drop_invalid);
        assert_eq!(s.interception_mode, ModeKey::Redirect);
    }

    #[test]
    fn istio_interception_modes() {
        intercept_reason(
            json!({}),
            istio_pod(json!({ISTIO_INTERCEPTION_MODE: "REDIRECT"})),
        );
        let tproxy = |keys: Value| {
            settings_for(keys, istio_pod(json!({ISTIO_INTERCEPTION_MODE: "TPROXY"})))
                .interception_mode
        };
        assert_eq!(tproxy(json!({})), ModeKey::Tproxy);
        // Honoured even where pods may not tune their interception: REDIRECT would break a
        // proxy that listens transparently.
        assert_eq!(tproxy(json!({"podOverrides": false})), ModeKey::Tproxy);
        let s = settings_for(
            json!({"interceptionMode": "TPROXY"}),
            istio_pod(json!({ISTIO_INTERCEPTION_MODE: "REDIRECT"})),
        );
        assert_eq!(s.interception_mode, ModeKey::Redirect);
        let reason = skip_reason(
            json!({}),
            istio_pod(json!({ISTIO_INTERCEPTION_MODE: "NONE"})),
        );
        assert!(reason.contains("NONE"), "{reason}");
        for bad in ["redirect", "", "TPROXY;"] {
            error(json!({}), istio_pod(json!({ISTIO_INTERCEPTION_MODE: bad})));
        }
        // An opted-out pod is not checked.
        skip_reason(
            json!({}),
            istio_pod(json!({ISTIO_INTERCEPTION_MODE: "TPROXY", ISTIO_INJECT: "false"})),
        );
    }

    #[test]
    fn istio_proxy_metadata_turns_modes_on_and_off() {
        let config = |yaml: &str| istio_pod(json!({ISTIO_PROXY_CONFIG: yaml}));
        let s = settings_for(
            json!({}),
            config(
                "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n  INVALID_DROP: \"true\"\n",
            ),
        );
        assert!(s.dns_capture && s.drop_invalid);
        // The pod's word over the netconf's.
        let s = settings_for(
            json!({"dnsCapture": true}),
            config("{\"proxyMetadata\": {\"ISTIO_META_DNS_CAPTURE\": \"false\"}}"),
        );
        assert!(!s.dns_capture);
        // Without podOverrides the netconf decides.
        let s = settings_for(
            json!({"podOverrides": false}),
            config("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"),
        );
        assert!(!s.dns_capture);
        let reason = intercept_reason(
            json!({}),
            config("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"),
        );
        assert!(reason.contains(ISTIO_PROXY_CONFIG), "{reason}");
        // Other mesh's pods and our own: not read.
        let s = settings_for(
            json!({}),
            json!({ENABLED: "true", ISTIO_PROXY_CONFIG: "proxyMetadata: {ISTIO_META_DNS_CAPTURE: on}"}),
        );
        assert!(!s.dns_capture);
        let e = error(
            json!({}),
            config("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"yes please\"\n"),
        );
        assert!(e.msg.contains(ISTIO_PROXY_CONFIG), "{}", e.msg);
    }

    #[test]
    fn a_linkerd_injected_pod_gets_linkerds_defaults_and_annotations() {
        let s = settings_for(json!({}), fixture("linkerd-injected.json"));
        assert_eq!((s.inbound_port, s.outbound_port), (4143, 4140));
        assert_eq!(
            (s.proxy_uids.clone(), s.proxy_gids.clone()),
            (vec![2102], vec![])
        );
        assert_eq!(
            s.exclude_inbound_ports,
            ports(&[(25, 25), (8000, 8010), (4190, 4190), (4191, 4191)])
        );
        assert_eq!(s.exclude_outbound_ports, ports(&[(3306, 3306)]));
        assert_eq!(
            s.exclude_inbound_sources,
            nets(&["10.244.0.0/16", "fd00:10::/64"])
        );
        assert!(s.exclude_outbound_cidrs.is_empty());
        let reason = intercept_reason(json!({}), fixture("linkerd-injected.json"));
        assert!(
            reason.starts_with("annotation linkerd.io/proxy-version (Linkerd proxy); tuned by"),
            "{reason}"
        );
        let s = settings_for(json!({}), linkerd_pod(json!({LINKERD_PROXY_UID: "3000"})));
        assert_eq!(s.proxy_uids, vec![3000]);
        assert_eq!(s.exclude_inbound_ports, ports(&LINKERD_OWN));
    }

    #[test]
    fn linkerd_reads_an_empty_value_as_no_override() {
        let keys = json!({
            "excludeOutboundPorts": [53],
            "excludeInboundSourceCIDRs": ["192.168.0.0/16"],
            "proxyUID": 2103,
        });
        let s = settings_for(
            keys,
            linkerd_pod(json!({
                LINKERD_SKIP_OUTBOUND_PORTS: "",
                LINKERD_SKIP_SUBNETS: " ",
                LINKERD_PROXY_UID: "",
            })),
        );
        assert_eq!(s.exclude_outbound_ports, ports(&[(53, 53)]));
        assert_eq!(s.exclude_inbound_sources, nets(&["192.168.0.0/16"]));
        assert_eq!(s.proxy_uids, vec![2103]);
    }

    #[test]
    fn linkerd_opt_out_and_uninjected_pods() {
        let reason = skip_reason(json!({}), linkerd_pod(json!({LINKERD_INJECT: "disabled"})));
        assert!(reason.contains("Linkerd opt-out"), "{reason}");
        // Asking for injection is not proof of a proxy.
        skip_reason(json!({}), json!({LINKERD_INJECT: "enabled"}));
        intercept_reason(json!({}), linkerd_pod(json!({LINKERD_INJECT: "ingress"})));
    }

    #[test]
    fn a_pod_marked_by_both_meshes_is_refused() {
        let e = error(json!({}), linkerd_pod(json!({ISTIO_STATUS: "{}"})));
        assert!(e.msg.contains("both"), "{}", e.msg);
    }

    #[test]
    fn our_tuning_annotations() {
        let s = settings_for(
            json!({}),
            json!({
                ENABLED: "true",
                INBOUND_PORT: "16006",
                OUTBOUND_PORT: "16001",
                PROXY_UID: "4000",
                PROXY_GID: "4001",
                INCLUDE_INBOUND_PORTS: "80,8000-8080",
                EXCLUDE_INBOUND_PORTS: "8001",
                EXCLUDE_OUTBOUND_PORTS: " 53 , 853 ",
                INCLUDE_OUTBOUND_CIDRS: "10.0.0.0/8,2001:db8::/32",
                EXCLUDE_OUTBOUND_CIDRS: "10.1.0.0/16,10.2.3.4",
            }),
        );
        let expected = PlanSettings {
            inbound_port: 16006,
            outbound_port: 16001,
            proxy_uids: vec![4000],
            proxy_gids: vec![4001],
            exclude_inbound_ports: ports(&[(8001, 8001)]),
            exclude_inbound_sources: vec![],
            exclude_outbound_ports: ports(&[(53, 53), (853, 853)]),
            include_inbound_ports: Some(ports(&[(80, 80), (8000, 8080)])),
            exclude_outbound_cidrs: nets(&["10.1.0.0/16", "10.2.3.4/32"]),
            include_outbound_cidrs: Some(nets(&["10.0.0.0/8", "2001:db8::/32"])),
            ..PlanSettings::default()
        };
        assert_eq!(s, expected);
        // `*` and "" in our include lists, as in Istio's.
        let s = settings_for(
            json!({"includeInboundPorts": [80], "includeOutboundCIDRs": ["10.0.0.0/8"]}),
            json!({ENABLED: "true", INCLUDE_INBOUND_PORTS: "*", INCLUDE_OUTBOUND_CIDRS: ""}),
        );
        assert_eq!(s.include_inbound_ports, None);
        assert_eq!(s.include_outbound_cidrs, Some(vec![]));
        // Ours refuse host bits, like the netconf.
        let e = error(
            json!({}),
            json!({ENABLED: "true", EXCLUDE_OUTBOUND_CIDRS: "10.1.2.3/8"}),
        );
        assert!(e.msg.contains("did you mean 10.0.0.0/8"), "{}", e.msg);
    }

    #[test]
    fn precedence_netconf_then_mesh_annotations_then_ours() {
        // The netconf's own keys beat a mesh's defaults...
        let s = settings_for(
            json!({"inboundPort": 14143, "proxyUID": 2222}),
            linkerd_pod(json!({})),
        );
        assert_eq!(
            (s.inbound_port, s.outbound_port, s.proxy_uids.clone()),
            (14143, 4140, vec![2222])
        );
        // ...the mesh's annotations beat the netconf...
        let keys = json!({"excludeOutboundPorts": [53], "proxyUID": 2222});
        let s = settings_for(
            keys.clone(),
            linkerd_pod(json!({LINKERD_PROXY_UID: "3000"})),
        );
        assert_eq!(s.proxy_uids, vec![3000]);
        let s = settings_for(
            keys.clone(),
            istio_pod(json!({ISTIO_EXCLUDE_OUTBOUND_PORTS: "3306"})),
        );
        assert_eq!(s.exclude_outbound_ports, ports(&[(3306, 3306)]));
        // ...and ours beat both.
        let s = settings_for(
            keys.clone(),
            linkerd_pod(json!({LINKERD_PROXY_UID: "3000", PROXY_UID: "4000"})),
        );
        assert_eq!(s.proxy_uids, vec![4000]);
        let s = settings_for(
            keys,
            istio_pod(json!({
                ISTIO_EXCLUDE_OUTBOUND_PORTS: "3306",
                EXCLUDE_OUTBOUND_PORTS: "",
                ISTIO_INCLUDE_INBOUND_PORTS: "80",
                INCLUDE_INBOUND_PORTS: "*",
            })),
        );
        assert!(s.exclude_outbound_ports.is_empty());
        assert_eq!(s.include_inbound_ports, None);
        // The proxy's own ports stay excluded whatever the annotations say.
        assert_eq!(s.exclude_inbound_ports, ports(&ISTIO_OWN));
    }

    #[test]
    fn a_mesh_honours_only_its_own_annotations() {
        let s = settings_for(
            json!({}),
            istio_pod(json!({LINKERD_SKIP_OUTBOUND_PORTS: "25", LINKERD_PROXY_UID: "1"})),
        );
        assert_eq!(s.exclude_outbound_ports, ports(&[(15020, 15020)]));
        assert_eq!(s.proxy_uids, vec![1337]);
        let s = settings_for(
            json!({}),
            json!({ENABLED: "true", ISTIO_EXCLUDE_OUTBOUND_PORTS: "25"}),
        );
        assert!(s.exclude_outbound_ports.is_empty());
    }

    #[test]
    fn pod_overrides_false_ignores_tuning_but_not_selection() {
        let keys = json!({"podOverrides": false, "excludeOutboundPorts": [53]});
        let tuning = json!({
            ENABLED: "true",
            PROXY_UID: "0",
            EXCLUDE_OUTBOUND_PORTS: "1-65535",
            // Not even parsed.
            EXCLUDE_OUTBOUND_CIDRS: "not a cidr",
        });
        let s = settings_for(keys.clone(), tuning);
        assert_eq!(s, conf(keys.clone(), None).settings);
        let reason = intercept_reason(keys.clone(), json!({ENABLED: "true", PROXY_UID: "0"}));
        assert!(!reason.contains("tuned by"), "{reason}");
        skip_reason(keys.clone(), json!({ENABLED: "false"}));
        skip_reason(keys.clone(), istio_pod(json!({ISTIO_INJECT: "false"})));
        // A mesh pod still gets its mesh's defaults and keeps the proxy's own ports.
        let s = settings_for(
            keys,
            linkerd_pod(json!({LINKERD_SKIP_SUBNETS: "0.0.0.0/0", LINKERD_PROXY_UID: "0"})),
        );
        assert_eq!((s.inbound_port, s.proxy_uids.clone()), (4143, vec![2102]));
        assert!(s.exclude_inbound_sources.is_empty());
        assert_eq!(s.exclude_inbound_ports, ports(&LINKERD_OWN));
    }

    #[test]
    fn an_invalid_combination_names_the_annotations() {
        let e = error(json!({}), json!({ENABLED: "true", OUTBOUND_PORT: "15006"}));
        assert!(
            e.msg.contains("annotations intercept-cni.io/outbound-port"),
            "{}",
            e.msg
        );
        assert!(e.msg.contains("must differ"), "{}", e.msg);
        // The meshes accept equal ports (Linkerd's own test setup uses them).
        let s = settings_for(json!({"inboundPort": 4140}), linkerd_pod(json!({})));
        assert_eq!((s.inbound_port, s.outbound_port), (4140, 4140));
        let s = settings_for(json!({}), istio_pod(json!({})));
        build_plan(&s, Families::BOTH, false).unwrap();
    }

    #[test]
    fn istio_skips_gateways_and_pods_that_program_themselves() {
        let reason = skip_reason(json!({}), istio_pod(json!({ISTIO_TEMPLATES: "gateway"})));
        assert!(reason.contains("gateway"), "{reason}");
        skip_reason(
            json!({}),
            istio_pod(json!({ISTIO_TEMPLATES: "sidecar, gateway"})),
        );
        let with_init = json!({ISTIO_STATUS: r#"{"initContainers":["istio-init"],"containers":["istio-proxy"]}"#});
        assert!(skip_reason(json!({}), with_init).contains("istio-init"));
        let proxyless = json!({ISTIO_STATUS: r#"{"initContainers":["grpc-bootstrap-init"],"containers":["traffic"]}"#});
        assert!(skip_reason(json!({}), proxyless).contains("no istio-proxy"));
        // Native sidecars list the proxy among the init containers; CNI mode has istio-validation.
        let native = json!({ISTIO_STATUS: r#"{"initContainers":["istio-validation","istio-proxy"],"containers":null}"#});
        intercept_reason(json!({}), native);
        intercept_reason(json!({}), istio_pod(json!({ISTIO_TEMPLATES: "sidecar"})));
        // Even our opt-in does not install a second rule set next to istio-init's.
        let mut opted = json!({ISTIO_STATUS: r#"{"initContainers":["istio-init"]}"#});
        opted[ENABLED] = json!("true");
        skip_reason(json!({}), opted);
        let e = error(json!({}), json!({ISTIO_STATUS: "not json"}));
        assert!(
            e.msg.starts_with("pod annotation sidecar.istio.io/status"),
            "{}",
            e.msg
        );
    }

    #[test]
    fn istio_knobs_reach_the_plan() {
        let s = settings_for(
            json!({}),
            istio_pod(json!({
                ISTIO_INCLUDE_OUTBOUND_PORTS: "9999,10000-10010",
                ISTIO_EXCLUDE_INTERFACES: "net1, net2",
                ISTIO_KUBEVIRT_INTERFACES: "old0",
                ISTIO_STATUS_PORT: "16020",
            })),
        );
        assert_eq!(s.semantics, crate::plan::Semantics::Istio);
        assert_eq!(
            s.include_outbound_ports,
            ports(&[(9999, 9999), (10000, 10010)])
        );
        let names = |l: &[crate::plan::IfName]| l.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&s.exclude_interfaces), ["net1", "net2"]);
        assert_eq!(names(&s.reroute_interfaces), ["old0"]);
        assert!(s
            .exclude_inbound_ports
            .contains(&ports(&[(16020, 16020)])[0]));
        // The new name wins over the deprecated one.
        let s = settings_for(
            json!({}),
            istio_pod(json!({ISTIO_KUBEVIRT_INTERFACES: "old0", ISTIO_REROUTE_INTERFACES: "new0"})),
        );
        assert_eq!(names(&s.reroute_interfaces), ["new0"]);
        // IPv6 only with dual-stack or an IPv6-first pod; IPv4 always.
        let v4_only = Families {
            ipv4: true,
            ipv6: false,
        };
        let s = settings_for(json!({}), istio_pod(json!({})));
        assert_eq!(
            build_plan(&s, Families::BOTH, false).unwrap().families,
            v4_only
        );
        assert_eq!(
            build_plan(&s, Families::BOTH, true).unwrap().families,
            Families::BOTH
        );
        let s = settings_for(json!({"dualStack": true}), istio_pod(json!({})));
        assert_eq!(
            build_plan(&s, Families::BOTH, false).unwrap().families,
            Families::BOTH
        );
        // Or the proxy's own ISTIO_DUAL_STACK, as istio-cni reads it from the proxy's environment.
        let s = settings_for(
            json!({}),
            istio_pod(
                json!({ISTIO_PROXY_CONFIG: "proxyMetadata:\n  ISTIO_DUAL_STACK: \"true\"\n"}),
            ),
        );
        assert_eq!(
            build_plan(&s, Families::BOTH, false).unwrap().families,
            Families::BOTH
        );
    }

    #[test]
    fn linkerd_appends_skip_inbound_ports_and_reads_its_port_and_gid_annotations() {
        let s = settings_for(
            json!({"excludeInboundPorts": [25]}),
            linkerd_pod(json!({
                LINKERD_SKIP_INBOUND_PORTS: "9080",
                LINKERD_SKIP_OUTBOUND_PORTS: "3306",
                LINKERD_INBOUND_PORT: "5143",
                LINKERD_OUTBOUND_PORT: "5140",
                LINKERD_PROXY_GID: "2103",
                LINKERD_ADMIN_PORT: "5191",
            })),
        );
        assert_eq!((s.inbound_port, s.outbound_port), (5143, 5140));
        assert_eq!(s.proxy_gids, vec![2103]);
        // The netconf's list, then the admin port and the annotation's, then the proxy's own.
        assert_eq!(
            s.exclude_inbound_ports,
            ports(&[
                (25, 25),
                (5191, 5191),
                (9080, 9080),
                (4190, 4190),
                (4191, 4191)
            ])
        );
        // skip-outbound-ports replaces, as linkerd-cni does.
        let s = settings_for(
            json!({"excludeOutboundPorts": [53]}),
            linkerd_pod(json!({LINKERD_SKIP_OUTBOUND_PORTS: "3306"})),
        );
        assert_eq!(s.exclude_outbound_ports, ports(&[(3306, 3306)]));
        // proxy-init writes owner rules only for IDs above 0; IPv6 only with dualStack.
        let s = settings_for(json!({}), linkerd_pod(json!({LINKERD_PROXY_GID: "0"})));
        let plan = build_plan(&s, Families::BOTH, true).unwrap();
        assert!(plan.proxy_gids.is_empty());
        assert_eq!(
            plan.families,
            Families {
                ipv4: true,
                ipv6: false
            }
        );
    }

    #[test]
    fn our_id_lists() {
        let s = settings_for(
            json!({}),
            json!({ENABLED: "true", PROXY_UID: "1337, 1338", PROXY_GID: "7"}),
        );
        assert_eq!((s.proxy_uids, s.proxy_gids), (vec![1337, 1338], vec![7]));
    }

    #[test]
    fn hostile_values_are_code_7_naming_the_annotation() {
        let huge_list = (1..=MAX_LIST_ITEMS + 1)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let huge_cidrs = (0..=MAX_LIST_ITEMS)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect::<Vec<_>>()
            .join(",");
        let huge_value = "1".repeat(100_000);
        let port_lists = [
            EXCLUDE_INBOUND_PORTS,
            EXCLUDE_OUTBOUND_PORTS,
            INCLUDE_INBOUND_PORTS,
            ISTIO_EXCLUDE_OUTBOUND_PORTS,
            ISTIO_INCLUDE_INBOUND_PORTS,
            ISTIO_INCLUDE_OUTBOUND_PORTS,
            LINKERD_SKIP_INBOUND_PORTS,
            INCLUDE_OUTBOUND_PORTS,
        ];
        let port_values = [
            "80;drop",
            "1-2-3",
            "80 -j ACCEPT",
            "65536",
            "0",
            "-1",
            "+80",
            "80,,90",
            "80,",
            "9000-8000",
            "80\n-A OUTPUT -j ACCEPT",
            "0x50",
            "８０",
            huge_list.as_str(),
            huge_value.as_str(),
        ];
        let cidr_lists = [
            EXCLUDE_OUTBOUND_CIDRS,
            INCLUDE_OUTBOUND_CIDRS,
            ISTIO_EXCLUDE_OUTBOUND_RANGES,
            ISTIO_INCLUDE_OUTBOUND_RANGES,
            LINKERD_SKIP_SUBNETS,
        ];
        let cidr_values = [
            "10.0.0.0/8 -j ACCEPT",
            "10.0.0.0/33",
            "10/8",
            "10.0.0.0/8;",
            "any",
            "10.0.0.0/8,,10.1.0.0/16",
            "fe80::1%eth0/64",
            "10.0.0.0/8\n*filter",
            huge_cidrs.as_str(),
        ];
        let numbers = [
            INBOUND_PORT,
            OUTBOUND_PORT,
            PROXY_UID,
            PROXY_GID,
            LINKERD_PROXY_UID,
            LINKERD_PROXY_GID,
            LINKERD_INBOUND_PORT,
            LINKERD_OUTBOUND_PORT,
            LINKERD_ADMIN_PORT,
            ISTIO_STATUS_PORT,
        ];
        let number_values = [
            "-1",
            "4294967296",
            "1e3",
            "13 37",
            "+1",
            "0x539",
            "",
            "1337;",
        ];
        let cases = port_lists
            .iter()
            .flat_map(|k| port_values.iter().map(move |v| (*k, *v)))
            .chain(
                cidr_lists
                    .iter()
                    .flat_map(|k| cidr_values.iter().map(move |v| (*k, *v))),
            )
            .chain(
                numbers
                    .iter()
                    .flat_map(|k| number_values.iter().map(move |v| (*k, *v))),
            )
            .chain(
                [
                    ISTIO_EXCLUDE_INTERFACES,
                    ISTIO_KUBEVIRT_INTERFACES,
                    ISTIO_REROUTE_INTERFACES,
                    EXCLUDE_INTERFACES,
                ]
                .iter()
                .flat_map(|k| {
                    [
                        "eth0;x",
                        "eth0 -j ACCEPT",
                        "a/b",
                        "abcdefghijklmnopq",
                        "eth0,,eth1",
                        "..",
                        "eth0\n*nat",
                        "*",
                    ]
                    .map(move |v| (*k, v))
                }),
            )
            .chain([
                (INBOUND_PORT, "0"),
                (OUTBOUND_PORT, "65536"),
                (PROXY_UID, "1337,,1338"),
                (PROXY_GID, "1337;1338"),
            ]);
        for (key, value) in cases {
            // Linkerd reads "" as unset, and only its own pods read its annotations.
            if key.starts_with("config.linkerd.io/") && value.is_empty() {
                continue;
            }
            let mut annotations = if key.starts_with("config.linkerd.io/") {
                linkerd_pod(json!({}))
            } else if key.starts_with("traffic.sidecar.istio.io/")
                || key.starts_with("istio.io/")
                || key.starts_with("status.sidecar.istio.io/")
            {
                istio_pod(json!({}))
            } else {
                json!({ENABLED: "true"})
            };
            annotations[key] = json!(value);
            let e = decide_with(json!({}), annotations)
                .expect_err(&format!("{key}={value:?} was accepted"));
            assert_eq!(e.code, Code::InvalidConfig);
            assert!(
                e.msg
                    .starts_with(&format!("pod annotation {key}: invalid value ")),
                "{key}={value:?}: {}",
                e.msg
            );
            assert!(!e.msg.contains('\n'), "{key}={value:?}: {}", e.msg);
            assert!(e.msg.len() < 400, "{key}: message of {} bytes", e.msg.len());
        }
        // The largest list allowed still passes.
        let max = (1..=MAX_LIST_ITEMS)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        settings_for(
            json!({}),
            json!({ENABLED: "true", EXCLUDE_OUTBOUND_PORTS: max}),
        );
    }

    #[test]
    fn workload_strings_never_reach_a_log_line_raw() {
        let reason = skip_reason(json!({}), istio_pod(json!({ISTIO_INJECT: "no\nFAKE LINE"})));
        assert!(!reason.contains('\n'), "{reason}");
        let q = quote(&"é".repeat(100));
        assert!(q.ends_with("... (200 bytes)"), "{q}");
    }

    #[test]
    fn unknown_annotations_of_ours_do_not_fail_the_pod() {
        intercept_reason(
            json!({}),
            json!({ENABLED: "true", "intercept-cni.io/exclude-outbound-port": "80"}),
        );
    }
}
