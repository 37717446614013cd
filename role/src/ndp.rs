//! IPv6 neighbour discovery for a virtual IP: duplicate address detection before taking it (RFC 4862 5.4) and
//! unsolicited neighbour advertisements after (RFC 4861 7.2.6), over an `AF_PACKET` socket.
//!
//! - **Probe**: a Neighbour Solicitation from the unspecified address `::` to the solicited-node multicast address
//!   of the VIP (`ff02::1:ffXX:XXXX`, Ethernet `33:33:ff:XX:XX:XX`), hop limit 255, target the VIP, no options. A
//!   host that holds the VIP answers with a Neighbour Advertisement to all-nodes (`ff02::1`); its link-layer
//!   address (from the target link-layer address option, else the frame's source) is the MAC promote names when it
//!   refuses.
//! - **Announce**: a Neighbour Advertisement from the VIP to all-nodes, hop limit 255, override flag set (so
//!   neighbours replace the old owner's MAC), solicited flag clear, router flag as the interface forwards, with the
//!   target link-layer address option carrying our MAC. This is what keepalived sends for an IPv6 virtual address
//!   (its `ndisc.c`), and the IPv6 counterpart of a gratuitous ARP.
//!
//! The packets are built here, IPv6 header included, with the ICMPv6 checksum over the pseudo-header; the kernel
//! adds the Ethernet header. The kernel's own DAD is not used (the VIP is added with `IFA_F_NODAD`, see
//! [`crate::netlink`]), so nothing depends on the host's `accept_dad` or `dad_transmits` settings.

use std::io;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use crate::arp::{mac_address, ArpError, MacAddr};
use crate::packet::{BpfInsn, PacketSocket};

/// EtherType of IPv6.
const ETH_P_IPV6: u16 = 0x86dd;
/// IPv6 header length.
const IPV6_HDR: usize = 40;
/// Next-header value of ICMPv6.
const IPPROTO_ICMPV6: u8 = 58;
/// Hop limit every neighbour discovery packet must carry (and is checked on receipt).
const ND_HOP_LIMIT: u8 = 255;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
/// Length of an NS or NA without options: type, code, checksum, flags/reserved, target.
const ND_MSG_LEN: usize = 24;
/// Option type "target link-layer address".
const ND_OPT_TARGET_LL_ADDR: u8 = 2;
const NA_FLAG_ROUTER: u8 = 0x80;
const NA_FLAG_SOLICITED: u8 = 0x40;
const NA_FLAG_OVERRIDE: u8 = 0x20;
/// The all-nodes link-local multicast address.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// Kernel-side filter: only IPv6 packets whose next header is ICMPv6 and whose ICMPv6 type is Neighbour
/// Advertisement reach the socket (offsets from the IPv6 header: a datagram packet socket has no link header).
/// Everything is checked again in [`defends`].
const NA_FILTER: [BpfInsn; 6] = [
    bpf(0x30, 0, 0, 6),                         // ldb [6]          next header
    bpf(0x15, 0, 3, IPPROTO_ICMPV6 as u32),     // jeq #58, else drop
    bpf(0x30, 0, 0, IPV6_HDR as u32),           // ldb [40]         ICMPv6 type
    bpf(0x15, 0, 1, ND_NEIGHBOR_ADVERT as u32), // jeq #136, else drop
    bpf(0x06, 0, 0, 0xffff),                    // ret #65535       accept
    bpf(0x06, 0, 0, 0),                         // ret #0           drop
];

const fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> BpfInsn {
    BpfInsn { code, jt, jf, k }
}

/// Errors of IPv6 neighbour discovery.
#[derive(Debug, thiserror::Error)]
pub enum NdpError {
    /// The interface does not exist in this network namespace.
    #[error("network interface `{0}` does not exist; check `interface` in the [role] configuration")]
    NoInterface(String),
    /// The interface has no Ethernet address (e.g. loopback or a tunnel).
    #[error("interface `{0}` has no Ethernet hardware address; an IPv6 virtual IP needs an Ethernet interface")]
    NotEthernet(String),
    /// A socket operation failed.
    #[error(
        "could not {action} IPv6 neighbour discovery on `{iface}`; blockrep needs root (CAP_NET_RAW) and an interface that is up with IPv6 enabled"
    )]
    Socket {
        /// What was being done.
        action: &'static str,
        /// The interface.
        iface: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl From<ArpError> for NdpError {
    fn from(e: ArpError) -> NdpError {
        match e {
            ArpError::NoInterface(i) => NdpError::NoInterface(i),
            ArpError::NotEthernet(i) => NdpError::NotEthernet(i),
            ArpError::Socket { action, iface, source } => NdpError::Socket { action, iface, source },
            ArpError::Ndp(e) => e,
        }
    }
}

/// The solicited-node multicast address of `a` (RFC 4291 2.7.1): `ff02::1:ff` and the low 24 bits of `a`.
pub fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::from([0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15]])
}

