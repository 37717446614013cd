//! An `AF_PACKET` datagram socket on one interface for one EtherType: what ARP ([`crate::arp`]) and IPv6
//! neighbour discovery ([`crate::ndp`]) send and listen with. The kernel adds and strips the Ethernet header;
//! the caller gives the destination MAC and reads the source MAC of each received frame.
//!
//! Errors are plain `io::Error`s; the two callers turn them into their own error types with what they were doing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

/// A packet socket bound to `(interface, EtherType)`.
#[derive(Debug)]
pub(crate) struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
    proto_be: u16,
}

/// One classic BPF instruction (`struct sock_filter`).
pub(crate) type BpfInsn = libc::sock_filter;

impl PacketSocket {
    /// Opens a socket that receives only `ethertype` frames of interface `ifindex`. `filter`, if given, is attached
    /// before the socket is bound, so that no frame it rejects is ever queued.
    pub(crate) fn open(ifindex: i32, ethertype: u16, filter: Option<&[BpfInsn]>) -> io::Result<PacketSocket> {
        let proto_be = ethertype.to_be();
        // Protocol 0: receives nothing until bind() below names the protocol and the interface.
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Some(insns) = filter {
            let prog = libc::sock_fprog { len: insns.len() as u16, filter: insns.as_ptr().cast_mut() };
            // SAFETY: `prog` points at `insns`, which outlives the call (the kernel copies the program); the length
            // passed is that of `sock_fprog`.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ATTACH_FILTER,
                    (&prog as *const libc::sock_fprog).cast(),
                    size_of::<libc::sock_fprog>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let sll = sockaddr_ll(ifindex, proto_be, None);
        // SAFETY: `sll` is a valid sockaddr_ll for the duration of the call; the length matches.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket { fd, ifindex, proto_be })
    }

    /// Sends `payload` (the frame's contents after the Ethernet header) to `dst`.
    pub(crate) fn send(&self, dst: [u8; 6], payload: &[u8]) -> io::Result<()> {
        let sll = sockaddr_ll(self.ifindex, self.proto_be, Some(dst));
        // SAFETY: `payload` and `sll` are valid for their lengths for the duration of the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                payload.as_ptr().cast(),
                payload.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives incoming frames (not our own outgoing ones) until `deadline`, giving each payload and its source MAC
    /// to `f`; returns the first `Some` that `f` returns, or `None` at the deadline.
    pub(crate) fn watch<T>(
        &self,
        deadline: Instant,
        mut f: impl FnMut(&[u8], [u8; 6]) -> Option<T>,
    ) -> io::Result<Option<T>> {
        let mut buf = [0u8; 2048];
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
                return Err(e);
            }
            if r == 0 {
                continue;
            }
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
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
                return Err(e);
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING || from.sll_ifindex != self.ifindex || from.sll_halen != 6 {
                continue;
            }
            let mut src = [0u8; 6];
            src.copy_from_slice(&from.sll_addr[..6]);
            if let Some(t) = f(&buf[..(n as usize).min(buf.len())], src) {
                return Ok(Some(t));
            }
        }
    }
}

fn sockaddr_ll(ifindex: i32, proto_be: u16, dst: Option<[u8; 6]>) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
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
