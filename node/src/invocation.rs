//! The CNI invocation the runtime makes for a pod, rebuilt from the active network config and
//! the pod's CRI facts, as libcni (containerd's go-cni) assembles it: the list's `name` and
//! `cniVersion` injected into our entry, capability arguments only for capabilities the entry
//! declares, the previous plugins' result, and the pod identity in `CNI_ARGS`.

use crate::cri::Sandbox;
use intercept_cni::cni::env::{CniEnv, Command};
use intercept_cni::cni::error::{Error, Result};
use intercept_cni::install::conflist::{
    self, FileKind, Network, PLUGIN_TYPE, POD_ANNOTATIONS_CAPABILITY,
};
use intercept_cni::install::fsops;
use serde_json::{json, Map, Value};
use std::ffi::OsString;
use std::path::Path;

/// The interface name containerd gives the pod's first network.
const IFNAME: &str = "eth0";

/// Our entry in the network the runtime uses now, with what libcni injects from the list.
#[derive(Debug, Clone)]
pub struct ChainedEntry {
    pub file_name: String,
    pub cni_version: String,
    pub entry: Map<String, Value>,
}

/// Where the active network of `conf_dir` chains us: `Ok(Err(why))` when it does not.
pub fn chained_entry(conf_dir: &Path) -> Result<std::result::Result<ChainedEntry, String>> {
    let files = fsops::read_conf_dir(conf_dir)?;
    let (network, skipped) = conflist::active_network(&files);
    for (name, why) in skipped {
        log::warn!("{name}: skipped as the runtime would: {why}");
    }
    let Some(network) = network else {
        return Ok(Err(format!("no network config in {}", conf_dir.display())));
    };
    Ok(entry_of(&network))
}

fn entry_of(network: &Network) -> std::result::Result<ChainedEntry, String> {
    let not_chained = || {
        format!(
            "the active network {} does not chain {PLUGIN_TYPE}",
            network.file_name
        )
    };
    if network.kind != FileKind::List {
        return Err(not_chained());
    }
    let plugins = network.doc.get("plugins").and_then(Value::as_array);
    let ours = plugins
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .find(|p| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE))
        .ok_or_else(not_chained)?;
    let cni_version = network
        .doc
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("0.1.0")
        .to_string();
    let mut entry = ours.clone();
    entry.insert("name".into(), network.doc["name"].clone());
    entry.insert("cniVersion".into(), Value::String(cni_version.clone()));
    Ok(ChainedEntry {
        file_name: network.file_name.clone(),
        cni_version,
        entry,
    })
}

/// The environment and stdin of `command` for `pod`, whose netns is `netns`.
pub fn for_pod(
    command: Command,
    chained: &ChainedEntry,
    pod: &Sandbox,
    netns: &Path,
) -> Result<(CniEnv, Vec<u8>)> {
    let mut conf = chained.entry.clone();
    let declared = conf
        .get("capabilities")
        .and_then(|c| c.get(POD_ANNOTATIONS_CAPABILITY))
        .and_then(Value::as_bool)
        == Some(true);
    if declared {
        conf.insert(
            "runtimeConfig".into(),
            json!({ POD_ANNOTATIONS_CAPABILITY: pod.annotations }),
        );
    }
    conf.insert("prevResult".into(), prev_result(&chained.cni_version, pod));
    let stdin = serde_json::to_vec(&conf).map_err(|e| Error::config(e.to_string()))?;
    // As containerd 1.6 fills CNI_ARGS for a pod.
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        pod.namespace, pod.name, pod.id, pod.uid
    );
    let vars: [(&str, OsString); 5] = [
        ("CNI_CONTAINERID", pod.id.clone().into()),
        ("CNI_IFNAME", IFNAME.into()),
        ("CNI_NETNS", netns.as_os_str().to_owned()),
        ("CNI_ARGS", args.into()),
        ("CNI_PATH", OsString::new()),
    ];
    let env = CniEnv::read(command, |name| {
        vars.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
    })?;
    Ok((env, stdin))
}

/// The main plugin's result as far as the plugin reads it: the pod's addresses.
fn prev_result(cni_version: &str, pod: &Sandbox) -> Value {
    let ips: Vec<Value> = pod
        .ips
        .iter()
        .map(|ip| {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            json!({"address": format!("{ip}/{prefix}")})
        })
        .collect();
    json!({"cniVersion": cni_version, "ips": ips})
}

#[cfg(test)]
mod tests {
    use super::*;
    use intercept_cni::install::conflist::ConfFile;

    fn network(doc: Value) -> Network {
        conflist::load_network(&ConfFile::new(
            "10-net.conflist",
            &serde_json::to_vec(&doc).unwrap(),
        ))
        .unwrap()
    }

    fn pod() -> Sandbox {
        Sandbox {
            id: "0123abcd".into(),
            namespace: "shop".into(),
            name: "web-1".into(),
            uid: "u-1".into(),
            host_network: false,
            annotations: [("intercept-cni.io/enabled".into(), "true".into())].into(),
            ips: vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            netns: None,
            pid: None,
        }
    }

    #[test]
    fn builds_what_libcni_sends() {
        let chained = entry_of(&network(json!({
            "cniVersion": "1.0.0", "name": "k8s",
            "plugins": [{"type": "bridge"}, {"type": "intercept-cni",
                "capabilities": {"io.kubernetes.cri.pod-annotations": true}}]
        })))
        .unwrap();
        let (env, stdin) = for_pod(
            Command::Add,
            &chained,
            &pod(),
            Path::new("/run/netns/cni-1"),
        )
        .unwrap();
        let conf: Value = serde_json::from_slice(&stdin).unwrap();
        assert_eq!(conf["name"], "k8s");
        assert_eq!(conf["cniVersion"], "1.0.0");
        assert_eq!(
            conf["runtimeConfig"]["io.kubernetes.cri.pod-annotations"]["intercept-cni.io/enabled"],
            "true"
        );
        assert_eq!(conf["prevResult"]["ips"][1]["address"], "fd00::5/128");
        assert_eq!(env.pod.namespace.as_deref(), Some("shop"));
        assert_eq!(env.pod.name.as_deref(), Some("web-1"));
        assert_eq!(env.netns.as_deref(), Some(Path::new("/run/netns/cni-1")));
    }

    #[test]
    fn annotations_only_with_the_capability() {
        let chained = entry_of(&network(json!({
            "cniVersion": "0.4.0", "name": "k8s",
            "plugins": [{"type": "bridge"}, {"type": "intercept-cni"}]
        })))
        .unwrap();
        let (_, stdin) = for_pod(
            Command::Add,
            &chained,
            &pod(),
            Path::new("/run/netns/cni-1"),
        )
        .unwrap();
        let conf: Value = serde_json::from_slice(&stdin).unwrap();
        assert!(conf.get("runtimeConfig").is_none());
    }

    #[test]
    fn a_network_without_us_is_not_chained() {
        let why = entry_of(&network(json!({
            "cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]
        })))
        .unwrap_err();
        assert!(why.contains("does not chain"), "{why}");
    }
}
