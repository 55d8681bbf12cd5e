//! intercept-cni's node tools that speak the CRI: kept out of the per-pod plugin binary, which
//! must not load a gRPC client and an async runtime on every ADD.

pub mod audit;
pub mod cri;
pub mod invocation;
pub mod proof;
