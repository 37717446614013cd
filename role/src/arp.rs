//! Gratuitous ARP announcements and RFC 5227-style ARP probes over an `AF_PACKET` socket.
//!
//! An announcement is a broadcast ARP request with sender = target = the virtual IP and our MAC, so neighbours
//! and switches learn the new owner. A probe is a broadcast ARP request with sender IP 0.0.0.0 asking for the
//! virtual IP: anyone who answers (or announces the address) holds it, and promote refuses.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ndp::NdpError;
use crate::packet::PacketSocket;

/// ARP payload length for Ethernet/IPv4.
const ARP_LEN: usize = 28;
const ARPOP_REQUEST: u16 = 1;
const ARPOP_REPLY: u16 = 2;

/// Errors of sending or receiving ARP.
#[derive(Debug, thiserror::Error)]
pub enum ArpError {
    /// The interface does not exist in this network namespace.
    #[error("network interface `{0}` does not exist; check `interface` in the [role] configuration")]
    NoInterface(String),
    /// The interface has no Ethernet address (e.g. loopback or a tunnel).
    #[error("interface `{0}` has no Ethernet hardware address; the virtual IP needs an Ethernet interface")]
    NotEthernet(String),
    /// A socket operation failed.
    #[error("could not {action} ARP on `{iface}`; blockrep needs root (CAP_NET_RAW) and an interface that is up")]
    Socket {
        /// What was being done.
        action: &'static str,
        /// The interface.
        iface: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Re-announcing an IPv6 virtual IP (unsolicited neighbour advertisement) failed.
    #[error(transparent)]
    Ndp(#[from] NdpError),
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The Ethernet address of `iface`.
pub fn mac_address(iface: &str) -> Result<MacAddr, ArpError> {
    let sock_err = |source| ArpError::Socket { action: "query the hardware address for", iface: iface.into(), source };
    if iface.len() >= libc::IFNAMSIZ {
        return Err(ArpError::NoInterface(iface.into()));
    }
    // SAFETY: socket(2) with constant arguments; checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sock_err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is fresh and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the NUL-terminated name (length checked above, rest zero) and writes
    // `ifr_hwaddr` inside `req`, which lives across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ENODEV) {
            ArpError::NoInterface(iface.into())
        } else {
            sock_err(e)
        });
    }
    // SAFETY: after a successful SIOCGIFHWADDR the union holds `ifru_hwaddr`.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    if hw.sa_family != libc::ARPHRD_ETHER {
        return Err(ArpError::NotEthernet(iface.into()));
    }
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(MacAddr(mac))
}

/// An `AF_PACKET` socket bound to the ARP protocol on one interface.
struct ArpSocket {
    sock: PacketSocket,
    iface: String,
    mac: MacAddr,
}

impl ArpSocket {
    fn open(iface: &str) -> Result<ArpSocket, ArpError> {
        let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|_| ArpError::NoInterface(iface.into()))? as i32;
        let mac = mac_address(iface)?;
        let sock = PacketSocket::open(ifindex, libc::ETH_P_ARP as u16, None).map_err(|source| ArpError::Socket {
            action: "open a packet socket for",
            iface: iface.into(),
            source,
        })?;
        Ok(ArpSocket { sock, iface: iface.into(), mac })
    }

    fn send(&self, sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Result<(), ArpError> {
        let pkt = arp_packet(ARPOP_REQUEST, self.mac, sender_ip, MacAddr([0; 6]), target_ip);
        self.sock.send([0xff; 6], &pkt).map_err(|source| ArpError::Socket {
            action: "send",
            iface: self.iface.clone(),
            source,
        })
    }

    /// Waits until `deadline` for an incoming ARP packet that claims `ip` from another MAC.
    fn watch(&self, ip: Ipv4Addr, deadline: Instant) -> Result<Option<MacAddr>, ArpError> {
        self.sock.watch(deadline, |pkt, _src| claims(pkt, ip, self.mac)).map_err(|source| ArpError::Socket {
            action: "receive",
            iface: self.iface.clone(),
            source,
        })
    }
}

fn arp_packet(op: u16, sha: MacAddr, spa: Ipv4Addr, tha: MacAddr, tpa: Ipv4Addr) -> [u8; ARP_LEN] {
    let mut p = [0u8; ARP_LEN];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&op.to_be_bytes());
    p[8..14].copy_from_slice(&sha.0);
    p[14..18].copy_from_slice(&spa.octets());
    p[18..24].copy_from_slice(&tha.0);
    p[24..28].copy_from_slice(&tpa.octets());
    p
}

