//! nf_tables expressions and rule messages encoded by hand, for what rustables 0.9 cannot say
//! (`ct zone set`, `tproxy`) and cannot read back (a `ct zone` key fails its whole rule dump).
//! The messages join the batch (`splice`), and `parse_*` reads rules back in a form that
//! compares what was sent with what the kernel dumps, whoever encoded it (rustables, `wire`,
//! this module).
//!
//! Attribute numbers are the kernel's (include/uapi/linux/netfilter/nf_tables.h); numeric
//! attributes are big-endian, register contents (marks, UIDs, zones) in host order, ports and
//! addresses in network order, as nft sends them.

use crate::plan::PortRange;
use ipnetwork::IpNetwork;
use nix::libc;
use std::net::IpAddr;

const NLA_HDRLEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// Registers: the verdict register and the first 16-byte data register.
pub const REG_VERDICT: u32 = 0;
pub const REG_1: u32 = 1;
pub const REG_2: u32 = 2;

pub const NF_DROP: i32 = 0;
pub const NF_ACCEPT: i32 = 1;
pub const NFT_JUMP: i32 = -3;
pub const NFT_RETURN: i32 = -5;

pub const META_MARK: u32 = 3;
pub const META_IIFNAME: u32 = 6;
pub const META_OIFNAME: u32 = 7;
pub const META_SKUID: u32 = 10;
pub const META_SKGID: u32 = 11;
pub const META_NFPROTO: u32 = 15;
pub const META_L4PROTO: u32 = 16;

pub const CT_STATE: u32 = 0;
pub const CT_MARK: u32 = 3;
pub const CT_ZONE: u32 = 17;
/// Conntrack state bits as `ct state` reads them.
pub const CT_STATE_INVALID: u32 = 1;
pub const CT_STATE_ESTABLISHED: u32 = 2;
pub const CT_STATE_RELATED: u32 = 4;

pub const CMP_EQ: u32 = 0;
pub const CMP_NEQ: u32 = 1;
pub const CMP_GTE: u32 = 5;
pub const CMP_LTE: u32 = 3;

pub const PAYLOAD_NETWORK: u32 = 1;
pub const PAYLOAD_TRANSPORT: u32 = 2;

/// One expression: its name and its encoded NFTA_EXPR_DATA attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expr {
    name: &'static str,
    data: Vec<u8>,
}

