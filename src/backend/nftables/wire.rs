//! Hand-encoded nf_tables netlink messages, for what rustables 0.9 cannot express (interval set
//! elements, and any expression it lacks), and a batch that mixes them with rustables objects.
//!
//! [`Msg`] writes one message (nlmsghdr, nfgenmsg, attributes, nested attributes); [`Batch`]
//! puts rustables objects and [`Msg`]s in one batch, in the order they were added, numbering
//! them 1, 2, ... like rustables does; [`attrs`] walks the attributes of a received message.

use nix::libc;
use rustables::{MsgType, ProtocolFamily};

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;
/// Set on the type of an attribute holding attributes.
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLM_F_REQUEST: u16 = 0x1;
/// The largest attribute payload (its length is a u16, header included).
pub const MAX_ATTR_PAYLOAD: usize = u16::MAX as usize - NLA_HDRLEN;

/// One nf_tables message under construction. Integers in attributes are big-endian
/// (`be32`), as nf_tables expects.
#[derive(Debug, Clone)]
pub struct Msg {
    buf: Vec<u8>,
    /// Start offsets of the nested attributes still open.
    open: Vec<usize>,
}

impl Msg {
    /// A request of type `NFT_MSG_*` (e.g. `libc::NFT_MSG_NEWSET`) for a family, with these
    /// `NLM_F_*` flags besides `NLM_F_REQUEST`. The sequence number is the batch's business.
    pub fn new(nft_msg: u16, family: ProtocolFamily, flags: u16) -> Msg {
        let kind = (libc::NFNL_SUBSYS_NFTABLES as u16) << 8 | nft_msg;
        Self::raw(kind, family as u8, flags | NLM_F_REQUEST, 0)
    }

    fn raw(kind: u16, family: u8, flags: u16, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, kept up to date
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // sequence
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        let mut msg = Msg {
            buf,
            open: Vec::new(),
        };
        msg.set_len();
        msg
    }

    fn set_len(&mut self) {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
    }

    /// An attribute with these payload bytes (padded to 4).
    pub fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Msg {
        let len = (NLA_HDRLEN + payload.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    /// A NUL-terminated string attribute.
    pub fn str(&mut self, kind: u16, value: &str) -> &mut Msg {
        let mut payload = Vec::with_capacity(value.len() + 1);
        payload.extend_from_slice(value.as_bytes());
        payload.push(0);
        self.attr(kind, &payload)
    }

    /// A big-endian u32 attribute.
    pub fn be32(&mut self, kind: u16, value: u32) -> &mut Msg {
        self.attr(kind, &value.to_be_bytes())
    }

    /// Opens a nested attribute; attributes until the matching [`Msg::end`] go inside it.
    pub fn begin(&mut self, kind: u16) -> &mut Msg {
        self.open.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    /// Closes the innermost nested attribute.
    ///
    /// # Panics
    /// When none is open, or when it outgrew an attribute's u16 length: both are bugs of the
    /// caller, who must split its payload (see [`MAX_ATTR_PAYLOAD`]).
    pub fn end(&mut self) -> &mut Msg {
        let start = self.open.pop().expect("end() without begin()");
        let len = u16::try_from(self.buf.len() - start).expect("nested attribute too long");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// Bytes written so far inside the innermost open nested attribute (its header included).
    pub fn open_len(&self) -> usize {
        self.open.last().map_or(0, |&start| self.buf.len() - start)
    }

    fn pad(&mut self) {
        let padded = self.buf.len().next_multiple_of(4);
        self.buf.resize(padded, 0);
    }

    /// The finished message.
    ///
    /// # Panics
    /// When a nested attribute is still open (a bug of the caller).
    pub fn into_bytes(mut self) -> Vec<u8> {
        assert!(self.open.is_empty(), "nested attribute left open");
        self.set_len();
        self.buf
    }
}

/// The rustables objects a [`Batch`] takes (rustables' own bound is not nameable outside it).
pub trait Object {
    fn add_to(&self, batch: &mut rustables::Batch, kind: MsgType);
}

macro_rules! rustables_objects {
    ($($t:ty),*) => {$(
        impl Object for $t {
            fn add_to(&self, batch: &mut rustables::Batch, kind: MsgType) {
                batch.add(self, kind);
            }
        }
    )*};
}
rustables_objects!(
    rustables::Table,
    rustables::Chain,
    rustables::Rule,
    rustables::Set
);

/// A batch of rustables objects and hand-encoded messages, in the order added, numbered 1, 2,
/// ... Each hand-encoded message is copied in as it comes (a set's elements are never all held
/// twice); rustables objects wait in a rustables batch until the next one.
pub struct Batch {
    out: Vec<u8>,
    objects: Option<rustables::Batch>,
    pending: usize,
    seq: u32,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    pub fn new() -> Batch {
        let mut batch = Batch {
            out: Vec::with_capacity(16 * 1024),
            objects: None,
            pending: 0,
            seq: 0,
        };
        batch.frame(libc::NFNL_MSG_BATCH_BEGIN as u16);
        batch
    }

    /// Batch begin and end belong to no subsystem; they name nf_tables as their resource.
    fn frame(&mut self, kind: u16) {
        let msg = Msg::raw(
            kind,
            libc::AF_UNSPEC as u8,
            NLM_F_REQUEST,
            libc::NFNL_SUBSYS_NFTABLES as u16,
        );
        self.append(&msg.into_bytes());
    }

    fn append(&mut self, message: &[u8]) {
        let start = self.out.len();
        self.out.extend_from_slice(message);
        self.out[start + 8..start + 12].copy_from_slice(&self.seq.to_ne_bytes());
        self.seq += 1;
    }

    /// Adds a rustables object (table, chain, rule, set).
    pub fn add(&mut self, obj: &impl Object, kind: MsgType) {
        obj.add_to(self.objects.get_or_insert_with(rustables::Batch::new), kind);
        self.pending += 1;
    }

    /// Adds a hand-encoded message.
    pub fn push(&mut self, msg: Msg) {
        self.push_encoded(&msg.into_bytes());
    }

    /// Adds a message encoded elsewhere (`expr::rule_message`).
    pub fn push_encoded(&mut self, message: &[u8]) {
        self.flush();
        self.append(message);
    }

    /// Copies the waiting rustables objects in (without rustables' batch begin and end).
    fn flush(&mut self) {
        let Some(objects) = self.objects.take() else {
            return;
        };
        let theirs = objects.finalize();
        let mut at = 0;
        for i in 0..=self.pending {
            let len = u32::from_ne_bytes(theirs[at..at + 4].try_into().unwrap()) as usize;
            let end = at + len.next_multiple_of(4);
            if i > 0 {
                self.append(&theirs[at..end]);
            }
            at = end;
        }
        self.pending = 0;
    }

    /// The bytes to send: batch begin, the messages numbered 1.. in order, batch end.
    pub fn finalize(mut self) -> Vec<u8> {
        self.flush();
        self.frame(libc::NFNL_MSG_BATCH_END as u16);
        self.out
    }
}

/// The attributes of a message payload or of a nested attribute, as (type, payload); stops at
/// the first malformed one.
pub fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < NLA_HDRLEN {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            return None;
        }
        let payload = &buf[NLA_HDRLEN..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, payload))
    })
}

