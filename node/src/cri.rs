//! The CRI side: gRPC over the runtime's unix socket, and what the runtime says about each pod
//! sandbox, reduced to the facts the audit needs.

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ListPodSandboxRequest, NamespaceMode, PodSandboxFilter, PodSandboxState, PodSandboxStateValue,
    PodSandboxStatusRequest, PodSandboxStatusResponse,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use tonic::transport::{Channel, Endpoint, Uri};

/// containerd's CRI socket on a node (kubelet's `--container-runtime-endpoint`).
pub const DEFAULT_SOCKET: &str = "/run/containerd/containerd.sock";

/// The verbose status the runtime returns is capped here: containerd's is a few KiB per pod.
const MAX_INFO_BYTES: usize = 1 << 20;

pub type Client = RuntimeServiceClient<Channel>;

/// Connects to the runtime service at `socket`.
pub async fn connect(socket: &Path) -> Result<Client, String> {
    // tonic wants a URI; every connection goes to the socket instead.
    let endpoint = Endpoint::try_from("http://[::]:0").map_err(|e| e.to_string())?;
    let path = socket.to_path_buf();
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|e| format!("cannot connect to the CRI socket {}: {e}", socket.display()))?;
    Ok(RuntimeServiceClient::new(channel))
}

/// A running pod sandbox as the runtime describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The pod shares the node's netns (`hostNetwork: true`): no CNI call, nothing to audit.
    pub host_network: bool,
    pub annotations: BTreeMap<String, String>,
    /// The pod's addresses (the main plugin's result).
    pub ips: Vec<IpAddr>,
    /// The netns path from the runtime's verbose status (containerd: the OCI spec's network
    /// namespace), unproven.
    pub netns: Option<PathBuf>,
    /// The sandbox's (pause) process, which lives in the pod netns.
    pub pid: Option<u32>,
}

/// Every ready pod sandbox of the node.
pub async fn ready_sandboxes(client: &mut Client) -> Result<Vec<Sandbox>, String> {
    let filter = PodSandboxFilter {
        state: Some(PodSandboxStateValue {
            state: PodSandboxState::SandboxReady as i32,
        }),
        ..Default::default()
    };
    let items = client
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(filter),
        })
        .await
        .map_err(|s| format!("ListPodSandbox: {}", s.message()))?
        .into_inner()
        .items;
    let mut sandboxes = Vec::with_capacity(items.len());
    for item in items {
        match sandbox(client, &item.id).await {
            Ok(s) => sandboxes.push(s),
            // Removed between the list and its status: no longer the node's.
            Err(e) if e.contains("not found") => log::debug!("sandbox {}: {e}", item.id),
            Err(e) => return Err(e),
        }
    }
    Ok(sandboxes)
}

/// One sandbox's facts, from its verbose status.
pub async fn sandbox(client: &mut Client, id: &str) -> Result<Sandbox, String> {
    let response = client
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.to_string(),
            verbose: true,
        })
        .await
        .map_err(|s| format!("PodSandboxStatus {id}: {}", s.message()))?
        .into_inner();
    from_status(id, response)
}

fn from_status(id: &str, response: PodSandboxStatusResponse) -> Result<Sandbox, String> {
    let status = response
        .status
        .ok_or_else(|| format!("PodSandboxStatus {id}: no status"))?;
    let metadata = status.metadata.unwrap_or_default();
    let host_network = status
        .linux
        .and_then(|l| l.namespaces)
        .and_then(|n| n.options)
        .is_some_and(|o| o.network == NamespaceMode::Node as i32);
    let mut ips = Vec::new();
    if let Some(network) = status.network {
        let all =
            std::iter::once(network.ip).chain(network.additional_ips.into_iter().map(|p| p.ip));
        for ip in all.filter(|ip| !ip.is_empty()) {
            ips.push(
                ip.parse()
                    .map_err(|_| format!("PodSandboxStatus {id}: invalid pod IP {ip:?}"))?,
            );
        }
    }
    let (netns, pid) = match response.info.get("info") {
        Some(info) => runtime_info(id, info)?,
        None => (None, None),
    };
    Ok(Sandbox {
        id: id.to_string(),
        namespace: metadata.namespace,
        name: metadata.name,
        uid: metadata.uid,
        host_network,
        annotations: status.annotations.into_iter().collect(),
        ips,
        netns,
        pid,
    })
}

