//! Named interval sets of the plugin's table: a port or CIDR list of any length is one set and
//! one rule looking it up, so the rule count and a connection's walk stay constant.
//!
//! rustables 0.9 cannot send interval elements (no `NFTA_SET_ELEM_FLAGS`), so the set and its
//! elements are hand-encoded ([`super::wire`]) into the same batch as the rules. The kernel
//! holds an interval `[a, b]` as a start element `a` and an end element `b + 1` flagged
//! `NFT_SET_ELEM_INTERVAL_END`, and none when `b` is the largest key; intervals must not overlap,
//! so lists are merged (overlapping and adjacent entries) first. Sets are `constant`: their
//! contents change only with the whole table.

use super::wire::{self, Msg};
use super::TABLE_NAME;
use crate::plan::PortRange;
use ipnetwork::IpNetwork;
use nix::libc;
use rustables::sys;
use rustables::ProtocolFamily;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// What a set's keys are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Port,
    Ipv4,
    Ipv6,
}

impl KeyKind {
    /// Key length in bytes (big-endian, as in the packet).
    pub fn len(self) -> usize {
        match self {
            KeyKind::Port => 2,
            KeyKind::Ipv4 => 4,
            KeyKind::Ipv6 => 16,
        }
    }

    fn max(self) -> u128 {
        match self {
            KeyKind::Port => u16::MAX.into(),
            KeyKind::Ipv4 => u32::MAX.into(),
            KeyKind::Ipv6 => u128::MAX,
        }
    }

    /// nft's datatype number (userspace only: it tells `nft list` how to print keys).
    fn nft_type(self) -> u32 {
        match self {
            KeyKind::Ipv4 => 7,
            KeyKind::Ipv6 => 8,
            KeyKind::Port => 13,
        }
    }

    fn nft_name(self) -> &'static str {
        match self {
            KeyKind::Port => "inet_service",
            KeyKind::Ipv4 => "ipv4_addr",
            KeyKind::Ipv6 => "ipv6_addr",
        }
    }

    fn bytes(self, key: u128) -> Vec<u8> {
        key.to_be_bytes()[16 - self.len()..].to_vec()
    }

    fn decode(self, raw: &[u8]) -> Option<u128> {
        if raw.len() != self.len() {
            return None;
        }
        let mut full = [0u8; 16];
        full[16 - raw.len()..].copy_from_slice(raw);
        Some(u128::from_be_bytes(full))
    }
}

/// Flags of every set the plugin makes.
pub const SET_FLAGS: u32 = sys::NFT_SET_CONSTANT | sys::NFT_SET_INTERVAL;

/// One named set: sorted, merged, inclusive intervals of keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: &'static str,
    pub key: KeyKind,
    pub intervals: Vec<(u128, u128)>,
}

impl SetSpec {
    pub fn ports(name: &'static str, ranges: &[PortRange]) -> SetSpec {
        let intervals = ranges
            .iter()
            .map(|r| (u128::from(r.start()), u128::from(r.end())))
            .collect();
        SetSpec::new(name, KeyKind::Port, intervals)
    }

    /// The networks of the family of `key` (`Ipv4` or `Ipv6`) among `nets`.
    pub fn nets(name: &'static str, key: KeyKind, nets: &[IpNetwork]) -> SetSpec {
        let v6 = key == KeyKind::Ipv6;
        let intervals = nets
            .iter()
            .filter(|n| n.is_ipv6() == v6)
            .map(|n| {
                let (start, end) = match n {
                    IpNetwork::V4(n) => (
                        u32::from(n.network()).into(),
                        u32::from(n.broadcast()).into(),
                    ),
                    IpNetwork::V6(n) => (u128::from(n.network()), last_v6(n)),
                };
                (start, end)
            })
            .collect();
        SetSpec::new(name, key, intervals)
    }

    fn new(name: &'static str, key: KeyKind, intervals: Vec<(u128, u128)>) -> SetSpec {
        SetSpec {
            name,
            key,
            intervals: merge(intervals),
        }
    }

