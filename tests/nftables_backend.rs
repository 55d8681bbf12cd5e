//! Root-only tests of the nftables backend alone: programmed into throwaway namespaces, read back
//! over netlink and with `nft`, tampered with, removed, and proven with live traffic.

mod common;

use common::*;
use intercept_cni::backend::nftables::{render_text, Nftables};
use intercept_cni::backend::Backend;
use intercept_cni::netns::PodNetns;
use intercept_cni::plan::{Families, InterceptPlan};
use std::path::Path;

fn in_ns<T: Send>(
    ns: &Netns,
    f: impl FnOnce() -> intercept_cni::cni::error::Result<T> + Send,
) -> intercept_cni::cni::error::Result<T> {
    let pod = PodNetns::open(Path::new(&ns.path()))
        .expect("open netns")
        .expect("netns exists");
    pod.run(f)
}

#[test]
fn listing_equals_rendered_text() {
    let ns = Netns::new("nft");
    let plan = InterceptPlan::with_defaults(Families::BOTH);
    in_ns(&ns, || Nftables.apply(&plan)).expect("apply");
    let listed = ns.nft_ruleset();
    assert_eq!(listed, render_text(&plan));
}

#[test]
fn live_default_plan_redirects() {
    let lab = Lab::new();
    let plan = InterceptPlan::with_defaults(Families::BOTH);
    in_ns(&lab.pod, || Nftables.apply(&plan)).expect("apply");
    assert_lands(
        &lab.pod,
        v4(PEER_V4, 8080),
        None,
        &lab.pod,
        v4(0x7f000001.into(), OUTBOUND_PORT),
    );
    assert_lands(
        &lab.pod,
        v6(PEER_V6, 8080),
        None,
        &lab.pod,
        v6(std::net::Ipv6Addr::LOCALHOST, OUTBOUND_PORT),
    );
    assert_lands(
        &lab.peer,
        v4(POD_V4, 9080),
        None,
        &lab.pod,
        v4(POD_V4, INBOUND_PORT),
    );
    assert_lands(
        &lab.peer,
        v6(POD_V6, 9080),
        None,
        &lab.pod,
        v6(POD_V6, INBOUND_PORT),
    );
    assert_lands(
        &lab.pod,
        v4(PEER_V4, 8080),
        Some((PROXY_UID, 1000)),
        &lab.peer,
        v4(PEER_V4, 8080),
    );
    in_ns(&lab.pod, || Nftables.remove()).expect("remove");
    in_ns(&lab.pod, || Nftables.remove()).expect("remove again");
    assert_eq!(lab.pod.nft_ruleset(), "");
}
