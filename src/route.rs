//! TPROXY's policy routing in the pod netns, over rtnetlink (no `ip` binary): Istio's
//! `ip rule add fwmark 1337 lookup 133` and `ip route add local default dev lo table 133`, per
//! family, so packets the mangle rules mark reach the local stack (and the proxy's transparent
//! listener) whatever their destination address.
//!
//! The rule gets an explicit priority, 32765: the one the kernel gives Istio's rule in a fresh
//! pod netns (just before `main`), and explicit so a repeated ADD finds it instead of adding a
//! second one. Only the default ADD path never comes here (REDIRECT needs no routing).

use crate::cni::error::{Code, Error, Result};
use crate::netlink::{self, HEADER_LEN};
use crate::plan::{InterceptPlan, InterceptionMode, Tproxy};
use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{
    sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, OwnedFd};

/// The priority of our fwmark rule.
pub const RULE_PRIORITY: u32 = 32765;

const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FR_ACT_TO_TBL: u8 = 1;
const RTN_LOCAL: u8 = 2;
const RT_SCOPE_HOST: u8 = 254;
const RTPROT_BOOT: u8 = 3;

/// What DEL removes when it cannot know the plan: Istio's numbers.
const ISTIO: Tproxy = Tproxy::istio();

fn families(plan: &InterceptPlan) -> Vec<u8> {
    let mut out = Vec::new();
    if plan.families.ipv4 {
        out.push(libc::AF_INET as u8);
    }
    if plan.families.ipv6 {
        out.push(libc::AF_INET6 as u8);
    }
    out
}

fn family_name(family: u8) -> &'static str {
    if family == libc::AF_INET6 as u8 {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// Installs the rule and route for a TPROXY plan (nothing for REDIRECT).
pub fn apply(plan: &InterceptPlan) -> Result<()> {
    let InterceptionMode::Tproxy(t) = plan.mode else {
        return Ok(());
    };
    let sock = Socket::open()?;
    let lo = loopback_index()?;
    for family in families(plan) {
        let what = family_name(family);
        sock.request(libc::RTM_NEWRULE, create_flags(), &rule_body(family, t))
            .or_else(exists_is_fine)
            .map_err(|e| fail(format!("cannot add the {what} fwmark rule"), e))?;
        sock.request(
            libc::RTM_NEWROUTE,
            create_flags(),
            &route_body(family, t, lo),
        )
        .or_else(exists_is_fine)
        .map_err(|e| fail(format!("cannot add the {what} local route"), e))?;
    }
    Ok(())
}

/// Removes what `apply` installs, for both families; absent is success.
pub fn remove() -> Result<()> {
    let sock = Socket::open()?;
    let lo = loopback_index().unwrap_or(1);
    let ack = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let what = family_name(family);
        // A rule added twice by hand would need two deletes; a few rounds at most.
        for _ in 0..8 {
            match sock.request(libc::RTM_DELRULE, ack, &rule_body(family, ISTIO)) {
                Ok(()) => continue,
                Err(Errno::ENOENT | Errno::EAFNOSUPPORT) => break,
                Err(e) => return Err(fail(format!("cannot remove the {what} fwmark rule"), e)),
            }
        }
        match sock.request(libc::RTM_DELROUTE, ack, &route_body(family, ISTIO, lo)) {
            Ok(()) | Err(Errno::ENOENT | Errno::ESRCH | Errno::EAFNOSUPPORT) => {}
            Err(e) => return Err(fail(format!("cannot remove the {what} local route"), e)),
        }
    }
    Ok(())
}

/// What of `apply(plan)` is missing, described; empty when intact.
pub fn drift(plan: &InterceptPlan) -> Result<Vec<String>> {
    let InterceptionMode::Tproxy(t) = plan.mode else {
        return Ok(Vec::new());
    };
    let sock = Socket::open()?;
    let lo = loopback_index()?;
    let mut drift = Vec::new();
    for family in families(plan) {
        let what = family_name(family);
        let rules = sock
            .dump(libc::RTM_GETRULE, family)
            .map_err(|e| fail("cannot list the routing rules".into(), e))?;
        let rule_found = rules.iter().any(|(_, header, attrs)| {
            header.get(7) == Some(&FR_ACT_TO_TBL)
                && attr_u32(attrs, FRA_FWMARK) == Some(t.mark)
                && attr_u32(attrs, FRA_TABLE) == Some(t.route_table)
                && attr_u32(attrs, FRA_PRIORITY) == Some(RULE_PRIORITY)
        });
        if !rule_found {
            drift.push(format!(
                "{what} rule `fwmark {} lookup {}` is missing",
                t.mark, t.route_table
            ));
        }
        let routes = sock
            .dump(libc::RTM_GETROUTE, family)
            .map_err(|e| fail("cannot list the routes".into(), e))?;
        let route_found = routes.iter().any(|(_, header, attrs)| {
            header.first() == Some(&family)
                && header.get(1) == Some(&0)
                && header.get(7) == Some(&RTN_LOCAL)
                && attr_u32(attrs, RTA_TABLE) == Some(t.route_table)
                && attr_u32(attrs, RTA_OIF) == Some(lo)
        });
        if !route_found {
            drift.push(format!(
                "{what} route `local default dev lo table {}` is missing",
                t.route_table
            ));
        }
    }
    Ok(drift)
}