    /// The elements as the kernel holds them, ascending: (key, is interval end).
    pub fn elements(&self) -> impl Iterator<Item = (u128, bool)> + '_ {
        let max = self.key.max();
        self.intervals.iter().flat_map(move |&(start, end)| {
            let after = (end < max).then(|| (end + 1, true));
            std::iter::once((start, false)).chain(after)
        })
    }

    /// NFT_MSG_NEWSET, then as many NFT_MSG_NEWSETELEM as the elements need (an attribute
    /// holds at most 64 KiB), each handed to `emit` as soon as it is full. `id` names the set
    /// within the batch (the kernel wants one).
    pub fn messages(&self, id: u32, mut emit: impl FnMut(Msg)) {
        let mut set = Msg::new(
            sys::NFT_MSG_NEWSET as u16,
            ProtocolFamily::Inet,
            libc::NLM_F_CREATE as u16,
        );
        set.str(sys::NFTA_SET_TABLE, TABLE_NAME)
            .str(sys::NFTA_SET_NAME, self.name)
            .be32(sys::NFTA_SET_FLAGS, SET_FLAGS)
            .be32(sys::NFTA_SET_KEY_TYPE, self.key.nft_type())
            .be32(sys::NFTA_SET_KEY_LEN, self.key.len() as u32)
            .be32(sys::NFTA_SET_ID, id);
        emit(set);
        // list element + key + value + flags headers, key padded, flags value.
        let largest = 4 + 4 + 4 + self.key.len().next_multiple_of(4) + 8;
        let mut current: Option<Msg> = None;
        for (key, end) in self.elements() {
            if current
                .as_ref()
                .is_some_and(|m| m.open_len() + largest > wire::MAX_ATTR_PAYLOAD)
            {
                emit(close(current.take()));
            }
            let msg = current.get_or_insert_with(|| self.element_list());
            msg.begin(sys::NFTA_LIST_ELEM)
                .begin(sys::NFTA_SET_ELEM_KEY)
                .attr(sys::NFTA_DATA_VALUE, &self.key.bytes(key))
                .end();
            if end {
                msg.be32(sys::NFTA_SET_ELEM_FLAGS, sys::NFT_SET_ELEM_INTERVAL_END);
            }
            msg.end();
        }
        if current.is_some() {
            emit(close(current));
        }
    }

    fn element_list(&self) -> Msg {
        let mut msg = Msg::new(
            sys::NFT_MSG_NEWSETELEM as u16,
            ProtocolFamily::Inet,
            libc::NLM_F_CREATE as u16,
        );
        msg.str(sys::NFTA_SET_ELEM_LIST_TABLE, TABLE_NAME)
            .str(sys::NFTA_SET_ELEM_LIST_SET, self.name)
            .begin(sys::NFTA_SET_ELEM_LIST_ELEMENTS);
        msg
    }

    /// One interval as nft prints it: a port or port range; an address, a prefix, or a range.
    fn fmt_interval(&self, (start, end): (u128, u128)) -> String {
        let addr = |v: u128| match self.key {
            KeyKind::Ipv4 => Ipv4Addr::from(v as u32).to_string(),
            KeyKind::Ipv6 => Ipv6Addr::from(v).to_string(),
            KeyKind::Port => v.to_string(),
        };
        if start == end {
            return addr(start);
        }
        let span = end - start;
        // A prefix: the span is 2^k - 1 and start is aligned to it.
        if self.key != KeyKind::Port && span & span.wrapping_add(1) == 0 && start & span == 0 {
            let bits = self.key.len() as u32 * 8;
            let prefix = bits - (u128::BITS - span.leading_zeros());
            return format!("{}/{prefix}", addr(start));
        }
        format!("{}-{}", addr(start), addr(end))
    }

    /// Intervals present in one list and not the other, as nft prints them: (missing, extra).
    pub fn differences(&self, installed: &[(u128, bool)]) -> (Vec<String>, Vec<String>) {
        let have = intervals_of(installed, self.key);
        let (mut missing, mut extra) = (Vec::new(), Vec::new());
        // Both lists are sorted: one walk.
        let (mut want, mut got) = (self.intervals.iter().peekable(), have.iter().peekable());
        loop {
            match (want.peek(), got.peek()) {
                (Some(w), Some(g)) if w == g => {
                    want.next();
                    got.next();
                }
                (Some(w), Some(g)) if w < g => {
                    missing.push(self.fmt_interval(**w));
                    want.next();
                }
                (_, Some(g)) => {
                    extra.push(self.fmt_interval(**g));
                    got.next();
                }
                (Some(w), None) => {
                    missing.push(self.fmt_interval(**w));
                    want.next();
                }
                (None, None) => return (missing, extra),
            }
        }
    }
}

