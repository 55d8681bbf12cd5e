//! Sends one nf_tables batch (built by rustables) over a netlink socket of our own.
//!
//! rustables asks the kernel to acknowledge every message of a batch and reads each answer with a
//! recv of its own into a fresh 140 KiB buffer: thirteen round trips through the socket for a
//! pod's table. Errors are reported whether or not an acknowledgement was asked for, so only the
//! last message asks: one answer on success, and any error before it. The kernel processes a
//! batch while `send` runs, so every answer is queued by the time it returns.
//!
//! A transaction is one `sendmsg`: the kernel aborts a batch whose end is not in the same
//! datagram. A batch larger than the socket's send buffer (~208 KiB by default: thousands of set
//! elements) therefore gets a send buffer of its size, so any valid plan goes in atomically.
//! Errors are acknowledged without a copy of the refused message (`NETLINK_CAP_ACK`), so that an
//! answer about a 64 KiB element list fits the reading buffer.

use super::wire::{Msg, PAYLOAD_OFFSET};
use crate::netlink::{self, ReadError, HEADER_LEN};
use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{
    sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, OwnedFd};

const NLM_F_ACK: u16 = libc::NLM_F_ACK as u16;
const NLM_F_EXCL: u16 = libc::NLM_F_EXCL as u16;
const NEWTABLE: u16 = (libc::NFNL_SUBSYS_NFTABLES as u16) << 8 | libc::NFT_MSG_NEWTABLE as u16;

/// Why a batch did not go in.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// The socket could not be opened, or sending or reading failed.
    Socket(&'static str, Errno),
    /// The kernel refused the message with this sequence number (0 is the batch itself).
    Refused { seq: u32, errno: Errno },
}

/// How the batch treats a table that already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse the whole batch (`EEXIST` on the table's message, sequence 1).
    Refuse,
    /// Whatever the batch says (it deletes and re-creates the table itself).
    AsBatched,
}

/// Sends `batch` (rustables' `Batch::finalize()`, which starts with the batch-begin message and
/// ends with batch-end) and waits for the kernel's verdict.
pub fn send(mut batch: Vec<u8>, existing: Existing) -> Result<(), Failure> {
    let last_seq = prepare(&mut batch, existing)?;
    let sock = open()?;
    cap_acks(&sock)?;
    if batch.len() > DEFAULT_SNDBUF_ROOM {
        fit_send_buffer(&sock, batch.len())?;
    }
    let kernel = NetlinkAddr::new(0, 0);
    let sent = sendto(sock.as_raw_fd(), &batch, &kernel, MsgFlags::empty())
        .map_err(|e| match e {
            // Only when SO_SNDBUFFORCE was refused and net.core.wmem_max is below the batch.
            Errno::EMSGSIZE => Failure::Socket(
                "the batch is larger than the netlink send buffer may be (raise net.core.wmem_max, or run with CAP_NET_ADMIN in the host's user namespace)",
                e,
            ),
            e => Failure::Socket("cannot send the batch", e),
        })?;
    if sent != batch.len() {
        return Err(Failure::Socket("the batch was cut short", Errno::EMSGSIZE));
    }
    verdict(&sock, last_seq)
}

/// What a netlink socket's default send buffer takes in one datagram (net.core.wmem_default
/// 212992, minus the 32 bytes netlink keeps); larger batches enlarge the buffer first.
const DEFAULT_SNDBUF_ROOM: usize = 200 * 1024;

fn open() -> Result<OwnedFd, Failure> {
    socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(|e| Failure::Socket("cannot open a netfilter netlink socket", e))
}

/// Errors come back as the error and the refused message's header only.
fn cap_acks(sock: &OwnedFd) -> Result<(), Failure> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, an int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_NETLINK,
            libc::NETLINK_CAP_ACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Failure::Socket(
            "cannot set NETLINK_CAP_ACK on the netlink socket",
            Errno::last(),
        ));
    }
    Ok(())
}

/// A send buffer taking `len` bytes in one datagram: SO_SNDBUFFORCE (CAP_NET_ADMIN, ignores
/// net.core.wmem_max), else SO_SNDBUF within wmem_max, which may still be too small.
fn fit_send_buffer(sock: &OwnedFd, len: usize) -> Result<(), Failure> {
    // The kernel doubles the value for its bookkeeping and wants 32 bytes of room.
    let want = (len + 4096).div_ceil(2) + 64;
    if setsockopt(sock, sockopt::SndBufForce, &want).is_ok() {
        return Ok(());
    }
    setsockopt(sock, sockopt::SndBuf, &want)
        .map_err(|e| Failure::Socket("cannot enlarge the netlink send buffer", e))
}