fn create_flags() -> u16 {
    (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16
}

fn exists_is_fine(e: Errno) -> std::result::Result<(), Errno> {
    match e {
        Errno::EEXIST => Ok(()),
        e => Err(e),
    }
}

fn fail(what: String, errno: Errno) -> Error {
    let hint = match errno {
        Errno::EPERM => " (CAP_NET_ADMIN in the pod's network namespace is needed)",
        Errno::EAFNOSUPPORT => " (the kernel lacks this family)",
        _ => "",
    };
    Error::new(Code::Backend, format!("{what}: {errno}{hint}"))
}

fn loopback_index() -> Result<u32> {
    nix::net::if_::if_nametoindex("lo")
        .map_err(|e| fail("cannot find the loopback interface".into(), e))
}

fn put_u32(buf: &mut Vec<u8>, kind: u16, v: u32) {
    buf.extend_from_slice(&8u16.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&v.to_ne_bytes());
}

/// struct fib_rule_hdr and attributes: `fwmark MARK lookup TABLE priority 32765`.
fn rule_body(family: u8, t: Tproxy) -> Vec<u8> {
    let table = u8::try_from(t.route_table).unwrap_or(libc::RT_TABLE_UNSPEC);
    let mut body = vec![family, 0, 0, 0, table, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
    put_u32(&mut body, FRA_PRIORITY, RULE_PRIORITY);
    put_u32(&mut body, FRA_FWMARK, t.mark);
    put_u32(&mut body, FRA_TABLE, t.route_table);
    body
}

/// struct rtmsg and attributes: `local default dev lo table TABLE`.
fn route_body(family: u8, t: Tproxy, lo: u32) -> Vec<u8> {
    let table = u8::try_from(t.route_table).unwrap_or(libc::RT_TABLE_UNSPEC);
    let mut body = vec![
        family,
        0,
        0,
        0,
        table,
        RTPROT_BOOT,
        RT_SCOPE_HOST,
        RTN_LOCAL,
        0,
        0,
        0,
        0,
    ];
    put_u32(&mut body, RTA_TABLE, t.route_table);
    put_u32(&mut body, RTA_OIF, lo);
    body
}

/// (type, fixed header, attributes) of each message of a dump.
type Message = (u16, Vec<u8>, Vec<(u16, Vec<u8>)>);

fn attr_u32(attrs: &[(u16, Vec<u8>)], kind: u16) -> Option<u32> {
    attrs
        .iter()
        .find(|(k, _)| *k == kind)
        .and_then(|(_, v)| Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?)))
}

struct Socket(OwnedFd);

impl Socket {
    fn open() -> Result<Socket> {
        socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map(Socket)
        .map_err(|e| fail("cannot open a routing netlink socket".into(), e))
    }

    fn send(&self, kind: u16, flags: u16, body: &[u8]) -> std::result::Result<(), Errno> {
        let len = HEADER_LEN + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        let sent = sendto(
            self.0.as_raw_fd(),
            &msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        if sent == len {
            Ok(())
        } else {
            Err(Errno::EMSGSIZE)
        }
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&self, kind: u16, flags: u16, body: &[u8]) -> std::result::Result<(), Errno> {
        self.send(kind, flags, body)?;
        netlink::receive(&self.0, 32 * 1024, |kind, _, payload| {
            if kind != libc::NLMSG_ERROR as u16 {
                return ControlFlow::Continue(());
            }
            let error = payload.get(..4).map_or(-libc::EBADMSG, |b| {
                i32::from_ne_bytes(b.try_into().unwrap())
            });
            ControlFlow::Break(if error == 0 {
                Ok(())
            } else {
                Err(Errno::from_raw(-error))
            })
        })?
    }

    /// All messages of a dump of `kind` for `family`.
    fn dump(&self, kind: u16, family: u8) -> std::result::Result<Vec<Message>, Errno> {
        // struct rtmsg and struct fib_rule_hdr are both 12 bytes with the family first.
        let mut body = vec![0u8; 12];
        body[0] = family;
        self.send(kind, (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16, &body)?;
        let mut out = Vec::new();
        let mut failed = None;
        netlink::receive(&self.0, 32 * 1024, |kind, _, payload| {
            match i32::from(kind) {
                libc::NLMSG_DONE => ControlFlow::Break(()),
                libc::NLMSG_ERROR => {
                    let error = payload.get(..4).map_or(-libc::EBADMSG, |b| {
                        i32::from_ne_bytes(b.try_into().unwrap())
                    });
                    if error != 0 {
                        failed = Some(Errno::from_raw(-error));
                    }
                    ControlFlow::Break(())
                }
                _ => {
                    if payload.len() >= 12 {
                        out.push((kind, payload[..12].to_vec(), attributes(&payload[12..])));
                    }
                    ControlFlow::Continue(())
                }
            }
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

fn attributes(mut buf: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((kind, buf[4..len].to_vec()));
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_ip_would() {
        let body = rule_body(libc::AF_INET as u8, Tproxy::istio());
        assert_eq!(&body[..12], &[2, 0, 0, 0, 133, 0, 0, 1, 0, 0, 0, 0]);
        let attrs = attributes(&body[12..]);
        assert_eq!(attr_u32(&attrs, FRA_FWMARK), Some(1337));
        assert_eq!(attr_u32(&attrs, FRA_TABLE), Some(133));
        assert_eq!(attr_u32(&attrs, FRA_PRIORITY), Some(RULE_PRIORITY));
        let body = route_body(libc::AF_INET6 as u8, Tproxy::istio(), 1);
        assert_eq!(&body[..8], &[10, 0, 0, 0, 133, 3, 254, 2]);
        let attrs = attributes(&body[12..]);
        assert_eq!(attr_u32(&attrs, RTA_OIF), Some(1));
    }
}
