//! A plain `intercept-cni.io/` pod, whose proxy we know nothing about: the safe order, which is
//! linkerd-cni's. Nothing the proxy sends and nothing through lo (the pod talking to itself, by
//! loopback or by its own address) is ever redirected, so no proxy can loop; every other
//! arriving connection goes to the inbound port (a peer dialling the outbound port included),
//! every other outgoing one to the outbound port.

use super::Program;
use crate::plan::InterceptPlan;

pub(super) fn program(plan: &InterceptPlan) -> Program {
    super::linkerd::program(plan)
}
