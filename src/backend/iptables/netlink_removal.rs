//! Removal for iptables-nft when its own tools cannot read the nat table: a rule written with
//! `nft` (a set lookup, `meta mark set`) makes iptables-nft-save fail, and anything with
//! NET_ADMIN in the pod could so wedge teardown. Our chains and every rule that jumps or goes to
//! them are then deleted over netlink, by handle, in one batch, whatever the rules look like.

use super::chains::Family;
use super::save::is_own_chain;
use crate::backend::nftables::listing;
use crate::backend::nftables::transport::{self, Existing, Failure};
use crate::cni::error::{Error, Result};
use rustables::{Batch, Chain, MsgType, ProtocolFamily, Rule, Table};

/// Removes our chains from iptables-nft's `nat` table of `family`, and every jump to them.
pub fn remove_own(family: Family) -> Result<()> {
    let (nfproto, code) = match family {
        Family::V4 => (ProtocolFamily::Ipv4, listing::IPV4),
        Family::V6 => (ProtocolFamily::Ipv6, listing::IPV6),
    };
    let (chains, rules) = listing::table_contents(code, "nat")?;
    let own: Vec<&String> = chains.iter().filter(|c| is_own_chain(c)).collect();
    let doomed: Vec<&listing::RuleRef> = rules
        .iter()
        .filter(|r| is_own_chain(&r.chain) || r.jumps.iter().any(|t| is_own_chain(t)))
        .collect();
    if own.is_empty() && doomed.is_empty() {
        return Ok(());
    }
    let table = Table::new(nfproto).with_name("nat");
    let mut batch = Batch::new();
    // Rules first: a chain is deleted only once empty and nothing jumps to it.
    for rule in doomed {
        let chain = Chain::new(&table).with_name(rule.chain.as_str());
        let mut del = Rule::new(&chain)
            .map_err(|e| Error::backend(format!("cannot build an nftables rule: {e}")))?;
        del.set_handle(rule.handle);
        batch.add(&del, MsgType::Del);
    }
    for name in own {
        batch.add(&Chain::new(&table).with_name(name.as_str()), MsgType::Del);
    }
    transport::send(batch.finalize(), Existing::AsBatched).map_err(|f| {
        let why = match f {
            Failure::Refused { errno, .. } => errno.to_string(),
            Failure::Socket(what, errno) => format!("{what}: {errno}"),
        };
        Error::backend(format!(
            "cannot remove the {} iptables-nft chains over netlink: {why}",
            family.label()
        ))
    })
}
