//! The namespace's nftables base chains, read over netlink by hand: hook, priority, type and
//! the raw policy of every chain hooked anywhere, and what their rules do that can take a
//! connection past our interception. rustables 0.9 decodes a `drop` policy as `accept`, and
//! does not expose an object's family; this reads both from the messages themselves.
//!
//! Used by CHECK (both backends): the policy of our own chains, and warnings about other tables
//! that act on a connection before our rules do; and by the iptables-nft removal that works
//! when iptables-nft-save cannot print a table (`table_contents`: chains, rule handles, jumps).

use super::wire;
use super::NAT_PRIORITY;
use crate::cni::error::{Error, Result};
use crate::netlink::{self, HEADER_LEN};
use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{
    sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, OwnedFd};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const SUBSYS: u16 = (libc::NFNL_SUBSYS_NFTABLES as u16) << 8;

// Attributes, from <linux/netfilter/nf_tables.h>.
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
/// NFTA_TARGET_NAME inside an xtables target (`nft_compat`, as iptables-nft writes `-j CT`).
const NFTA_TARGET_NAME: u16 = 1;

/// Protocol families, as in the messages' `nfgen_family`.
pub const INET: u8 = libc::NFPROTO_INET as u8;
pub const IPV4: u8 = libc::NFPROTO_IPV4 as u8;
pub const IPV6: u8 = libc::NFPROTO_IPV6 as u8;
/// Hook numbers of the chains the plugin hooks.
pub const PREROUTING: u32 = libc::NF_INET_PRE_ROUTING as u32;
pub const OUTPUT: u32 = libc::NF_INET_LOCAL_OUT as u32;
pub const NF_ACCEPT: u32 = libc::NF_ACCEPT as u32;

/// One base chain of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseChain {
    pub family: u8,
    pub table: String,
    pub name: String,
    pub hook: u32,
    pub priority: i32,
    /// `filter`, `nat` or `route`.
    pub kind: String,
    /// The raw verdict: NF_ACCEPT (1) or NF_DROP (0).
    pub policy: Option<u32>,
    pub rules: usize,
    /// Some rule turns connection tracking off (`notrack`, or an xtables NOTRACK/CT target).
    pub notrack: bool,
}

impl BaseChain {
    /// `inet intercept-cni prerouting`, as nft names it.
    pub fn describe(&self) -> String {
        let family = match self.family {
            INET => "inet",
            IPV4 => "ip",
            IPV6 => "ip6",
            _ => "other",
        };
        let hook = match self.hook {
            PREROUTING => "prerouting",
            OUTPUT => "output",
            _ => "another hook",
        };
        format!(
            "table {family} {} chain {} ({} hook {hook} priority {})",
            self.table, self.name, self.kind, self.priority
        )
    }

    /// Whether packets of our hooks pass through it (families that carry IPv4 or IPv6).
    fn on_our_hooks(&self) -> bool {
        matches!(self.family, INET | IPV4 | IPV6) && matches!(self.hook, PREROUTING | OUTPUT)
    }
}

/// Every base chain in the current netns, with its rule count.
pub fn base_chains() -> Result<Vec<BaseChain>> {
    let sock = open_socket()?;
    let mut chains = Vec::new();
    dump(&sock, libc::NFT_MSG_GETCHAIN as u16, 1, |family, attrs| {
        chains.extend(chain_of(family, attrs));
    })
    .map_err(|e| Error::backend(format!("cannot list nftables chains: {e}")))?;
    for rule in rules(&sock)? {
        // Table names are unique within a family, chain names within a table.
        if let Some(c) = chains
            .iter_mut()
            .find(|c| c.family == rule.family && c.table == rule.table && c.name == rule.chain)
        {
            c.rules += 1;
            c.notrack |= rule.notrack;
        }
    }
    Ok(chains)
}

/// One rule of the namespace: where it is, its handle, and what it does that matters here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub family: u8,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    /// Chains it jumps or goes to.
    pub jumps: Vec<String>,
    notrack: bool,
}