/// The first attribute of this type.
pub fn attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

/// A string attribute's value, without its NUL.
pub fn attr_str(buf: &[u8], kind: u16) -> Option<&str> {
    let raw = attr(buf, kind)?;
    let raw = raw.split(|&b| b == 0).next().unwrap_or(raw);
    std::str::from_utf8(raw).ok()
}

/// A big-endian u32 attribute's value.
pub fn attr_be32(buf: &[u8], kind: u16) -> Option<u32> {
    Some(u32::from_be_bytes(attr(buf, kind)?.try_into().ok()?))
}

/// Where a received nf_tables message's attributes start (after nlmsghdr and nfgenmsg).
pub const PAYLOAD_OFFSET: usize = NLMSG_HDRLEN + NFGENMSG_LEN;

#[cfg(test)]
mod tests {
    use super::*;
    use rustables::Table;

    fn headers(batch: &[u8]) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < batch.len() {
            let len = u32::from_ne_bytes(batch[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes([batch[at + 4], batch[at + 5]]);
            let seq = u32::from_ne_bytes(batch[at + 8..at + 12].try_into().unwrap());
            out.push((kind, seq));
            at += len.next_multiple_of(4);
        }
        assert_eq!(at, batch.len());
        out
    }

    #[test]
    fn own_messages_interleave_and_are_numbered_in_order() {
        let table = Table::new(ProtocolFamily::Inet).with_name("t");
        let mut batch = Batch::new();
        batch.add(&table, MsgType::Add);
        let mut set = Msg::new(libc::NFT_MSG_NEWSET as u16, ProtocolFamily::Inet, 0);
        set.str(rustables::sys::NFTA_SET_TABLE, "t");
        batch.push(set);
        batch.add(&table, MsgType::Del);
        let kinds: Vec<(u16, u32)> = headers(&batch.finalize());
        let nft = |m: i32| (libc::NFNL_SUBSYS_NFTABLES as u16) << 8 | m as u16;
        assert_eq!(
            kinds,
            [
                (libc::NFNL_MSG_BATCH_BEGIN as u16, 0),
                (nft(libc::NFT_MSG_NEWTABLE), 1),
                (nft(libc::NFT_MSG_NEWSET), 2),
                (nft(libc::NFT_MSG_DELTABLE), 3),
                (libc::NFNL_MSG_BATCH_END as u16, 4),
            ]
        );
    }

    #[test]
    fn nested_attributes_round_trip() {
        let mut msg = Msg::new(libc::NFT_MSG_NEWSETELEM as u16, ProtocolFamily::Inet, 0);
        msg.str(1, "abc").begin(3).begin(1).be32(3, 7).end().end();
        let bytes = msg.into_bytes();
        assert_eq!(
            u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize,
            bytes.len()
        );
        let payload = &bytes[PAYLOAD_OFFSET..];
        assert_eq!(attr_str(payload, 1), Some("abc"));
        let list = attr(payload, 3).unwrap();
        let elem = attr(list, 1).unwrap();
        assert_eq!(attr_be32(elem, 3), Some(7));
    }

    #[test]
    fn malformed_attributes_stop_the_walk() {
        let buf = [200u8, 0, 1, 0, 0, 0, 0, 0];
        assert_eq!(attrs(&buf).count(), 0);
    }
}