/// containerd's verbose `info`: `pid` of the sandbox process and the OCI spec it runs with,
/// whose network namespace entry names the pod netns.
fn runtime_info(id: &str, info: &str) -> Result<(Option<PathBuf>, Option<u32>), String> {
    if info.len() > MAX_INFO_BYTES {
        return Err(format!("PodSandboxStatus {id}: verbose info too large"));
    }
    let info: Value = serde_json::from_str(info)
        .map_err(|e| format!("PodSandboxStatus {id}: verbose info is not JSON: {e}"))?;
    let pid = info
        .get("pid")
        .and_then(Value::as_u64)
        .and_then(|p| u32::try_from(p).ok())
        .filter(|&p| p > 0);
    let netns = info
        .pointer("/runtimeSpec/linux/namespaces")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|ns| ns.get("type").and_then(Value::as_str) == Some("network"))
        .and_then(|ns| ns.get("path"))
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    Ok((netns, pid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_cri::v1::{
        LinuxPodSandboxStatus, Namespace, NamespaceOption, PodIp, PodSandboxMetadata,
        PodSandboxNetworkStatus, PodSandboxStatus,
    };

    fn response(mode: NamespaceMode, info: &str) -> PodSandboxStatusResponse {
        PodSandboxStatusResponse {
            status: Some(PodSandboxStatus {
                id: "abc".into(),
                metadata: Some(PodSandboxMetadata {
                    name: "web".into(),
                    uid: "u1".into(),
                    namespace: "shop".into(),
                    attempt: 0,
                }),
                network: Some(PodSandboxNetworkStatus {
                    ip: "10.1.0.5".into(),
                    additional_ips: vec![PodIp {
                        ip: "fd00::5".into(),
                    }],
                }),
                linux: Some(LinuxPodSandboxStatus {
                    namespaces: Some(Namespace {
                        options: Some(NamespaceOption {
                            network: mode as i32,
                            ..Default::default()
                        }),
                    }),
                }),
                annotations: [("sidecar.istio.io/status".to_string(), "{}".to_string())].into(),
                ..Default::default()
            }),
            info: [("info".to_string(), info.to_string())].into(),
            ..Default::default()
        }
    }

    /// containerd 1.6's verbose info, trimmed to what is read.
    const INFO: &str = r#"{"pid": 4242, "runtimeSpec": {"linux": {"namespaces": [
        {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1234"}]}}}"#;

    #[test]
    fn reads_identity_addresses_netns_and_pid() {
        let s = from_status("abc", response(NamespaceMode::Pod, INFO)).unwrap();
        assert_eq!((s.namespace.as_str(), s.name.as_str()), ("shop", "web"));
        assert_eq!(
            s.ips,
            vec![
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(s.netns, Some(PathBuf::from("/var/run/netns/cni-1234")));
        assert_eq!(s.pid, Some(4242));
        assert!(!s.host_network);
        assert!(s.annotations.contains_key("sidecar.istio.io/status"));
    }

    #[test]
    fn host_network_pods_and_missing_info() {
        let s = from_status("abc", response(NamespaceMode::Node, "{}")).unwrap();
        assert!(s.host_network);
        assert_eq!((s.netns, s.pid), (None, None));
    }

    #[test]
    fn bad_info_is_an_error() {
        assert!(from_status("abc", response(NamespaceMode::Pod, "not json")).is_err());
    }
}