fn close(msg: Option<Msg>) -> Msg {
    let mut msg = msg.expect("an element list is open");
    msg.end();
    msg
}

fn last_v6(n: &ipnetwork::Ipv6Network) -> u128 {
    let host_bits = 128 - u32::from(n.prefix());
    let hosts = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    u128::from(n.network()) | hosts
}

/// Sorts and merges overlapping and adjacent intervals, in place (lists can be long).
fn merge(mut intervals: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    intervals.sort_unstable();
    let mut kept = 0;
    for i in 0..intervals.len() {
        let (start, end) = intervals[i];
        if kept > 0 && start <= intervals[kept - 1].1.saturating_add(1) {
            let last = &mut intervals[kept - 1];
            last.1 = last.1.max(end);
        } else {
            intervals[kept] = (start, end);
            kept += 1;
        }
    }
    intervals.truncate(kept);
    intervals.shrink_to_fit();
    intervals
}

/// The intervals a kernel's elements describe (any order): each start runs to the next end
/// element, or to the largest key.
fn intervals_of(elements: &[(u128, bool)], key: KeyKind) -> Vec<(u128, u128)> {
    let mut sorted = elements.to_vec();
    sorted.sort_unstable();
    let mut out = Vec::new();
    let mut open: Option<u128> = None;
    for (k, end) in sorted {
        match (open, end) {
            (Some(start), true) if k > start => {
                out.push((start, k - 1));
                open = None;
            }
            (None, false) => open = Some(k),
            (Some(start), false) => {
                // Two starts in a row: the first runs up to the second.
                out.push((start, k - 1));
                open = Some(k);
            }
            _ => {}
        }
    }
    if let Some(start) = open {
        out.push((start, key.max()));
    }
    out
}

/// Decodes one element of a dumped element list: (key, is interval end).
pub fn decode_element(elem: &[u8], key: KeyKind) -> Option<(u128, bool)> {
    let value = wire::attr(elem, sys::NFTA_SET_ELEM_KEY)?;
    let raw = wire::attr(value, sys::NFTA_DATA_VALUE)?;
    let flags = wire::attr_be32(elem, sys::NFTA_SET_ELEM_FLAGS).unwrap_or(0);
    Some((
        key.decode(raw)?,
        flags & sys::NFT_SET_ELEM_INTERVAL_END != 0,
    ))
}

