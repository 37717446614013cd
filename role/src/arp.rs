//! Gratuitous ARP announcements and RFC 5227-style ARP probes over an `AF_PACKET` socket.
//!
//! An announcement is a broadcast ARP request with sender = target = the virtual IP and our MAC, so neighbours
//! and switches learn the new owner. A probe is a broadcast ARP request with sender IP 0.0.0.0 asking for the
//! virtual IP: anyone who answers (or announces the address) holds it, and promote refuses.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

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
    fd: OwnedFd,
    ifindex: i32,
    iface: String,
    mac: MacAddr,
}

impl ArpSocket {
    fn open(iface: &str) -> Result<ArpSocket, ArpError> {
        let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|_| ArpError::NoInterface(iface.into()))? as i32;
        let mac = mac_address(iface)?;
        let err = |action| move |source| ArpError::Socket { action, iface: iface.into(), source };
        let proto = (libc::ETH_P_ARP as u16).to_be();
        // SAFETY: socket(2) with constant arguments; checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, i32::from(proto)) };
        if fd < 0 {
            return Err(err("open a packet socket for")(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is fresh and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let sll = sockaddr_ll(ifindex, proto, None);
        // SAFETY: `sll` is a valid sockaddr_ll for the duration of the call; the length matches.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(err("bind a packet socket for")(io::Error::last_os_error()));
        }
        Ok(ArpSocket { fd, ifindex, iface: iface.into(), mac })
    }

    fn send(&self, sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Result<(), ArpError> {
        let pkt = arp_packet(ARPOP_REQUEST, self.mac, sender_ip, MacAddr([0; 6]), target_ip);
        let dst = sockaddr_ll(self.ifindex, (libc::ETH_P_ARP as u16).to_be(), Some([0xff; 6]));
        // SAFETY: `pkt` and `dst` are valid for their lengths for the duration of the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&dst as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(ArpError::Socket {
                action: "send",
                iface: self.iface.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Waits until `deadline` for an incoming ARP packet that claims `ip` from another MAC.
    fn watch(&self, ip: Ipv4Addr, deadline: Instant) -> Result<Option<MacAddr>, ArpError> {
        let mut buf = [0u8; 256];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ArpError::Socket { action: "wait for", iface: self.iface.clone(), source: e });
            }
            if r == 0 {
                continue;
            }
            // SAFETY: sockaddr_ll is plain data; all-zero is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut flen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `from` are valid for writes of the given lengths during the call.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut flen,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
                    continue;
                }
                return Err(ArpError::Socket { action: "receive", iface: self.iface.clone(), source: e });
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING || from.sll_ifindex != self.ifindex {
                continue;
            }
            if let Some(mac) = claims(&buf[..n as usize], ip, self.mac) {
                return Ok(Some(mac));
            }
        }
    }
}

fn sockaddr_ll(ifindex: i32, proto_be: u16, dst: Option<[u8; 6]>) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto_be;
    sll.sll_ifindex = ifindex;
    if let Some(d) = dst {
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&d);
    }
    sll
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

/// Re-announces the VIP while this node is primary: one announcement every `garp.refresh_interval_s` until
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
        announce(&cfg.interface, cfg.vip.addr, 1, Duration::ZERO)?;
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