/// The Ethernet address of IPv6 multicast group `g` (RFC 2464 7): `33:33` and the low 32 bits of `g`.
pub fn multicast_mac(g: Ipv6Addr) -> MacAddr {
    let o = g.octets();
    MacAddr([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

/// The ICMPv6 checksum of `msg` (its checksum field zero or not: it is skipped) from `src` to `dst`: the one's
/// complement of the one's complement sum over the pseudo-header (source, destination, upper-layer length, next
/// header) and the message (RFC 4443 2.3, RFC 8200 8.1).
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut add = |bytes: &[u8]| {
        for c in bytes.chunks(2) {
            sum += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(msg.len() as u32).to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(&msg[..2]);
    if msg.len() > 4 {
        add(&msg[4..]);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv6 packet from `src` to `dst` carrying ICMPv6 message `msg` (whose checksum this fills in), hop limit 255.
fn ipv6_icmp(src: Ipv6Addr, dst: Ipv6Addr, mut msg: Vec<u8>) -> Vec<u8> {
    let sum = icmpv6_checksum(src, dst, &msg);
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut p = Vec::with_capacity(IPV6_HDR + msg.len());
    p.extend_from_slice(&0x6000_0000u32.to_be_bytes()); // version 6, traffic class 0, flow label 0
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.push(IPPROTO_ICMPV6);
    p.push(ND_HOP_LIMIT);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&msg);
    p
}

/// The duplicate address detection probe for `target`: a Neighbour Solicitation from `::` to the solicited-node
/// multicast address of `target`, without options (RFC 4861 7.2.2 forbids a source link-layer option here).
pub fn dad_solicitation(target: Ipv6Addr) -> Vec<u8> {
    let mut msg = vec![0u8; ND_MSG_LEN];
    msg[0] = ND_NEIGHBOR_SOLICIT;
    msg[8..24].copy_from_slice(&target.octets());
    ipv6_icmp(Ipv6Addr::UNSPECIFIED, solicited_node(target), msg)
}

/// The unsolicited Neighbour Advertisement for `target` owned by `mac`: from `target` to all-nodes, override set,
/// solicited clear, router as given, with the target link-layer address option.
pub fn unsolicited_advertisement(target: Ipv6Addr, mac: MacAddr, router: bool) -> Vec<u8> {
    let mut msg = vec![0u8; ND_MSG_LEN + 8];
    msg[0] = ND_NEIGHBOR_ADVERT;
    msg[4] = NA_FLAG_OVERRIDE | if router { NA_FLAG_ROUTER } else { 0 };
    msg[8..24].copy_from_slice(&target.octets());
    msg[24] = ND_OPT_TARGET_LL_ADDR;
    msg[25] = 1; // length in units of 8 bytes
    msg[26..32].copy_from_slice(&mac.0);
    ipv6_icmp(target, ALL_NODES, msg)
}

/// If `pkt` (an IPv6 packet) is a valid Neighbour Advertisement for `target` (RFC 4861 7.1.2: hop limit 255, code
/// 0, correct checksum, at least 24 bytes, well-formed options) from a host other than us, that host's MAC: the
/// target link-layer address option if present, else `frame_src`.
pub fn defends(pkt: &[u8], target: Ipv6Addr, ours: MacAddr, frame_src: MacAddr) -> Option<MacAddr> {
    if pkt.len() < IPV6_HDR + ND_MSG_LEN || pkt[0] >> 4 != 6 || pkt[6] != IPPROTO_ICMPV6 || pkt[7] != ND_HOP_LIMIT {
        return None;
    }
    let plen = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
    let msg = pkt.get(IPV6_HDR..IPV6_HDR.checked_add(plen)?)?;
    if msg.len() < ND_MSG_LEN || msg[0] != ND_NEIGHBOR_ADVERT || msg[1] != 0 {
        return None;
    }
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&pkt[8..24]).ok()?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&pkt[24..40]).ok()?);
    if icmpv6_checksum(src, dst, msg) != u16::from_be_bytes([msg[2], msg[3]]) {
        return None;
    }
    // A multicast advertisement must not claim to be solicited.
    if dst.is_multicast() && msg[4] & NA_FLAG_SOLICITED != 0 {
        return None;
    }
    if Ipv6Addr::from(<[u8; 16]>::try_from(&msg[8..24]).ok()?) != target {
        return None;
    }
    let mut mac = frame_src;
    let mut opts = &msg[ND_MSG_LEN..];
    while opts.len() >= 2 {
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            return None; // RFC 4861 7.1.2: an option of length zero invalidates the packet
        }
        if opts[0] == ND_OPT_TARGET_LL_ADDR && len >= 8 {
            mac = MacAddr(opts[2..8].try_into().ok()?);
        }
        opts = &opts[len..];
    }
    (mac != ours).then_some(mac)
}

/// A packet socket for IPv6 on one interface, receiving only neighbour advertisements.
struct NdpSocket {
    sock: PacketSocket,
    iface: String,
    mac: MacAddr,
}

impl NdpSocket {
    fn open(iface: &str) -> Result<NdpSocket, NdpError> {
        let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|_| NdpError::NoInterface(iface.into()))? as i32;
        let mac = mac_address(iface)?;
        let sock = PacketSocket::open(ifindex, ETH_P_IPV6, Some(&NA_FILTER)).map_err(|source| NdpError::Socket {
            action: "open a packet socket for",
            iface: iface.into(),
            source,
        })?;
        Ok(NdpSocket { sock, iface: iface.into(), mac })
    }

    fn send(&self, dst: Ipv6Addr, pkt: &[u8]) -> Result<(), NdpError> {
        self.sock.send(multicast_mac(dst).0, pkt).map_err(|source| NdpError::Socket {
            action: "send",
            iface: self.iface.clone(),
            source,
        })
    }

    fn watch(&self, target: Ipv6Addr, deadline: Instant) -> Result<Option<MacAddr>, NdpError> {
        self.sock
            .watch(deadline, |pkt, src| defends(pkt, target, self.mac, MacAddr(src)))
            .map_err(|source| NdpError::Socket { action: "receive", iface: self.iface.clone(), source })
    }
}