fn put(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = NLA_HDRLEN + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

/// Builds the attributes of one expression.
struct Attrs(Vec<u8>);

impl Attrs {
    fn new() -> Self {
        Attrs(Vec::new())
    }
    fn u32(mut self, kind: u16, v: u32) -> Self {
        put(&mut self.0, kind, &be32(v));
        self
    }
    fn nested(mut self, kind: u16, inner: &[u8]) -> Self {
        put(&mut self.0, kind | NLA_F_NESTED, inner);
        self
    }
    fn value(self, kind: u16, data: &[u8]) -> Self {
        let mut inner = Vec::new();
        put(&mut inner, NFTA_DATA_VALUE, data);
        self.nested(kind, &inner)
    }
    fn expr(self, name: &'static str) -> Expr {
        Expr { name, data: self.0 }
    }
}

/// `meta KEY` into register 1.
pub fn meta_load(key: u32) -> Expr {
    Attrs::new().u32(1, REG_1).u32(2, key).expr("meta")
}

/// `meta KEY set` from register 1.
pub fn meta_set(key: u32) -> Expr {
    Attrs::new().u32(2, key).u32(3, REG_1).expr("meta")
}

/// Compares register 1 with `data`.
pub fn cmp(op: u32, data: &[u8]) -> Expr {
    Attrs::new()
        .u32(1, REG_1)
        .u32(2, op)
        .value(3, data)
        .expr("cmp")
}

/// Loads `len` bytes of a header at `offset` into register 1.
pub fn payload(base: u32, offset: u32, len: u32) -> Expr {
    Attrs::new()
        .u32(1, REG_1)
        .u32(2, base)
        .u32(3, offset)
        .u32(4, len)
        .expr("payload")
}

/// An address's bytes, in network order.
pub fn octets(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Loads the packet's IPv4 or IPv6 source or destination address into register 1 (the family
/// must be known already).
pub fn load_address(ipv6: bool, source: bool) -> Expr {
    let (offset, len) = match (ipv6, source) {
        (false, true) => (12, 4),
        (false, false) => (16, 4),
        (true, true) => (8, 16),
        (true, false) => (24, 16),
    };
    payload(PAYLOAD_NETWORK, offset, len)
}

/// `saddr`/`daddr` compared (`op`) with `net`: the load, a mask when `net` is shorter than a
/// host, and the comparison.
pub fn address_cmp(net: &IpNetwork, source: bool, op: u32) -> Vec<Expr> {
    let mut exprs = vec![load_address(net.is_ipv6(), source)];
    let host = if net.is_ipv6() { 128 } else { 32 };
    if net.prefix() < host {
        exprs.push(and_mask(&octets(net.mask())));
    }
    exprs.push(cmp(op, &octets(net.network())));
    exprs
}

/// Register 1 (a port, big-endian) equal to `range`'s only port, or within it: big-endian bytes
/// compare (memcmp) in numeric order.
pub fn port_cmps(range: &PortRange) -> Vec<Expr> {
    if range.is_single() {
        vec![cmp(CMP_EQ, &range.start().to_be_bytes())]
    } else {
        vec![
            cmp(CMP_GTE, &range.start().to_be_bytes()),
            cmp(CMP_LTE, &range.end().to_be_bytes()),
        ]
    }
}

/// Register 1 = register 1 & mask (xor 0).
pub fn and_mask(mask: &[u8]) -> Expr {
    Attrs::new()
        .u32(1, REG_1)
        .u32(2, REG_1)
        .u32(3, mask.len() as u32)
        .value(4, mask)
        .value(5, &vec![0; mask.len()])
        .expr("bitwise")
}

/// `data` into register `reg`.
pub fn immediate(reg: u32, data: &[u8]) -> Expr {
    Attrs::new().u32(1, reg).value(2, data).expr("immediate")
}

/// A verdict; `chain` for a jump.
pub fn verdict(code: i32, chain: Option<&str>) -> Expr {
    let mut v = Vec::new();
    put(&mut v, NFTA_VERDICT_CODE, &be32(code as u32));
    if let Some(chain) = chain {
        put(&mut v, NFTA_VERDICT_CHAIN, &c_string(chain));
    }
    let mut data = Vec::new();
    put(&mut data, NFTA_DATA_VERDICT | NLA_F_NESTED, &v);
    Attrs::new()
        .u32(1, REG_VERDICT)
        .nested(2, &data)
        .expr("immediate")
}

/// Matches when register 1 is in the set named `set` (of the same table).
pub fn lookup(set: &str) -> Expr {
    let mut attrs = Vec::new();
    put(&mut attrs, 1, &c_string(set)); // NFTA_LOOKUP_SET
    Attrs(attrs).u32(2, REG_1).expr("lookup") // NFTA_LOOKUP_SREG
}

/// `redirect to :port`, the port in register 1: NFTA_REDIR_REG_PROTO_MIN and _MAX, and
/// NFTA_REDIR_FLAGS = NF_NAT_RANGE_PROTO_SPECIFIED.
pub fn redir() -> Expr {
    Attrs::new()
        .u32(1, REG_1)
        .u32(2, REG_1)
        .u32(3, NF_NAT_RANGE_PROTO_SPECIFIED)
        .expr("redir")
}

const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;

/// `ct KEY` into register 1.
pub fn ct_load(key: u32) -> Expr {
    Attrs::new().u32(1, REG_1).u32(2, key).expr("ct")
}

/// `ct KEY set` from register 1.
pub fn ct_set(key: u32) -> Expr {
    Attrs::new().u32(2, key).u32(4, REG_1).expr("ct")
}

/// `tproxy <family> to :port`, the port in register 2 (the address: the arriving one).
pub fn tproxy(nfproto: u8) -> Expr {
    Attrs::new()
        .u32(1, u32::from(nfproto))
        .u32(3, REG_2)
        .expr("tproxy")
}

/// DNAT to the address in register 1 and the port in register 2.
pub fn dnat(nfproto: u8) -> Expr {
    Attrs::new()
        .u32(1, 1) // NFT_NAT_DNAT
        .u32(2, u32::from(nfproto))
        .u32(3, REG_1)
        .u32(5, REG_2)
        .expr("nat")
}

fn c_string(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// An interface name as `iifname`/`oifname` compare it (IFNAMSIZ, zero-padded).
pub fn ifname(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.resize(libc::IFNAMSIZ, 0);
    v
}

/// An NFT_MSG_NEWRULE appending `exprs` to `chain` of the inet `table`; sequence 0 until
/// `splice` numbers it.
pub fn rule_message(table: &str, chain: &str, exprs: &[Expr]) -> Vec<u8> {
    let mut list = Vec::with_capacity(1024);
    let mut elem = Vec::with_capacity(128);
    for e in exprs {
        elem.clear();
        put(&mut elem, NFTA_EXPR_NAME, &c_string(e.name));
        put(&mut elem, NFTA_EXPR_DATA | NLA_F_NESTED, &e.data);
        put(&mut list, NFTA_LIST_ELEM | NLA_F_NESTED, &elem);
    }
    let mut attrs = Vec::with_capacity(list.len() + 64);
    put(&mut attrs, NFTA_RULE_TABLE, &c_string(table));
    put(&mut attrs, NFTA_RULE_CHAIN, &c_string(chain));
    put(&mut attrs, NFTA_RULE_EXPRESSIONS | NLA_F_NESTED, &list);
    let kind = (libc::NFNL_SUBSYS_NFTABLES as u16) << 8 | libc::NFT_MSG_NEWRULE as u16;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_CREATE | libc::NLM_F_APPEND) as u16;
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&[0; 8]); // sequence, port id
    msg.extend_from_slice(&[libc::NFPROTO_INET as u8, 0, 0, 0]);
    msg.extend_from_slice(&attrs);
    msg
}

/// One attribute: its type (flags masked) and payload.
fn attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            break;
        }
        out.push((kind, &buf[NLA_HDRLEN..len]));
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

