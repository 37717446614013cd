//! Adding and removing the virtual IP and routes through a raw `NETLINK_ROUTE` socket.
//!
//! Only four requests are needed (RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE, each acknowledged), so
//! this is a small hand-written encoder over `libc` instead of an async netlink stack (`rtnetlink` would pull in
//! tokio and a dozen crates for the same four messages). Every call is idempotent: adding what exists or deleting
//! what is absent reports `false` instead of failing.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::config::Ipv4Net;

/// Largest netlink reply read at once.
const MAX_REPLY: usize = 16 * 1024;
/// Netlink header length.
const NLMSG_HDRLEN: usize = 16;

static SEQ: AtomicU32 = AtomicU32::new(1);

/// Errors of netlink address and route changes.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The interface does not exist in this network namespace.
    #[error("network interface `{0}` does not exist; check `interface` in the [role] configuration (`ip link`)")]
    NoInterface(String),
    /// The netlink socket could not be opened (needs CAP_NET_ADMIN for changes).
    #[error("could not open a NETLINK_ROUTE socket; blockrep must run as root to change addresses")]
    Socket(#[source] io::Error),
    /// The kernel refused a request.
    #[error("the kernel refused to {what}; check the address and interface, and that blockrep runs as root")]
    Request {
        /// The request, e.g. "add 10.77.0.50/24 to eth0".
        what: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

/// Index of interface `name` in the current network namespace.
pub fn ifindex(name: &str) -> Result<u32, NetlinkError> {
    nix::net::if_::if_nametoindex(name).map_err(|_| NetlinkError::NoInterface(name.to_string()))
}

/// Adds `net` to `iface`. Returns `false` if it was already there.
pub fn add_address(iface: &str, net: Ipv4Net) -> Result<bool, NetlinkError> {
    let what = format!("add {net} to {iface}");
    let msg = addr_msg(libc::RTM_NEWADDR, (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16, ifindex(iface)?, net);
    ack_tolerating(&msg, libc::EEXIST, what)
}

/// Removes `net` from `iface`. Returns `false` if it was not there.
pub fn del_address(iface: &str, net: Ipv4Net) -> Result<bool, NetlinkError> {
    let what = format!("remove {net} from {iface}");
    let msg = addr_msg(libc::RTM_DELADDR, 0, ifindex(iface)?, net);
    ack_tolerating(&msg, libc::EADDRNOTAVAIL, what)
}

/// Adds or replaces the route to `dst` (`None`: default route) via `via` on `iface`.
pub fn add_route(iface: &str, dst: Option<Ipv4Net>, via: Ipv4Addr) -> Result<bool, NetlinkError> {
    let what = format!("add route {} via {via} dev {iface}", dst.map_or("default".into(), |d| d.to_string()));
    let flags = (libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
    let msg = route_msg(libc::RTM_NEWROUTE, flags, ifindex(iface)?, dst, via);
    ack_tolerating(&msg, libc::EEXIST, what)
}

/// Removes the route to `dst` (`None`: default route) via `via` on `iface`. Returns `false` if it was absent.
pub fn del_route(iface: &str, dst: Option<Ipv4Net>, via: Ipv4Addr) -> Result<bool, NetlinkError> {
    let what = format!("remove route {} via {via} dev {iface}", dst.map_or("default".into(), |d| d.to_string()));
    let msg = route_msg(libc::RTM_DELROUTE, 0, ifindex(iface)?, dst, via);
    ack_tolerating(&msg, libc::ESRCH, what)
}

fn header(buf: &mut Vec<u8>, ty: u16, flags: u16) {
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&(flags | (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    buf.extend_from_slice(&SEQ.fetch_add(1, Ordering::Relaxed).to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: kernel fills in
}

fn attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

fn finish(mut buf: Vec<u8>) -> Vec<u8> {
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_ne_bytes());
    buf
}

fn addr_msg(ty: u16, flags: u16, index: u32, net: Ipv4Net) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    header(&mut b, ty, flags);
    // struct ifaddrmsg
    b.extend_from_slice(&[libc::AF_INET as u8, net.prefix, 0, libc::RT_SCOPE_UNIVERSE]);
    b.extend_from_slice(&index.to_ne_bytes());
    attr(&mut b, libc::IFA_LOCAL, &net.addr.octets());
    attr(&mut b, libc::IFA_ADDRESS, &net.addr.octets());
    if let Some(brd) = net.broadcast() {
        attr(&mut b, libc::IFA_BROADCAST, &brd.octets());
    }
    finish(b)
}

fn route_msg(ty: u16, flags: u16, index: u32, dst: Option<Ipv4Net>, via: Ipv4Addr) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    header(&mut b, ty, flags);
    let dst_len = dst.map_or(0, |d| d.prefix);
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
    b.extend_from_slice(&[
        libc::AF_INET as u8,
        dst_len,
        0,
        0,
        libc::RT_TABLE_MAIN,
        libc::RTPROT_STATIC,
        libc::RT_SCOPE_UNIVERSE,
        libc::RTN_UNICAST,
    ]);
    b.extend_from_slice(&0u32.to_ne_bytes());
    if let Some(d) = dst {
        attr(&mut b, libc::RTA_DST, &d.network().octets());
    }
    attr(&mut b, libc::RTA_GATEWAY, &via.octets());
    attr(&mut b, libc::RTA_OIF, &index.to_ne_bytes());
    finish(b)
}

/// Sends `msg`, waits for its acknowledgement; `Ok(false)` if the kernel answered `tolerated`.
fn ack_tolerating(msg: &[u8], tolerated: i32, what: String) -> Result<bool, NetlinkError> {
    match transact(msg) {
        Ok(()) => Ok(true),
        Err(NlErr::Kernel(e)) if e == tolerated => Ok(false),
        Err(NlErr::Kernel(e)) => Err(NetlinkError::Request { what, source: io::Error::from_raw_os_error(e) }),
        Err(NlErr::Socket(e)) => Err(NetlinkError::Socket(e)),
    }
}

enum NlErr {
    Socket(io::Error),
    Kernel(i32),
}

fn open_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
    // SAFETY: `tv` is a valid timeval that lives across the call; the length matches its type.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn transact(msg: &[u8]) -> Result<(), NlErr> {
    let fd = open_socket().map_err(NlErr::Socket)?;
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value (pid 0 = kernel, no groups).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `msg` and `kernel` are valid for the given lengths for the duration of the call.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if n < 0 || n as usize != msg.len() {
        return Err(NlErr::Socket(io::Error::last_os_error()));
    }
    let seq = u32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes"));
    let mut buf = vec![0u8; MAX_REPLY];
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes during the call.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(NlErr::Socket(io::Error::last_os_error()));
        }
        let mut rest = &buf[..n as usize];
        // Check each message's length before reading it; stop on anything malformed.
        while rest.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            if len < NLMSG_HDRLEN || len > rest.len() {
                return Err(NlErr::Socket(io::Error::new(io::ErrorKind::InvalidData, "malformed netlink reply")));
            }
            let ty = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
            let mseq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
            if ty == libc::NLMSG_ERROR as u16 && mseq == seq {
                if len < NLMSG_HDRLEN + 4 {
                    return Err(NlErr::Socket(io::Error::new(io::ErrorKind::InvalidData, "short netlink ack")));
                }
                let err = i32::from_ne_bytes(rest[16..20].try_into().expect("4 bytes"));
                return if err == 0 { Ok(()) } else { Err(NlErr::Kernel(-err)) };
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_message_layout() {
        let net: Ipv4Net = "10.77.0.50/24".parse().unwrap();
        let m = addr_msg(libc::RTM_NEWADDR, 0, 7, net);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize, m.len());
        assert_eq!(m.len(), 16 + 8 + 3 * 8);
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], 24);
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().unwrap()), 7);
        assert_eq!(&m[28..32], &[10, 77, 0, 50]);
        assert_eq!(&m[m.len() - 4..], &[10, 77, 0, 255]);
    }

    #[test]
    fn unknown_interface_is_named() {
        let e = add_address("nosuchif0", "10.77.0.50/32".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("nosuchif0"), "{e}");
    }
}
