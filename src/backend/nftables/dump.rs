//! One dump of the inet family's rules over a socket of our own, read with `expr::parse_rules`:
//! rustables fails a whole dump on one expression it cannot decode (a `ct zone` key), and a
//! filtered dump could stop at another family's table of our name.

use super::expr::{self, ParsedRule};
use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use std::os::fd::AsRawFd;

const HEADER_LEN: usize = 16;

/// Every rule of `table` (family inet) in the current netns, in chain order.
pub fn rules_of(table: &str) -> Result<Vec<ParsedRule>, (&'static str, Errno)> {
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(|e| ("cannot open a netfilter netlink socket", e))?;
    let kind = (libc::NFNL_SUBSYS_NFTABLES as u16) << 8 | libc::NFT_MSG_GETRULE as u16;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    let mut req = Vec::with_capacity(HEADER_LEN + 4);
    req.extend_from_slice(&((HEADER_LEN + 4) as u32).to_ne_bytes());
    req.extend_from_slice(&kind.to_ne_bytes());
    req.extend_from_slice(&flags.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[libc::NFPROTO_INET as u8, 0, 0, 0]);
    sendto(
        sock.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(|e| ("cannot ask for the rules", e))?;
    let mut rules = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(("cannot read the rules", e)),
            Ok(0) => return Err(("the rule dump ended early", Errno::EIO)),
            Ok(n) => n,
        };
        let mut at = 0;
        while at + HEADER_LEN <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < HEADER_LEN || at + len > n {
                return Err(("malformed rule dump", Errno::EBADMSG));
            }
            match i32::from(kind) {
                libc::NLMSG_DONE => {
                    return Ok(rules
                        .into_iter()
                        .filter(|r: &ParsedRule| r.table == table)
                        .collect())
                }
                libc::NLMSG_ERROR => {
                    let error = i32::from_ne_bytes(
                        buf[at + HEADER_LEN..at + HEADER_LEN + 4]
                            .try_into()
                            .unwrap_or_default(),
                    );
                    if error != 0 {
                        return Err(("the kernel refused the rule dump", Errno::from_raw(-error)));
                    }
                }
                _ => rules.extend(expr::parse_rules(&buf[at..at + len])),
            }
            at += len.next_multiple_of(4);
        }
    }
}