/// A rule as read from a message: its chain and its expressions in a form independent of who
/// encoded them (attribute order, nesting flags, and what the kernel adds on a dump: a NAT's
/// range ends equal to its starts, a bitwise's default operation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRule {
    pub table: String,
    pub chain: String,
    pub exprs: Vec<Canonical>,
}

/// An expression: name and sorted (attribute, value) pairs, nested data flattened.
pub type Canonical = (String, Vec<(u16, Vec<u8>)>);

fn string(v: &[u8]) -> String {
    String::from_utf8_lossy(v.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
}

/// Nested attributes, by expression: cmp data, immediate data, bitwise mask and xor.
fn is_data(name: &str, kind: u16) -> bool {
    matches!(
        (name, kind),
        ("cmp", 3) | ("immediate", 2) | ("bitwise", 4) | ("bitwise", 5)
    )
}

/// The flat form of an NFTA_DATA_* nest: its value bytes, or a verdict's code and chain.
fn flatten_data(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, inner) in attrs(v) {
        out.extend_from_slice(&kind.to_ne_bytes());
        match kind {
            NFTA_DATA_VERDICT => {
                let mut parts = attrs(inner);
                parts.sort();
                for (k, p) in parts {
                    out.extend_from_slice(&k.to_ne_bytes());
                    out.extend_from_slice(without_nul(p));
                }
            }
            _ => out.extend_from_slice(inner),
        }
    }
    out
}

/// A string attribute without its terminating NUL (senders differ in sending it).
fn without_nul(v: &[u8]) -> &[u8] {
    v.strip_suffix(&[0]).unwrap_or(v)
}

fn canonical(name: String, data: &[u8]) -> Canonical {
    let mut list: Vec<(u16, Vec<u8>)> = attrs(data)
        .into_iter()
        .map(|(kind, v)| match is_data(&name, kind) {
            true => (kind, flatten_data(v)),
            false => (kind, v.to_vec()),
        })
        .collect();
    let get = |list: &[(u16, Vec<u8>)], k: u16| list.iter().find(|(t, _)| *t == k).cloned();
    match name.as_str() {
        // NFTA_NAT_REG_ADDR_MAX / PROTO_MAX equal to the minimums, and NFTA_NAT_FLAGS saying
        // only that there are address and port registers, are what the kernel infers.
        "nat" => {
            for (max, min) in [(4, 3), (6, 5)] {
                if get(&list, max).map(|m| m.1) == get(&list, min).map(|m| m.1) {
                    list.retain(|(t, _)| *t != max);
                }
            }
            let inferred =
                u32::from(get(&list, 3).is_some()) | u32::from(get(&list, 5).is_some()) << 1;
            list.retain(|(t, v)| !(*t == 7 && v.as_slice() == be32(inferred)));
        }
        // NFTA_LOOKUP_SET_ID only names a set of the same batch; NFTA_LOOKUP_FLAGS 0 (not
        // inverted) is the default the kernel dumps.
        // The set's name, with or without its NUL.
        "lookup" => {
            list.retain(|(t, v)| *t != 4 && !(*t == 5 && v.as_slice() == be32(0)));
            for (t, v) in &mut list {
                if *t == 1 {
                    *v = without_nul(v).to_vec();
                }
            }
        }
        // NFTA_BITWISE_OP 0 (mask and xor) is the default.
        "bitwise" => list.retain(|(t, v)| !(*t == 6 && v.as_slice() == be32(0))),
        _ => {}
    }
    list.sort();
    (name, list)
}

