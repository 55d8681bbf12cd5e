//! Reading a netlink socket's answers: one `recv` per datagram, each message's header checked
//! against the datagram before its body is handed on. Each caller decides what the messages
//! mean (DONE, errors, acknowledgements) and how a failure to read is reported.

use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, OwnedFd};

/// struct nlmsghdr.
pub const HEADER_LEN: usize = 16;

/// Why the answers could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// `recv` failed.
    Recv(Errno),
    /// The socket returned nothing.
    Closed,
    /// A message's length does not fit its datagram.
    Malformed,
}

impl From<ReadError> for Errno {
    fn from(e: ReadError) -> Errno {
        match e {
            ReadError::Recv(e) => e,
            ReadError::Closed => Errno::EIO,
            ReadError::Malformed => Errno::EBADMSG,
        }
    }
}

/// Reads datagrams of at most `buf_len` bytes and hands each message's type, sequence number
/// and body (after the nlmsghdr) to `each`, until it breaks with the result.
pub fn receive<B>(
    sock: &OwnedFd,
    buf_len: usize,
    mut each: impl FnMut(u16, u32, &[u8]) -> ControlFlow<B>,
) -> Result<B, ReadError> {
    let mut buf = vec![0u8; buf_len];
    loop {
        let n = match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(ReadError::Recv(e)),
            Ok(0) => return Err(ReadError::Closed),
            Ok(n) => n,
        };
        let mut at = 0;
        while at + HEADER_LEN <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap());
            if len < HEADER_LEN || at + len > n {
                return Err(ReadError::Malformed);
            }
            if let ControlFlow::Break(done) = each(kind, seq, &buf[at + HEADER_LEN..at + len]) {
                return Ok(done);
            }
            at += len.next_multiple_of(4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{send, socketpair, AddressFamily, SockFlag, SockType};

    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut out = ((HEADER_LEN + body.len()) as u32).to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(body);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::Datagram,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn walks_padded_messages_across_datagrams_until_told_to_stop() {
        let (ours, theirs) = pair();
        let mut first = message(16, 1, b"abc");
        first.extend(message(17, 2, b""));
        send(theirs.as_raw_fd(), &first, MsgFlags::empty()).unwrap();
        send(
            theirs.as_raw_fd(),
            &message(3, 9, b"done"),
            MsgFlags::empty(),
        )
        .unwrap();
        let mut seen = Vec::new();
        let last = receive(&ours, 1024, |kind, seq, body| {
            seen.push((kind, seq, body.to_vec()));
            if kind == 3 {
                ControlFlow::Break(seq)
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(last, Ok(9));
        assert_eq!(
            seen,
            [
                (16, 1, b"abc".to_vec()),
                (17, 2, vec![]),
                (3, 9, b"done".to_vec())
            ]
        );
    }

    #[test]
    fn a_length_past_the_datagram_or_an_empty_read_is_an_error() {
        let (ours, theirs) = pair();
        let mut bad = message(16, 1, b"abcd");
        bad[0] = 64;
        send(theirs.as_raw_fd(), &bad, MsgFlags::empty()).unwrap();
        send(theirs.as_raw_fd(), &[], MsgFlags::empty()).unwrap();
        let never = |_, _, _: &[u8]| ControlFlow::<()>::Continue(());
        assert_eq!(receive(&ours, 1024, never), Err(ReadError::Malformed));
        assert_eq!(receive(&ours, 1024, never), Err(ReadError::Closed));
        assert_eq!(Errno::from(ReadError::Closed), Errno::EIO);
        assert_eq!(Errno::from(ReadError::Malformed), Errno::EBADMSG);
    }
}