/// The chain names and rules of one table (`family`, `name`), read over netlink whatever
/// the rules look like: for removing what tools that parse rules cannot read.
pub fn table_contents(family: u8, name: &str) -> Result<(Vec<String>, Vec<RuleRef>)> {
    let sock = open_socket()?;
    let mut chains = Vec::new();
    dump(&sock, libc::NFT_MSG_GETCHAIN as u16, 1, |f, attrs| {
        let (mut table, mut chain) = (None, None);
        for (k, value) in wire::attrs(attrs) {
            match k {
                NFTA_CHAIN_TABLE => table = text(value),
                NFTA_CHAIN_NAME => chain = text(value),
                _ => {}
            }
        }
        if f == family && table.as_deref() == Some(name) {
            chains.extend(chain);
        }
    })
    .map_err(|e| Error::backend(format!("cannot list nftables chains: {e}")))?;
    let rules = rules(&sock)?
        .into_iter()
        .filter(|r| r.family == family && r.table == name)
        .collect();
    Ok((chains, rules))
}

fn open_socket() -> Result<OwnedFd> {
    socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(|e| Error::backend(format!("cannot open a netfilter netlink socket: {e}")))
}

/// Every rule of the namespace.
fn rules(sock: &OwnedFd) -> Result<Vec<RuleRef>> {
    let mut found = Vec::new();
    dump(sock, libc::NFT_MSG_GETRULE as u16, 2, |family, attrs| {
        let mut rule = RuleRef {
            family,
            table: String::new(),
            chain: String::new(),
            handle: 0,
            jumps: Vec::new(),
            notrack: false,
        };
        for (kind, value) in wire::attrs(attrs) {
            match kind {
                NFTA_RULE_TABLE => rule.table = text(value).unwrap_or_default(),
                NFTA_RULE_CHAIN => rule.chain = text(value).unwrap_or_default(),
                NFTA_RULE_HANDLE => rule.handle = be_u64(value).unwrap_or_default(),
                NFTA_RULE_EXPRESSIONS => {
                    for (_, elem) in wire::attrs(value).filter(|(k, _)| *k == NFTA_LIST_ELEM) {
                        rule.notrack |= turns_off_tracking(elem);
                        rule.jumps.extend(jump_target(elem));
                    }
                }
                _ => {}
            }
        }
        found.push(rule);
    })
    .map_err(|e| Error::backend(format!("cannot list nftables rules: {e}")))?;
    Ok(found)
}

/// The chain an `immediate` expression jumps or goes to.
fn jump_target(elem: &[u8]) -> Option<String> {
    let mut name = None;
    let mut data = None;
    for (k, v) in wire::attrs(elem) {
        match k {
            NFTA_EXPR_NAME => name = text(v),
            NFTA_EXPR_DATA => data = Some(v),
            _ => {}
        }
    }
    if name.as_deref() != Some("immediate") {
        return None;
    }
    let (_, value) = wire::attrs(data?).find(|(k, _)| *k == NFTA_IMMEDIATE_DATA)?;
    let (_, verdict) = wire::attrs(value).find(|(k, _)| *k == NFTA_DATA_VERDICT)?;
    let (mut code, mut chain) = (None, None);
    for (k, v) in wire::attrs(verdict) {
        match k {
            NFTA_VERDICT_CODE => code = be_u32(v).map(|c| c as i32),
            NFTA_VERDICT_CHAIN => chain = text(v),
            _ => {}
        }
    }
    matches!(code, Some(NFT_JUMP | NFT_GOTO)).then_some(chain?)
}

/// Sentences about other base chains that can take a connection past ours: a nat chain on our
/// hooks at or before our priority with rules in it (it may translate the connection first, and
/// then ours are never asked), and rules that turn connection tracking off (a connection not
/// tracked is never NATed). `ignore`: chains judged another way (ours, or iptables' own).
pub fn bypasses(chains: &[BaseChain], ignore: impl Fn(&BaseChain) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    for c in chains.iter().filter(|c| c.on_our_hooks() && !ignore(c)) {
        if c.kind == "nat" && c.priority <= NAT_PRIORITY && c.rules > 0 {
            found.push(format!(
                "{} runs at or before the plugin's nat rules (priority {NAT_PRIORITY}): \
                 connections it translates are not intercepted",
                c.describe()
            ));
        }
        if c.notrack {
            found.push(format!(
                "{} turns connection tracking off for what it matches: those connections are \
                 never NATed, so never intercepted",
                c.describe()
            ));
        }
    }
    found
}