/// Whether `iface` forwards IPv6 (then our advertisements set the router flag, as the kernel's do). Reads the
/// sysctl; never changes it.
fn forwards(iface: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{iface}/forwarding")).is_ok_and(|s| s.trim() == "1")
}

/// Sends `count` unsolicited neighbour advertisements for `vip` on `iface`, `interval` apart.
pub fn announce(iface: &str, vip: Ipv6Addr, count: u32, interval: Duration) -> Result<(), NdpError> {
    let s = NdpSocket::open(iface)?;
    let pkt = unsolicited_advertisement(vip, s.mac, forwards(iface));
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(interval);
        }
        s.send(ALL_NODES, &pkt)?;
    }
    tracing::debug!(iface, %vip, count, "sent unsolicited neighbour advertisements");
    Ok(())
}

/// Duplicate address detection for `ip` on `iface`: sends `count` solicitations `interval` apart and listens until
/// `wait` after the last one. Returns the MAC of the first host that advertised the address.
pub fn probe(
    iface: &str,
    ip: Ipv6Addr,
    count: u32,
    interval: Duration,
    wait: Duration,
) -> Result<Option<MacAddr>, NdpError> {
    let s = NdpSocket::open(iface)?;
    let ns = dad_solicitation(ip);
    let group = solicited_node(ip);
    for i in 0..count {
        s.send(group, &ns)?;
        let pause = if i + 1 == count { wait } else { interval };
        if let Some(mac) = s.watch(ip, Instant::now() + pause)? {
            return Ok(Some(mac));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const THEIRS: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);

    fn vip() -> Ipv6Addr {
        "fd77::12:3456".parse().unwrap()
    }

    #[test]
    fn multicast_addresses() {
        assert_eq!(solicited_node(vip()), "ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap());
        assert_eq!(multicast_mac(solicited_node(vip())).to_string(), "33:33:ff:12:34:56");
        assert_eq!(multicast_mac(ALL_NODES).to_string(), "33:33:00:00:00:01");
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// Byte for byte what Linux 6.18 sends: its DAD solicitation for `fd77::12:3456` (with `enhanced_dad = 0`, so
    /// without a nonce option), and the unsolicited advertisement of `ndisc_notify` after a MAC change, both
    /// captured from a packet socket on the other end of a veth pair.
    #[test]
    fn packets_match_the_kernels_own() {
        let kernel_ns = hex(concat!(
            "6000000000183aff00000000000000000000000000000000ff0200000000000000000001ff123456",
            "8700146000000000fd770000000000000000000000123456"
        ));
        assert_eq!(dad_solicitation(vip()), kernel_ns);
        let kernel_na = hex(concat!(
            "6000000000203afffe80000000000000e02783fffe5ce77dff020000000000000000000000000001",
            "8800c39820000000fe80000000000000e02783fffe5ce77d0201020000000001"
        ));
        let ll: Ipv6Addr = "fe80::e027:83ff:fe5c:e77d".parse().unwrap();
        assert_eq!(unsolicited_advertisement(ll, OURS, false), kernel_na);
        assert_eq!(defends(&kernel_na, ll, THEIRS, THEIRS), Some(OURS));
    }

    #[test]
    fn solicitation_layout() {
        let p = dad_solicitation(vip());
        assert_eq!(p.len(), IPV6_HDR + ND_MSG_LEN, "no options from the unspecified address");
        assert_eq!(p[0] >> 4, 6);
        assert_eq!(usize::from(u16::from_be_bytes([p[4], p[5]])), ND_MSG_LEN);
        assert_eq!((p[6], p[7]), (IPPROTO_ICMPV6, 255));
        assert_eq!(&p[8..24], &[0u8; 16], "source ::");
        assert_eq!(&p[24..40], &solicited_node(vip()).octets());
        assert_eq!((p[40], p[41]), (ND_NEIGHBOR_SOLICIT, 0));
        assert_eq!(&p[48..64], &vip().octets());
    }

    #[test]
    fn advertisement_layout_and_defence_detection() {
        let na = unsolicited_advertisement(vip(), OURS, false);
        assert_eq!(na.len(), IPV6_HDR + ND_MSG_LEN + 8);
        assert_eq!(&na[8..24], &vip().octets(), "source is the VIP");
        assert_eq!(&na[24..40], &ALL_NODES.octets());
        assert_eq!(na[7], 255);
        assert_eq!(na[40], ND_NEIGHBOR_ADVERT);
        assert_eq!(na[44], NA_FLAG_OVERRIDE, "override, not solicited, not router");
        assert_eq!(&na[64..72], &[ND_OPT_TARGET_LL_ADDR, 1, 2, 0, 0, 0, 0, 1]);
        assert_eq!(unsolicited_advertisement(vip(), OURS, true)[44], NA_FLAG_OVERRIDE | NA_FLAG_ROUTER);

        // Our own advertisement is no conflict; another host's is, named by its option or else the frame source.
        assert_eq!(defends(&na, vip(), OURS, OURS), None);
        let theirs = unsolicited_advertisement(vip(), THEIRS, false);
        assert_eq!(defends(&theirs, vip(), OURS, MacAddr([9; 6])), Some(THEIRS), "the option wins");
        let no_opt = {
            let mut msg = theirs[IPV6_HDR..IPV6_HDR + ND_MSG_LEN].to_vec();
            msg[2] = 0;
            msg[3] = 0;
            ipv6_icmp(vip(), ALL_NODES, msg)
        };
        assert_eq!(defends(&no_opt, vip(), OURS, THEIRS), Some(THEIRS));
        assert_eq!(defends(&theirs, "fd77::1".parse().unwrap(), OURS, THEIRS), None, "another target");

        // Invalid packets are ignored: bad checksum, hop limit, zero-length option, truncation, a solicitation.
        let mut bad = theirs.clone();
        bad[IPV6_HDR + 10] ^= 1;
        assert_eq!(defends(&bad, vip(), OURS, THEIRS), None, "checksum");
        let mut bad = theirs.clone();
        bad[7] = 64;
        assert_eq!(defends(&bad, vip(), OURS, THEIRS), None, "hop limit");
        let mut msg = theirs[IPV6_HDR..].to_vec();
        msg[25] = 0;
        assert_eq!(defends(&ipv6_icmp(vip(), ALL_NODES, msg), vip(), OURS, THEIRS), None, "zero-length option");
        for n in 0..theirs.len() - 8 {
            assert_eq!(defends(&theirs[..n], vip(), OURS, THEIRS), None, "truncated to {n}");
        }
        assert_eq!(defends(&dad_solicitation(vip()), vip(), OURS, THEIRS), None);
        let mut msg = theirs[IPV6_HDR..].to_vec();
        msg[4] |= NA_FLAG_SOLICITED;
        assert_eq!(defends(&ipv6_icmp(vip(), ALL_NODES, msg), vip(), OURS, THEIRS), None, "solicited to multicast");
    }
}