/// If `pkt` is an Ethernet/IPv4 ARP request or reply whose sender is `ip` from a MAC other than `ours`, that MAC.
fn claims(pkt: &[u8], ip: Ipv4Addr, ours: MacAddr) -> Option<MacAddr> {
    if pkt.len() < ARP_LEN || pkt[0..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    let op = u16::from_be_bytes([pkt[6], pkt[7]]);
    if op != ARPOP_REQUEST && op != ARPOP_REPLY {
        return None;
    }
    let sha = MacAddr(pkt[8..14].try_into().ok()?);
    let spa = Ipv4Addr::new(pkt[14], pkt[15], pkt[16], pkt[17]);
    (spa == ip && sha != ours).then_some(sha)
}

/// Sends `count` gratuitous ARP announcements for `vip` on `iface`, `interval` apart.
pub fn announce(iface: &str, vip: Ipv4Addr, count: u32, interval: Duration) -> Result<(), ArpError> {
    let s = ArpSocket::open(iface)?;
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(interval);
        }
        s.send(vip, vip)?;
    }
    tracing::debug!(iface, %vip, count, "sent gratuitous ARP");
    Ok(())
}

/// Probes whether another host holds `ip` on `iface`: sends `count` probes `interval` apart and listens until
/// `wait` after the last one. Returns the MAC of the first host that claimed the address.
pub fn probe(
    iface: &str,
    ip: Ipv4Addr,
    count: u32,
    interval: Duration,
    wait: Duration,
) -> Result<Option<MacAddr>, ArpError> {
    let s = ArpSocket::open(iface)?;
    for i in 0..count {
        s.send(Ipv4Addr::UNSPECIFIED, ip)?;
        let pause = if i + 1 == count { wait } else { interval };
        if let Some(mac) = s.watch(ip, Instant::now() + pause)? {
            return Ok(Some(mac));
        }
    }
    Ok(None)
}

/// Announces every virtual IP of `cfg` `count` times, `garp.interval_ms` apart: gratuitous ARP for IPv4,
/// unsolicited neighbour advertisements ([`crate::ndp::announce`]) for IPv6. Each round announces all VIPs, so
/// the whole takes `(count - 1) * interval` however many VIPs there are.
pub fn announce_all(cfg: &crate::Config, count: u32) -> Result<(), ArpError> {
    let interval = Duration::from_millis(cfg.garp.interval_ms);
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(interval);
        }
        for v in &cfg.vip {
            match v.addr {
                IpAddr::V4(a) => announce(&cfg.interface, a, 1, Duration::ZERO)?,
                IpAddr::V6(a) => crate::ndp::announce(&cfg.interface, a, 1, Duration::ZERO)?,
            }
        }
    }
    Ok(())
}

/// Re-announces the VIPs while this node is primary: one announcement each every `garp.refresh_interval_s` until
/// `garp.refresh_s` have passed, `stop` is set, or the role is no longer primary. The lead runs this from `serve`
/// or a timer after promote.
pub fn refresh(cfg: &crate::Config, stop: &AtomicBool) -> Result<(), ArpError> {
    let end = Instant::now() + Duration::from_secs(cfg.garp.refresh_s);
    let step = Duration::from_secs(cfg.garp.refresh_interval_s.max(1));
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let primary = crate::state::load(&cfg.state_dir).map(|s| s.role == crate::Role::Primary).unwrap_or(false);
        if !primary {
            break;
        }
        announce_all(cfg, 1)?;
        let next = Instant::now() + step;
        while Instant::now() < next.min(end) && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_layout_and_claim_detection() {
        let ours = MacAddr([2, 0, 0, 0, 0, 1]);
        let theirs = MacAddr([2, 0, 0, 0, 0, 2]);
        let vip = Ipv4Addr::new(10, 77, 0, 50);
        let garp = arp_packet(ARPOP_REQUEST, ours, vip, MacAddr([0; 6]), vip);
        assert_eq!(&garp[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(claims(&garp, vip, ours), None, "our own announcement is not a conflict");
        let reply = arp_packet(ARPOP_REPLY, theirs, vip, ours, Ipv4Addr::UNSPECIFIED);
        assert_eq!(claims(&reply, vip, ours), Some(theirs));
        let probe = arp_packet(ARPOP_REQUEST, theirs, Ipv4Addr::UNSPECIFIED, MacAddr([0; 6]), vip);
        assert_eq!(claims(&probe, vip, ours), None, "another prober does not hold the address");
        assert_eq!(claims(&reply[..20], vip, ours), None);
        assert_eq!(theirs.to_string(), "02:00:00:00:00:02");
    }
}