fn chain_of(family: u8, attrs: &[u8]) -> Option<BaseChain> {
    let (mut table, mut name, mut hook, mut policy, mut kind) = (None, None, None, None, None);
    for (k, value) in wire::attrs(attrs) {
        match k {
            NFTA_CHAIN_TABLE => table = text(value),
            NFTA_CHAIN_NAME => name = text(value),
            NFTA_CHAIN_HOOK => {
                let (mut num, mut prio) = (None, None);
                for (h, v) in wire::attrs(value) {
                    match h {
                        NFTA_HOOK_HOOKNUM => num = be_u32(v),
                        NFTA_HOOK_PRIORITY => prio = be_u32(v).map(|p| p as i32),
                        _ => {}
                    }
                }
                hook = num.zip(prio);
            }
            NFTA_CHAIN_POLICY => policy = be_u32(value),
            NFTA_CHAIN_TYPE => kind = text(value),
            _ => {}
        }
    }
    let (hook, priority) = hook?;
    Some(BaseChain {
        family,
        table: table?,
        name: name?,
        hook,
        priority,
        kind: kind.unwrap_or_default(),
        policy,
        rules: 0,
        notrack: false,
    })
}

/// One `NFTA_LIST_ELEM` of a rule's expressions.
fn turns_off_tracking(elem: &[u8]) -> bool {
    let (mut name, mut target) = (None, None);
    for (k, v) in wire::attrs(elem) {
        match k {
            NFTA_EXPR_NAME => name = text(v),
            NFTA_EXPR_DATA => {
                target = wire::attrs(v)
                    .find(|(k, _)| *k == NFTA_TARGET_NAME)
                    .and_then(|(_, v)| text(v))
            }
            _ => {}
        }
    }
    match name.as_deref() {
        Some("notrack") => true,
        Some("target") => matches!(target.as_deref(), Some("NOTRACK" | "CT")),
        _ => false,
    }
}

/// Sends a dump request of `msg` for every family and hands each answer's family and attributes
/// (after its `nfgenmsg`) to `each`.
fn dump(
    sock: &OwnedFd,
    msg: u16,
    seq: u32,
    mut each: impl FnMut(u8, &[u8]),
) -> std::result::Result<(), Errno> {
    let mut request = Vec::with_capacity(HEADER_LEN + 4);
    request.extend_from_slice(&((HEADER_LEN + 4) as u32).to_ne_bytes());
    request.extend_from_slice(&(SUBSYS | msg).to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&seq.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    // struct nfgenmsg: every family, NFNETLINK_V0, resource id 0.
    request.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    sendto(
        sock.as_raw_fd(),
        &request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    netlink::receive(sock, 64 * 1024, |kind, got_seq, body| {
        if got_seq != seq {
            return ControlFlow::Continue(());
        }
        match kind {
            NLMSG_DONE => ControlFlow::Break(Ok(())),
            NLMSG_ERROR => {
                let error = body
                    .get(..4)
                    .map_or(0, |e| i32::from_ne_bytes(e.try_into().unwrap()));
                ControlFlow::Break(if error == 0 {
                    Ok(())
                } else {
                    Err(Errno::from_raw(-error))
                })
            }
            _ if body.len() >= 4 => {
                each(body[0], &body[4..]);
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Continue(()),
        }
    })?
}

/// A NUL-terminated string attribute.
fn text(value: &[u8]) -> Option<String> {
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    std::str::from_utf8(&value[..end]).ok().map(str::to_string)
}

fn be_u64(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

fn be_u32(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.get(..4)?.try_into().ok()?))
}