/// Sends a dump request (`NLM_F_DUMP` is added) and returns the attributes of every message
/// answered, in order.
pub fn dump(request: Msg) -> Result<Vec<Vec<u8>>, Failure> {
    let mut request = request.into_bytes();
    set_flags(&mut request, 0, |flags| flags | libc::NLM_F_DUMP as u16);
    let sock = open()?;
    let kernel = NetlinkAddr::new(0, 0);
    sendto(sock.as_raw_fd(), &request, &kernel, MsgFlags::empty())
        .map_err(|e| Failure::Socket("cannot send a dump request", e))?;
    // Dump datagrams are at most 32 KiB (netlink caps them there).
    let mut out = Vec::new();
    netlink::receive(&sock, 64 * 1024, |kind, _, body| {
        match kind as libc::c_int {
            libc::NLMSG_DONE => ControlFlow::Break(Ok(())),
            libc::NLMSG_ERROR if body.len() >= 4 => {
                let error = i32::from_ne_bytes(body[0..4].try_into().unwrap());
                if error != 0 {
                    return ControlFlow::Break(Err(Failure::Refused {
                        seq: 0,
                        errno: Errno::from_raw(-error),
                    }));
                }
                ControlFlow::Continue(())
            }
            _ if body.len() >= PAYLOAD_OFFSET - HEADER_LEN => {
                out.push(body[PAYLOAD_OFFSET - HEADER_LEN..].to_vec());
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Continue(()),
        }
    })
    .map_err(|e| match e {
        ReadError::Recv(e) => Failure::Socket("cannot read a dump", e),
        ReadError::Closed => Failure::Socket("the dump ended early", Errno::EIO),
        ReadError::Malformed => Failure::Socket("malformed dump", Errno::EBADMSG),
    })??;
    Ok(out)
}

/// Asks for an acknowledgement of the last message only (and makes the table's creation
/// exclusive for `Existing::Refuse`); returns the last message's sequence number.
fn prepare(batch: &mut [u8], existing: Existing) -> Result<u32, Failure> {
    let malformed = Failure::Socket("malformed batch", Errno::EINVAL);
    let mut starts = Vec::new();
    let mut at = 0;
    while at + HEADER_LEN <= batch.len() {
        let len = u32::from_ne_bytes(batch[at..at + 4].try_into().unwrap()) as usize;
        if len < HEADER_LEN || at + len > batch.len() {
            return Err(malformed);
        }
        starts.push(at);
        at += len.next_multiple_of(4);
    }
    // Batch begin, at least one object, batch end.
    if starts.len() < 3 || at != batch.len() {
        return Err(malformed);
    }
    let objects = &starts[1..starts.len() - 1];
    for &start in &starts {
        set_flags(batch, start, |flags| flags & !NLM_F_ACK);
    }
    let last = *objects.last().unwrap();
    set_flags(batch, last, |flags| flags | NLM_F_ACK);
    if existing == Existing::Refuse {
        let first = objects[0];
        if u16::from_ne_bytes([batch[first + 4], batch[first + 5]]) != NEWTABLE {
            return Err(malformed);
        }
        set_flags(batch, first, |flags| flags | NLM_F_EXCL);
    }
    Ok(u32::from_ne_bytes(
        batch[last + 8..last + 12].try_into().unwrap(),
    ))
}

fn set_flags(batch: &mut [u8], start: usize, change: impl Fn(u16) -> u16) {
    let flags = u16::from_ne_bytes([batch[start + 6], batch[start + 7]]);
    batch[start + 6..start + 8].copy_from_slice(&change(flags).to_ne_bytes());
}

/// Reads answers until the last message's acknowledgement or an error; the first error wins.
fn verdict(sock: &OwnedFd, last_seq: u32) -> Result<(), Failure> {
    netlink::receive(sock, 32 * 1024, |kind, _, body| {
        // struct nlmsgerr: the error, then the header of the message answered.
        if kind == libc::NLMSG_ERROR as u16 && body.len() >= 4 + HEADER_LEN {
            let error = i32::from_ne_bytes(body[0..4].try_into().unwrap());
            let seq = u32::from_ne_bytes(body[12..16].try_into().unwrap());
            if error != 0 {
                return ControlFlow::Break(Err(Failure::Refused {
                    seq,
                    errno: Errno::from_raw(-error),
                }));
            }
            if seq == last_seq {
                return ControlFlow::Break(Ok(()));
            }
        }
        ControlFlow::Continue(())
    })
    .map_err(|e| match e {
        ReadError::Recv(e) => Failure::Socket("cannot read the kernel's answer", e),
        ReadError::Closed => Failure::Socket("no answer from the kernel", Errno::EIO),
        ReadError::Malformed => Failure::Socket("malformed answer", Errno::EBADMSG),
    })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustables::{Batch, MsgType, ProtocolFamily, Table};

    fn headers(batch: &[u8]) -> Vec<(u16, u16, u32)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < batch.len() {
            let len = u32::from_ne_bytes(batch[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes([batch[at + 4], batch[at + 5]]);
            let flags = u16::from_ne_bytes([batch[at + 6], batch[at + 7]]);
            let seq = u32::from_ne_bytes(batch[at + 8..at + 12].try_into().unwrap());
            out.push((kind, flags, seq));
            at += len.next_multiple_of(4);
        }
        out
    }

    fn two_tables() -> Vec<u8> {
        let mut batch = Batch::new();
        let table = Table::new(ProtocolFamily::Inet).with_name("t");
        batch.add(&table, MsgType::Add);
        batch.add(&table, MsgType::Del);
        batch.finalize()
    }

    #[test]
    fn only_the_last_message_asks_for_an_answer() {
        let mut batch = two_tables();
        assert_eq!(prepare(&mut batch, Existing::AsBatched), Ok(2));
        let flags: Vec<bool> = headers(&batch)
            .iter()
            .map(|(_, flags, _)| flags & NLM_F_ACK != 0)
            .collect();
        assert_eq!(flags, [false, false, true, false]);
        assert!(headers(&batch).iter().all(|(_, f, _)| f & NLM_F_EXCL == 0));
    }

    #[test]
    fn refusing_an_existing_table_makes_its_creation_exclusive() {
        let mut batch = two_tables();
        prepare(&mut batch, Existing::Refuse).unwrap();
        let (kind, flags, seq) = headers(&batch)[1];
        assert_eq!((kind, seq), (NEWTABLE, 1));
        assert_ne!(flags & NLM_F_EXCL, 0);
    }

    #[test]
    fn a_batch_without_objects_or_cut_short_is_refused() {
        let mut empty = Batch::new().finalize();
        assert!(prepare(&mut empty, Existing::AsBatched).is_err());
        let mut cut = two_tables();
        cut.truncate(cut.len() - 4);
        assert!(prepare(&mut cut, Existing::AsBatched).is_err());
    }
}
