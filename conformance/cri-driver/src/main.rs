//! The conformance suite's kubelet: drives a runtime's CRI the way kubelet does for a pod.
//!
//!   icni-cri-driver SOCKET run-pod NAMESPACE NAME UID ANNOTATIONS_JSON APP_IMAGE
//!       RunPodSandbox (metadata, kubelet's labels, the annotations), then CreateContainer and
//!       StartContainer of one app container; prints the sandbox id
//!   icni-cri-driver SOCKET status ID      the sandbox as the audit reads it, as JSON
//!   icni-cri-driver SOCKET stop ID | remove ID
//!   icni-cri-driver SOCKET clear          stop and remove every sandbox (the suite's cleanup),
//!       printing their netns paths
//!
//! A failed call prints the runtime's message on stderr and exits 1.

use intercept_cni_node::cri::{self, Client};
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("icni-cri-driver: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String]) -> Result<(), String> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let (socket, rest) = words.split_first().ok_or("usage: SOCKET COMMAND ...")?;
    let mut client = cri::connect(Path::new(socket)).await?;
    match rest {
        ["run-pod", namespace, name, uid, annotations, image] => {
            let annotations: HashMap<String, String> =
                serde_json::from_str(annotations).map_err(|e| format!("annotations: {e}"))?;
            let id = run_pod(&mut client, namespace, name, uid, annotations, image).await?;
            println!("{id}");
            Ok(())
        }
        ["status", id] => {
            let s = cri::sandbox(&mut client, id).await?;
            let doc = serde_json::json!({
                "namespace": s.namespace, "name": s.name, "netns": s.netns, "pid": s.pid,
                "ips": s.ips, "hostNetwork": s.host_network,
            });
            println!("{doc}");
            Ok(())
        }
        ["stop", id] => stop(&mut client, id).await,
        ["remove", id] => remove(&mut client, id).await,
        ["clear"] => {
            let items = client
                .list_pod_sandbox(ListPodSandboxRequest { filter: None })
                .await
                .map_err(|s| format!("ListPodSandbox: {}", s.message()))?
                .into_inner()
                .items;
            // Best effort, every sandbox: the netns of one the runtime could not tear down is
            // printed for the caller to remove once the runtime is gone.
            let mut failed = Vec::new();
            for item in items {
                if let Ok(s) = cri::sandbox(&mut client, &item.id).await {
                    if let Some(netns) = s.netns {
                        println!("{}", netns.display());
                    }
                }
                if let Err(e) = stop(&mut client, &item.id).await {
                    failed.push(e);
                }
                if let Err(e) = remove(&mut client, &item.id).await {
                    failed.push(e);
                }
            }
            match failed.is_empty() {
                true => Ok(()),
                false => Err(failed.join("; ")),
            }
        }
        _ => Err(format!("unknown command {rest:?}")),
    }
}

/// Namespaces as kubelet asks for a pod without hostNetwork/hostPID/hostIPC.
fn pod_namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

async fn run_pod(
    client: &mut Client,
    namespace: &str,
    name: &str,
    uid: &str,
    annotations: HashMap<String, String>,
    image: &str,
) -> Result<String, String> {
    // The labels kubelet puts on every sandbox.
    let labels: HashMap<String, String> = [
        ("io.kubernetes.pod.name", name),
        ("io.kubernetes.pod.namespace", namespace),
        ("io.kubernetes.pod.uid", uid),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: namespace.into(),
            attempt: 0,
        }),
        hostname: name.into(),
        labels: labels.clone(),
        annotations,
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(pod_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .map_err(|s| format!("RunPodSandbox: {}", s.message()))?
        .into_inner()
        .pod_sandbox_id;
    let container = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "app".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: vec!["/bin/sleep".into(), "1000000".into()],
        labels,
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(pod_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let container_id = client
        .create_container(CreateContainerRequest {
            pod_sandbox_id: id.clone(),
            config: Some(container),
            sandbox_config: Some(config),
        })
        .await
        .map_err(|s| format!("CreateContainer: {}", s.message()))?
        .into_inner()
        .container_id;
    client
        .start_container(StartContainerRequest { container_id })
        .await
        .map_err(|s| format!("StartContainer: {}", s.message()))?;
    Ok(id)
}

async fn stop(client: &mut Client, id: &str) -> Result<(), String> {
    client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        })
        .await
        .map(drop)
        .map_err(|s| format!("StopPodSandbox: {}", s.message()))
}

async fn remove(client: &mut Client, id: &str) -> Result<(), String> {
    client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        })
        .await
        .map(drop)
        .map_err(|s| format!("RemovePodSandbox: {}", s.message()))
}