/// Prints the set the way `nft list table` does (inside the table block).
impl fmt::Display for SetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "\tset {} {{", self.name)?;
        writeln!(f, "\t\ttype {}", self.key.nft_name())?;
        writeln!(f, "\t\tflags constant,interval")?;
        // nft breaks the list after every 5 ports, 2 IPv4 or 1 IPv6 elements.
        let per_line = match self.key {
            KeyKind::Port => 5,
            KeyKind::Ipv4 => 2,
            KeyKind::Ipv6 => 1,
        };
        write!(f, "\t\telements = {{ ")?;
        for (i, &interval) in self.intervals.iter().enumerate() {
            if i > 0 {
                let sep = if i % per_line == 0 {
                    ",\n\t\t\t     "
                } else {
                    ", "
                };
                f.write_str(sep)?;
            }
            f.write_str(&self.fmt_interval(interval))?;
        }
        writeln!(f, " }}")?;
        writeln!(f, "\t}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::test_support::{nets, ports};

    #[test]
    fn overlapping_and_adjacent_entries_merge() {
        let set = SetSpec::ports("p", &ports(&[(80, 80), (81, 90), (85, 100), (200, 300)]));
        assert_eq!(set.intervals, [(80, 100), (200, 300)]);
        let set = SetSpec::nets(
            "n",
            KeyKind::Ipv4,
            &nets(&["10.0.1.0/24", "10.0.0.0/24", "10.0.0.7/32", "10.0.3.0/24"]),
        );
        let text: Vec<String> = set.intervals.iter().map(|&i| set.fmt_interval(i)).collect();
        assert_eq!(text, ["10.0.0.0/23", "10.0.3.0/24"]);
    }

    #[test]
    fn an_interval_ending_at_the_largest_key_has_no_end_element() {
        let set = SetSpec::ports("p", &ports(&[(53, 53), (60000, 65535)]));
        let elements = |s: &SetSpec| s.elements().collect::<Vec<_>>();
        assert_eq!(elements(&set), [(53, false), (54, true), (60000, false)]);
        let all = SetSpec::nets("n", KeyKind::Ipv6, &nets(&["::/0"]));
        assert_eq!(elements(&all), [(0, false)]);
        assert_eq!(all.fmt_interval(all.intervals[0]), "::/0");
        let top = SetSpec::nets("n", KeyKind::Ipv4, &nets(&["255.255.255.0/24"]));
        assert_eq!(elements(&top), [(0xffff_ff00, false)]);
    }

    #[test]
    fn installed_elements_read_back_as_the_same_intervals() {
        let set = SetSpec::nets(
            "n",
            KeyKind::Ipv4,
            &nets(&["1.1.1.1/32", "10.0.0.0/8", "255.0.0.0/8"]),
        );
        let mut installed: Vec<_> = set.elements().collect();
        installed.reverse();
        assert_eq!(set.differences(&installed), (vec![], vec![]));
        installed.retain(|&(k, _)| k != 0x0a00_0000 && k != 0x0b00_0000);
        installed.extend([(0x0c00_0000, false), (0x0d00_0000, true)]);
        let (missing, extra) = set.differences(&installed);
        assert_eq!(missing, ["10.0.0.0/8"]);
        assert_eq!(extra, ["12.0.0.0/8"]);
    }

    #[test]
    fn ranges_that_are_not_prefixes_print_as_ranges() {
        let set = SetSpec::nets(
            "n",
            KeyKind::Ipv4,
            &nets(&["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24"]),
        );
        assert_eq!(set.fmt_interval(set.intervals[0]), "10.0.0.0-10.0.2.255");
    }

    #[test]
    fn large_lists_split_into_several_element_messages() {
        let many: Vec<IpNetwork> = (0..10_000u32)
            .map(|i| IpNetwork::new(Ipv6Addr::from(u128::from(i) << 80).into(), 64).unwrap())
            .collect();
        let set = SetSpec::nets("n", KeyKind::Ipv6, &many);
        let mut msgs = Vec::new();
        set.messages(1, |m| msgs.push(m));
        assert!(msgs.len() > 3, "{} messages", msgs.len());
        let mut decoded = Vec::new();
        for msg in &msgs[1..] {
            let bytes = msg.clone().into_bytes();
            let payload = &bytes[wire::PAYLOAD_OFFSET..];
            let list = wire::attr(payload, sys::NFTA_SET_ELEM_LIST_ELEMENTS).unwrap();
            for (_, elem) in wire::attrs(list) {
                decoded.push(decode_element(elem, KeyKind::Ipv6).unwrap());
            }
        }
        assert_eq!(decoded, set.elements().collect::<Vec<_>>());
    }
}
