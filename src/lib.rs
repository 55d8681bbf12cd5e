//! intercept-cni: a chained CNI plugin that installs transparent service-mesh interception
//! (inbound and outbound TCP to the sidecar proxy) inside each pod's network namespace.

pub mod agent;
#[cfg(target_env = "musl")]
pub mod alloc;
pub mod backend;
pub mod cmd;
pub mod cni;
pub mod host;
pub mod install;
pub mod logging;
pub mod netlink;
pub mod netns;
pub mod plan;
pub mod policy;
pub mod rename;
pub mod route;
pub mod trusted_path;
pub mod usage;