/// The rules in a stream of NFT_MSG_NEWRULE messages (a dump, or a batch of our own).
pub fn parse_rules(mut buf: &[u8]) -> Vec<ParsedRule> {
    let newrule = (libc::NFNL_SUBSYS_NFTABLES as u16) << 8 | libc::NFT_MSG_NEWRULE as u16;
    let mut rules = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        if kind == newrule && len >= NLMSG_HDRLEN + NFGENMSG_LEN {
            rules.push(parse_rule(&buf[NLMSG_HDRLEN + NFGENMSG_LEN..len]));
        }
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    rules
}

/// A rule from the attributes of an NFT_MSG_NEWRULE message (after nlmsghdr and nfgenmsg).
pub fn parse_rule(body: &[u8]) -> ParsedRule {
    let mut rule = ParsedRule {
        table: String::new(),
        chain: String::new(),
        exprs: Vec::new(),
    };
    for (kind, v) in attrs(body) {
        match kind {
            NFTA_RULE_TABLE => rule.table = string(v),
            NFTA_RULE_CHAIN => rule.chain = string(v),
            NFTA_RULE_EXPRESSIONS => {
                for (_, elem) in attrs(v) {
                    let mut name = String::new();
                    let mut data: &[u8] = &[];
                    for (k, part) in attrs(elem) {
                        match k {
                            NFTA_EXPR_NAME => name = string(part),
                            NFTA_EXPR_DATA => data = part,
                            _ => {}
                        }
                    }
                    rule.exprs.push(canonical(name, data));
                }
            }
            _ => {}
        }
    }
    rule
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_reads_back_as_written_whatever_the_attribute_order() {
        let exprs = [
            meta_load(META_L4PROTO),
            cmp(CMP_EQ, &[17]),
            immediate(REG_1, &1u16.to_ne_bytes()),
            ct_set(CT_ZONE),
            verdict(NFT_JUMP, Some("divert")),
        ];
        let msg = rule_message("t", "c", &exprs);
        let parsed = parse_rules(&msg);
        assert_eq!(parsed.len(), 1);
        assert_eq!(
            (parsed[0].table.as_str(), parsed[0].chain.as_str()),
            ("t", "c")
        );
        assert_eq!(parsed[0].exprs.len(), 5);
        // The same ct expression with its attributes in the other order and no nesting flags.
        let mut swapped = Vec::new();
        put(&mut swapped, 4, &be32(REG_1));
        put(&mut swapped, 2, &be32(CT_ZONE));
        assert_eq!(canonical("ct".into(), &swapped), parsed[0].exprs[3]);
    }

    #[test]
    fn the_kernels_inferred_nat_maximums_do_not_count() {
        let sent = dnat(libc::NFPROTO_IPV4 as u8);
        let mut dumped = sent.data.clone();
        put(&mut dumped, 4, &be32(REG_1));
        put(&mut dumped, 6, &be32(REG_2));
        assert_eq!(
            canonical("nat".into(), &sent.data),
            canonical("nat".into(), &dumped)
        );
        put(&mut dumped, 7, &be32(3)); // NF_NAT_RANGE_MAP_IPS | PROTO_SPECIFIED
        assert_eq!(
            canonical("nat".into(), &sent.data),
            canonical("nat".into(), &dumped)
        );
        let mut other = sent.data.clone();
        put(&mut other, 7, &be32(7)); // a flag the rule did not ask for
        assert_ne!(
            canonical("nat".into(), &sent.data),
            canonical("nat".into(), &other)
        );
    }

    #[test]
    fn encoded_rules_are_numbered_after_the_objects_before_them() {
        let mut batch = super::super::wire::Batch::new();
        let table = rustables::Table::new(rustables::ProtocolFamily::Inet).with_name("t");
        batch.add(&table, rustables::MsgType::Add);
        let rule = rule_message("t", "c", &[verdict(NF_ACCEPT, None)]);
        batch.push_encoded(&rule);
        batch.push_encoded(&rule);
        let out = batch.finalize();
        // Batch begin 0, the table 1, ours 2 and 3, then batch end 4.
        let mut seqs = Vec::new();
        let mut at = 0;
        while at < out.len() {
            seqs.push(u32::from_ne_bytes(out[at + 8..at + 12].try_into().unwrap()));
            at += (u32::from_ne_bytes(out[at..at + 4].try_into().unwrap()) as usize)
                .next_multiple_of(4);
        }
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
        assert_eq!(parse_rules(&out).len(), 2);
    }
}
