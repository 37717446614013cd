//! Adding and removing virtual IPs (IPv4 and IPv6) and routes over `NETLINK_ROUTE`.
//!
//! Messages are built and parsed with `netlink-packet-route` and sent over a blocking `netlink-sys` socket: no
//! async runtime (`rtnetlink` would pull in tokio for four requests). Each request is acknowledged
//! (`NLM_F_ACK`) and waited for with a receive timeout. Every call is idempotent: adding what exists or deleting
//! what is absent reports `false` instead of failing.
//!
//! IPv6 addresses are added with `IFA_F_NODAD`: promote has already run duplicate address detection itself
//! ([`crate::ndp::probe`]), and the kernel's own DAD would keep the address tentative (unusable) for about a
//! second, or fail it if the old owner answers late.

use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::config::IpNet;

/// Largest netlink reply read at once.
const MAX_REPLY: usize = 16 * 1024;
/// How long to wait for the kernel's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

static SEQ: AtomicU32 = AtomicU32::new(1);

/// Errors of netlink address and route changes.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The interface does not exist in this network namespace.
    #[error("network interface `{0}` does not exist; check `interface` in the [role] configuration (`ip link`)")]
    NoInterface(String),
    /// The netlink socket could not be opened or used (needs CAP_NET_ADMIN for changes).
    #[error("could not {0} a NETLINK_ROUTE socket; blockrep must run as root to change addresses")]
    Socket(&'static str, #[source] io::Error),
    /// The interfaces' addresses could not be listed.
    #[error("cannot list the network interfaces' addresses (getifaddrs)")]
    List(#[source] io::Error),
    /// The kernel's answer could not be decoded.
    #[error("the kernel's netlink answer to `{what}` could not be decoded: {problem}")]
    Reply {
        /// The request.
        what: String,
        /// What was wrong with the answer.
        problem: String,
    },
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

/// The addresses assigned to `iface` (both families), read with getifaddrs(3), which needs no privilege.
pub fn addresses(iface: &str) -> Result<Vec<IpAddr>, NetlinkError> {
    ifindex(iface)?;
    let all = nix::ifaddrs::getifaddrs().map_err(|e| NetlinkError::List(e.into()))?;
    Ok(all
        .filter(|a| a.interface_name == iface)
        .filter_map(|a| a.address)
        .filter_map(|s| {
            s.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect())
}

/// Index of interface `name` in the current network namespace.
pub fn ifindex(name: &str) -> Result<u32, NetlinkError> {
    nix::net::if_::if_nametoindex(name).map_err(|_| NetlinkError::NoInterface(name.to_string()))
}

/// Adds `net` to `iface` (IPv6: without kernel DAD). Returns `false` if it was already there.
pub fn add_address(iface: &str, net: IpNet) -> Result<bool, NetlinkError> {
    let what = format!("add {net} to {iface}");
    let msg = RouteNetlinkMessage::NewAddress(address_message(ifindex(iface)?, net));
    ack_tolerating(msg, NLM_F_CREATE | NLM_F_EXCL, libc::EEXIST, what)
}

/// Removes `net` from `iface`. Returns `false` if it was not there.
pub fn del_address(iface: &str, net: IpNet) -> Result<bool, NetlinkError> {
    let what = format!("remove {net} from {iface}");
    let msg = RouteNetlinkMessage::DelAddress(address_message(ifindex(iface)?, net));
    ack_tolerating(msg, 0, libc::EADDRNOTAVAIL, what)
}

/// Adds or replaces the route to `dst` (`None`: default route of `via`'s family) via `via` on `iface`.
pub fn add_route(iface: &str, dst: Option<IpNet>, via: IpAddr) -> Result<bool, NetlinkError> {
    let what = format!("add route {} via {via} dev {iface}", dst.map_or("default".into(), |d| d.to_string()));
    let msg = RouteNetlinkMessage::NewRoute(route_message(ifindex(iface)?, dst, via));
    ack_tolerating(msg, NLM_F_CREATE | NLM_F_REPLACE, libc::EEXIST, what)
}

/// Removes the route to `dst` (`None`: default route) via `via` on `iface`. Returns `false` if it was absent.
pub fn del_route(iface: &str, dst: Option<IpNet>, via: IpAddr) -> Result<bool, NetlinkError> {
    let what = format!("remove route {} via {via} dev {iface}", dst.map_or("default".into(), |d| d.to_string()));
    let msg = RouteNetlinkMessage::DelRoute(route_message(ifindex(iface)?, dst, via));
    ack_tolerating(msg, 0, libc::ESRCH, what)
}

fn family(addr: IpAddr) -> AddressFamily {
    if addr.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    }
}

fn address_message(index: u32, net: IpNet) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(net.addr);
    m.header.prefix_len = net.prefix;
    m.header.scope = AddressScope::Universe;
    m.header.index = index;
    // IFA_LOCAL is the interface's own address, IFA_ADDRESS the peer (= local on a broadcast link); `ip addr add`
    // sends both for either family.
    m.attributes.push(AddressAttribute::Local(net.addr));
    m.attributes.push(AddressAttribute::Address(net.addr));
    if let Some(brd) = net.broadcast() {
        m.attributes.push(AddressAttribute::Broadcast(brd));
    }
    if net.is_ipv6() {
        // The header carries the low 8 flag bits, IFA_FLAGS all 32; the kernel prefers IFA_FLAGS when present.
        m.header.flags = AddressHeaderFlags::Nodad;
        m.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    m
}

fn route_address(a: IpAddr) -> RouteAddress {
    match a {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

fn route_message(index: u32, dst: Option<IpNet>, via: IpAddr) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family(via);
    m.header.destination_prefix_length = dst.map_or(0, |d| d.prefix);
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Static;
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unicast;
    if let Some(d) = dst {
        m.attributes.push(RouteAttribute::Destination(route_address(d.network())));
    }
    m.attributes.push(RouteAttribute::Gateway(route_address(via)));
    m.attributes.push(RouteAttribute::Oif(index));
    m
}

/// Serializes `msg` as a request with `flags | NLM_F_REQUEST | NLM_F_ACK` and sequence number `seq`.
fn encode(msg: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags | NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    let mut m = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    m.finalize();
    let mut buf = vec![0u8; m.buffer_len()];
    m.serialize(&mut buf);
    buf
}

/// Sends `msg`, waits for its acknowledgement; `Ok(false)` if the kernel answered `tolerated`.
fn ack_tolerating(msg: RouteNetlinkMessage, flags: u16, tolerated: i32, what: String) -> Result<bool, NetlinkError> {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let request = encode(msg, flags, seq);
    match transact(&request, seq, &what)? {
        0 => Ok(true),
        e if e == tolerated => Ok(false),
        e => Err(NetlinkError::Request { what, source: io::Error::from_raw_os_error(e) }),
    }
}

/// Sends one request and returns the errno of its acknowledgement (0: success).
fn transact(request: &[u8], seq: u32, what: &str) -> Result<i32, NetlinkError> {
    let socket = Socket::new(NETLINK_ROUTE).map_err(|e| NetlinkError::Socket("open", e))?;
    let timeout = nix::sys::time::TimeVal::new(ACK_TIMEOUT.as_secs() as _, 0);
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
        .map_err(|e| NetlinkError::Socket("set a receive timeout on", e.into()))?;
    let kernel = SocketAddr::new(0, 0);
    let n = socket.send_to(request, &kernel, 0).map_err(|e| NetlinkError::Socket("send on", e))?;
    if n != request.len() {
        return Err(NetlinkError::Socket("send on", io::Error::new(io::ErrorKind::WriteZero, "short netlink send")));
    }
    let bad = |problem: String| NetlinkError::Reply { what: what.to_string(), problem };
    let mut buf: Vec<u8> = Vec::with_capacity(MAX_REPLY);
    loop {
        buf.clear();
        socket.recv(&mut buf, 0).map_err(|e| NetlinkError::Socket("receive on", e))?;
        let mut rest = &buf[..];
        while !rest.is_empty() {
            // Check the length before decoding; stop on anything malformed.
            let len = NetlinkBuffer::new_checked(rest).map_err(|e| bad(e.to_string()))?.length() as usize;
            let msg =
                NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len]).map_err(|e| bad(e.to_string()))?;
            if msg.header.sequence_number == seq {
                if let NetlinkPayload::Error(e) = msg.payload {
                    return Ok(e.raw_code().abs());
                }
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn attr(m: &[u8], ty: u16) -> Option<&[u8]> {
        // netlink header (16) + ifaddrmsg (8), then attributes
        let mut rest = &m[24..];
        while rest.len() >= 4 {
            let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
            let t = u16::from_ne_bytes([rest[2], rest[3]]);
            if t == ty {
                return Some(&rest[4..len]);
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
        None
    }

    #[test]
    fn ipv4_address_message_layout() {
        let net: IpNet = "10.77.0.50/24".parse().unwrap();
        let m = encode(RouteNetlinkMessage::NewAddress(address_message(7, net)), NLM_F_CREATE, 9);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize, m.len());
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), libc::RTM_NEWADDR);
        let flags = u16::from_ne_bytes(m[6..8].try_into().unwrap());
        assert_eq!(flags, (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE) as u16);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 9);
        assert_eq!(m.len(), 16 + 8 + 3 * 8, "local, address, broadcast; no IFA_FLAGS for IPv4");
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(m[17], 24);
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().unwrap()), 7);
        assert_eq!(attr(&m, libc::IFA_LOCAL), Some(&[10, 77, 0, 50][..]));
        assert_eq!(attr(&m, libc::IFA_BROADCAST), Some(&[10, 77, 0, 255][..]));
    }

    #[test]
    fn ipv6_address_message_asks_for_no_kernel_dad() {
        let net: IpNet = "fd77::50/64".parse().unwrap();
        let m = encode(RouteNetlinkMessage::NewAddress(address_message(3, net)), 0, 1);
        assert_eq!(m[16], libc::AF_INET6 as u8);
        assert_eq!(m[17], 64);
        assert_eq!(m[18], libc::IFA_F_NODAD as u8, "ifa_flags");
        let local: Ipv6Addr = "fd77::50".parse().unwrap();
        assert_eq!(attr(&m, libc::IFA_LOCAL), Some(&local.octets()[..]));
        assert_eq!(attr(&m, libc::IFA_ADDRESS), Some(&local.octets()[..]));
        assert_eq!(attr(&m, libc::IFA_BROADCAST), None);
        assert_eq!(attr(&m, libc::IFA_FLAGS), Some(&libc::IFA_F_NODAD.to_ne_bytes()[..]));
    }

    #[test]
    fn route_messages_of_both_families() {
        let m = encode(
            RouteNetlinkMessage::NewRoute(route_message(
                4,
                Some("10.78.1.2/16".parse().unwrap()),
                "10.77.0.254".parse().unwrap(),
            )),
            0,
            1,
        );
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), libc::RTM_NEWROUTE);
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
        assert_eq!(
            &m[16..24],
            &[
                libc::AF_INET as u8,
                16,
                0,
                0,
                libc::RT_TABLE_MAIN,
                libc::RTPROT_STATIC,
                libc::RT_SCOPE_UNIVERSE,
                libc::RTN_UNICAST
            ]
        );
        let attrs = &m[28..];
        assert_eq!(&attrs[4..8], &[10, 78, 0, 0], "RTA_DST is the network address");
        let m6 = encode(RouteNetlinkMessage::NewRoute(route_message(4, None, "fe80::1".parse().unwrap())), 0, 1);
        assert_eq!(m6[16], libc::AF_INET6 as u8);
        assert_eq!(m6[17], 0, "default route");
        let gw: Ipv6Addr = "fe80::1".parse().unwrap();
        assert_eq!(&m6[28 + 4..28 + 20], &gw.octets()[..], "RTA_GATEWAY first, no RTA_DST");
    }

    #[test]
    fn unknown_interface_is_named() {
        let e = add_address("nosuchif0", "10.77.0.50/32".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("nosuchif0"), "{e}");
        let e = add_address("nosuchif0", "fd77::50/64".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("nosuchif0"), "{e}");
    }
}
