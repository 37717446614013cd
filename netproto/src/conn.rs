//! A blocking connection: framed, authenticated messages over a byte stream (a `TcpStream` in production).
//!
//! Reading buffers the stream and decodes in two phases ([`crate::frame::check`], then
//! [`crate::frame::parse`]); a clean end of stream between frames is `Ok(None)`, an end inside a frame is
//! [`ConnError::ClosedMidFrame`]. Sending writes header, payload and MAC with vectored writes, so the data of an
//! extent (a shared `Bytes`) goes from the caller's buffer to the socket without being copied into a frame.

use std::io::{IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::frame::{self, AeadKey, Direction, EncodedFrame, FrameError, FrameType, Header, MacKey, HEADER_LEN};
use crate::handshake::{self, HandshakeError, HandshakeOptions};
use crate::key::{KeySet, KeySlot, KeyStore};
use crate::message::{Encryption, ErrorMsg, ExtentCompressor, ExtentData, Message, MessageError};

/// How much to read at least per `read` call.
const READ_CHUNK: usize = 256 * 1024;
/// Unanswered TCP keepalive probes before the kernel drops a connection ([`Connection::set_tcp_keepalive`]).
pub const KEEPALIVE_PROBES: u32 = 3;
/// Default time a handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Which end of the connection this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The primary, which connects.
    Client,
    /// The standby, which accepts.
    Server,
}

/// Errors of a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The peer could not be reached (distinct, so the CLI can give it its own exit code).
    #[error("cannot connect to the peer at {addr}; check that `blockrep serve` runs there and that the address and port in the configuration are right")]
    Unreachable {
        /// The address as given.
        addr: String,
        /// The last connect error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("{op} the peer failed")]
    Io {
        /// "reading from" or "writing to".
        op: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Setting socket options failed.
    #[error("configuring the TCP socket failed")]
    Socket(#[source] std::io::Error),
    /// The peer did not answer in time.
    #[error("{op} the peer timed out; check the network and the peer's log")]
    Timeout {
        /// "reading from" or "writing to".
        op: &'static str,
    },
    /// End of stream inside a frame.
    #[error("peer closed the connection mid-frame ({have} bytes of an unfinished frame received)")]
    ClosedMidFrame {
        /// Bytes of the partial frame.
        have: usize,
    },
    /// End of stream where a message was required.
    #[error("peer closed the connection while this node waited for {waiting_for}; see the peer's log")]
    Closed {
        /// What was expected.
        waiting_for: &'static str,
    },
    /// A frame was malformed, altered, replayed or forged.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A message was malformed.
    #[error(transparent)]
    Message(#[from] MessageError),
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The peer sent a message that is not allowed here.
    #[error("protocol violation: expected {expected}, the peer sent {got}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// The frame type received.
        got: FrameType,
    },
    /// The peer reported an error.
    #[error("the peer reported: {message}")]
    Remote {
        /// Error code (see [`crate::message::code`]).
        code: u16,
        /// The peer's message.
        message: String,
    },
    /// An earlier error left the stream in an unknown state.
    #[error("the connection is unusable after an earlier error; reconnect")]
    Broken,
}

/// Counters of one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes written to the socket (all frames, including the handshake).
    pub bytes_sent: u64,
    /// Bytes read from the socket.
    pub bytes_received: u64,
    /// Frames sent.
    pub frames_sent: u64,
    /// Frames received.
    pub frames_received: u64,
    /// Data bytes of the data extents sent (before compression).
    pub extent_bytes_sent: u64,
    /// Payload bytes of those extents on the wire (after compression).
    pub extent_wire_bytes_sent: u64,
}

/// A simple token bucket capping the send rate.
#[derive(Debug)]
struct Limiter {
    rate: f64,
    burst: f64,
    allowance: f64,
    last: Instant,
}

impl Limiter {
    fn new(rate: u64) -> Limiter {
        let rate = rate.max(1) as f64;
        let burst = (rate / 10.0).max(64.0 * 1024.0);
        Limiter { rate, burst, allowance: burst, last: Instant::now() }
    }

    fn take(&mut self, n: usize) {
        let now = Instant::now();
        self.allowance = (self.allowance + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        self.allowance -= n as f64;
        if self.allowance < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.allowance / self.rate));
        }
    }
}

/// How the frames of one direction are protected once the session key exists.
#[derive(Debug, Clone)]
pub(crate) enum FrameKey {
    /// A MAC per frame; the payload in clear.
    Mac(MacKey),
    /// The payload encrypted, with a tag per frame.
    Aead(AeadKey),
}

impl FrameKey {
    fn new(session: [u8; 32], dir: Direction, e: Encryption) -> FrameKey {
        match e {
            Encryption::None => FrameKey::Mac(MacKey::new(session, dir)),
            Encryption::Aead => FrameKey::Aead(AeadKey::new(session, dir)),
        }
    }
}

/// The sending state of a connection: sequence number, MAC key, compressor, rate cap.
#[derive(Debug)]
struct Tx {
    seq: u64,
    key: Option<FrameKey>,
    compressor: Option<ExtentCompressor>,
    limiter: Option<Limiter>,
    /// The buffer encrypted frames are sealed in, kept between frames (a fresh 1 MiB buffer per extent would cost
    /// its page faults every time).
    seal_buf: Vec<u8>,
}

impl Tx {
    /// Encodes `msg` as the next frame and writes it to `w`, counting into `stats`.
    fn send<W: Write>(&mut self, w: &mut W, version: u16, stats: &mut Stats, msg: &Message) -> Result<(), ConnError> {
        let (head, body) = msg.encode(self.compressor.as_mut())?;
        if let Message::Extent(e) = msg {
            if let ExtentData::Data(d) = &e.data {
                stats.extent_bytes_sent += d.len() as u64;
                stats.extent_wire_bytes_sent += body.len() as u64;
            }
        }
        let f = match &self.key {
            Some(FrameKey::Aead(k)) => {
                let mut buf = std::mem::take(&mut self.seal_buf);
                buf.clear();
                buf.extend_from_slice(&head);
                buf.extend_from_slice(&body);
                EncodedFrame::sealed(version, msg.frame_type(), self.seq, buf, Bytes::new(), k)
            }
            Some(FrameKey::Mac(k)) => EncodedFrame::new(version, msg.frame_type(), self.seq, head, body, Some(k)),
            None => EncodedFrame::new(version, msg.frame_type(), self.seq, head, body, None),
        };
        self.seq += 1;
        if let Some(l) = &mut self.limiter {
            l.take(f.len());
        }
        let r = write_frame(w, stats, &f);
        if matches!(self.key, Some(FrameKey::Aead(_))) {
            self.seal_buf = f.head;
        }
        r
    }
}

fn write_frame<W: Write>(w: &mut W, stats: &mut Stats, f: &EncodedFrame) -> Result<(), ConnError> {
    let mut slices = f.io_slices();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(io_error("writing to", std::io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                stats.bytes_sent += n as u64;
                IoSlice::advance_slices(&mut rest, n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error("writing to", e)),
        }
    }
    stats.frames_sent += 1;
    Ok(())
}

/// The sending half of a connection split with [`Connection::split_sender`]: it writes frames to a second handle
/// of the same stream (so one thread can send while another receives), and goes back with
/// [`Connection::rejoin_sender`].
#[derive(Debug)]
pub struct FrameSender<W> {
    stream: W,
    version: u16,
    tx: Tx,
    stats: Stats,
    broken: bool,
}

impl<W: Write> FrameSender<W> {
    /// Sends one message (see [`Connection::send`]; a failed write is returned as is: the receiving half is the
    /// one that can read why the peer closed).
    pub fn send(&mut self, msg: &Message) -> Result<(), ConnError> {
        if self.broken {
            return Err(ConnError::Broken);
        }
        let r = self.tx.send(&mut self.stream, self.version, &mut self.stats, msg);
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// The stream it writes to.
    pub fn get_ref(&self) -> &W {
        &self.stream
    }
}

/// A framed, authenticated connection over the byte stream `S`.
pub struct Connection<S = TcpStream> {
    stream: S,
    role: Role,
    rbuf: BytesMut,
    filled: usize,
    version: u16,
    /// `None` while split off ([`Connection::split_sender`]).
    tx: Option<Tx>,
    recv_seq: u64,
    recv_key: Option<FrameKey>,
    stats: Stats,
    peer_node: String,
    broken: bool,
    encryption: Encryption,
    key_slot: KeySlot,
    /// What finishing a key rotation in the handshake did (see [`Connection::rotation`]).
    pub(crate) rotation: Option<Result<bool, String>>,
}

impl<S> std::fmt::Debug for Connection<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("role", &self.role)
            .field("version", &self.version)
            .field("peer_node", &self.peer_node)
            .field("authenticated", &self.recv_key.is_some())
            .field("encryption", &self.encryption)
            .field("key_slot", &self.key_slot)
            .field("send_seq", &self.tx.as_ref().map(|t| t.seq))
            .field("recv_seq", &self.recv_seq)
            .field("buffered", &self.filled)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn io_error(op: &'static str, source: std::io::Error) -> ConnError {
    match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ConnError::Timeout { op },
        _ => ConnError::Io { op, source },
    }
}

impl<S: Read + Write> Connection<S> {
    /// A connection before the handshake (no session key yet).
    pub(crate) fn new_unauthenticated(stream: S, role: Role) -> Self {
        Connection {
            stream,
            role,
            rbuf: BytesMut::new(),
            filled: 0,
            version: frame::NEGOTIATION_VERSION,
            tx: Some(Tx { seq: 0, key: None, compressor: None, limiter: None, seal_buf: Vec::new() }),
            recv_seq: 0,
            recv_key: None,
            stats: Stats::default(),
            peer_node: String::new(),
            broken: false,
            encryption: Encryption::None,
            key_slot: KeySlot::Current,
            rotation: None,
        }
    }

    /// Switches to the negotiated version and the session key (end of the handshake): frames are MAC'd, or
    /// encrypted with `encryption = aead`.
    pub(crate) fn establish(
        &mut self,
        version: u16,
        session: [u8; 32],
        peer_node: String,
        encryption: Encryption,
        key_slot: KeySlot,
    ) {
        let (send, recv) = match self.role {
            Role::Client => (Direction::ToServer, Direction::ToClient),
            Role::Server => (Direction::ToClient, Direction::ToServer),
        };
        self.version = version;
        if let Some(tx) = &mut self.tx {
            tx.key = Some(FrameKey::new(session, send, encryption));
        }
        self.recv_key = Some(FrameKey::new(session, recv, encryption));
        self.peer_node = peer_node;
        self.encryption = encryption;
        self.key_slot = key_slot;
    }

    /// Switches the sending half alone to the session key (a client that sends its first request behind `Auth`,
    /// before the standby's proof arrived: [`client_handshake_then`]); [`Connection::establish`] follows once the
    /// standby proved the key.
    pub(crate) fn establish_send(&mut self, version: u16, session: [u8; 32], encryption: Encryption) {
        let dir = match self.role {
            Role::Client => Direction::ToServer,
            Role::Server => Direction::ToClient,
        };
        self.version = version;
        if let Some(tx) = &mut self.tx {
            tx.key = Some(FrameKey::new(session, dir, encryption));
        }
    }

    /// Sends one message and returns a failed write as it is, without reading the peer's reason or marking the
    /// connection unusable (the handshake's pipelined request: the peer may have closed after refusing `Auth`,
    /// and its refusal is read next).
    pub(crate) fn send_unchecked(&mut self, msg: &Message) -> Result<(), ConnError> {
        let Some(tx) = &mut self.tx else { return Err(ConnError::Broken) };
        tx.send(&mut self.stream, self.version, &mut self.stats, msg)
    }

    /// Whether the session is encrypted.
    pub fn encryption(&self) -> Encryption {
        self.encryption
    }

    /// Which of this node's keys the session runs under ([`KeySlot::Next`]: the peer proved the next key of a
    /// rotation in progress).
    pub fn key_slot(&self) -> KeySlot {
        self.key_slot
    }

    /// When the peer proved this node's next key: whether the handshake finished the rotation on disk
    /// (`Ok(true)`), found it already finished (`Ok(false)`), or failed (the error, also logged).
    pub fn rotation(&self) -> Option<&Result<bool, String>> {
        self.rotation.as_ref()
    }

    pub(crate) fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    /// Compress data extents with zstd at `level` (when it pays), or send them raw (`None`).
    pub fn set_compression(&mut self, level: Option<i32>) -> Result<(), ConnError> {
        let c = level.map(ExtentCompressor::new).transpose()?;
        if let Some(tx) = &mut self.tx {
            tx.compressor = c;
        }
        Ok(())
    }

    /// Caps the send rate at `bytes_per_sec` (`None`: unlimited).
    pub fn set_bwlimit(&mut self, bytes_per_sec: Option<u64>) {
        if let Some(tx) = &mut self.tx {
            tx.limiter = bytes_per_sec.map(Limiter::new);
        }
    }

    /// Splits off the sending half, which writes to `writer` (a second handle of this connection's stream, such as
    /// `TcpStream::try_clone`): one thread can then send with it while another receives with this connection.
    /// Until [`Connection::rejoin_sender`], [`Connection::send`] fails with [`ConnError::Broken`]. `None` when the
    /// sending half is already split off.
    pub fn split_sender<W: Write>(&mut self, writer: W) -> Option<FrameSender<W>> {
        let tx = self.tx.take()?;
        Some(FrameSender { stream: writer, version: self.version, tx, stats: Stats::default(), broken: self.broken })
    }

    /// Takes the sending half back (its counters are added to this connection's).
    pub fn rejoin_sender<W>(&mut self, s: FrameSender<W>) {
        self.stats.bytes_sent += s.stats.bytes_sent;
        self.stats.frames_sent += s.stats.frames_sent;
        self.stats.extent_bytes_sent += s.stats.extent_bytes_sent;
        self.stats.extent_wire_bytes_sent += s.stats.extent_wire_bytes_sent;
        self.broken |= s.broken;
        self.tx = Some(s.tx);
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The peer's node name from the handshake.
    pub fn peer_node(&self) -> &str {
        &self.peer_node
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Sends one message. Data extents are compressed if compression is on and it pays; their data is written
    /// from the caller's `Bytes` without a copy when sent raw. If the peer closed the connection after sending an
    /// Error message, the error is [`ConnError::Remote`] with the peer's reason.
    pub fn send(&mut self, msg: &Message) -> Result<(), ConnError> {
        if self.broken {
            return Err(ConnError::Broken);
        }
        let Some(tx) = &mut self.tx else { return Err(ConnError::Broken) };
        let r = tx.send(&mut self.stream, self.version, &mut self.stats, msg);
        if let Err(e) = r {
            self.broken = true;
            return Err(self.peer_reason(e));
        }
        Ok(())
    }

    /// After a failed write: if the peer closed the connection, it may have said why first (an extent outside
    /// the shadow, disk full). Its Error message explains more than "connection reset", so return that.
    fn peer_reason(&mut self, e: ConnError) -> ConnError {
        let closed = matches!(&e, ConnError::Io { source, .. } if matches!(source.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted));
        if !closed {
            return e;
        }
        // The peer is gone, so these reads end at its last byte and cannot block.
        for _ in 0..16 {
            match self.recv_inner() {
                Ok(Some(Message::Error(m))) => return ConnError::Remote { code: m.code, message: m.message },
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        e
    }

    /// Sends an error message (best effort: a failure to send is ignored, the caller is about to drop the
    /// connection anyway). It is sent even after a receive error (a frame that failed its checks), which leaves the
    /// sending half intact.
    pub fn send_error(&mut self, code: u16, message: &str) {
        let mut message = message.to_owned();
        if message.len() > crate::message::MAX_ERROR_LEN {
            let mut cut = crate::message::MAX_ERROR_LEN;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let Some(tx) = &mut self.tx else { return };
        let msg = Message::Error(ErrorMsg { code, message });
        if tx.send(&mut self.stream, self.version, &mut self.stats, &msg).is_err() {
            self.broken = true;
        }
    }

    /// Receives the next message; `Ok(None)` when the peer closed the connection cleanly between frames.
    /// Any error leaves the connection unusable (drop it).
    pub fn recv(&mut self) -> Result<Option<Message>, ConnError> {
        if self.broken {
            return Err(ConnError::Broken);
        }
        let r = self.recv_inner();
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    fn recv_inner(&mut self) -> Result<Option<Message>, ConnError> {
        let Some(raw) = self.read_frame()? else { return Ok(None) };
        let (h, payload) = match &self.recv_key {
            Some(FrameKey::Aead(k)) => frame::open(raw, self.recv_seq, k)?,
            Some(FrameKey::Mac(k)) => frame::parse(raw.freeze(), self.recv_seq, Some(k))?,
            None => frame::parse(raw.freeze(), self.recv_seq, None)?,
        };
        self.recv_seq += 1;
        self.stats.frames_received += 1;
        if h.version != self.version {
            return Err(FrameError::VersionChanged { expected: self.version, found: h.version }.into());
        }
        Ok(Some(Message::decode(h.ty, payload)?))
    }

    /// Receives the next message, which must exist: a clean close is [`ConnError::Closed`] naming
    /// `waiting_for`, and an [`Message::Error`] from the peer is [`ConnError::Remote`] (which ends the session).
    pub fn recv_expect(&mut self, waiting_for: &'static str) -> Result<Message, ConnError> {
        match self.recv()? {
            None => Err(ConnError::Closed { waiting_for }),
            Some(Message::Error(e)) => {
                // An error ends the session: the peer closes after sending it.
                self.broken = true;
                Err(ConnError::Remote { code: e.code, message: e.message })
            }
            Some(m) => Ok(m),
        }
    }

    /// Reads one complete frame from the stream (`Ok(None)` at a clean end of stream).
    fn read_frame(&mut self) -> Result<Option<BytesMut>, ConnError> {
        // Before the peer proved the key, frames are small and so are reads: an unauthenticated peer cannot make
        // this node buffer more than one handshake frame.
        let authenticated = self.recv_key.is_some();
        let (max_payload, chunk) = if authenticated {
            (frame::MAX_PAYLOAD, READ_CHUNK)
        } else {
            (frame::MAX_HANDSHAKE_PAYLOAD, HEADER_LEN + frame::MAX_HANDSHAKE_PAYLOAD + frame::MAC_LEN)
        };
        loop {
            if let Some(len) = frame::check_limited(&self.rbuf[..self.filled], max_payload)? {
                let f = self.rbuf.split_to(len);
                self.filled -= len;
                return Ok(Some(f));
            }
            // Read the rest of this frame in one go if its header is here, else at least a chunk. The buffer
            // beyond `filled` is kept zeroed so each byte is initialised once.
            let need = match Header::decode(&self.rbuf[..self.filled])? {
                Some(h) => h.frame_len() - self.filled,
                None => HEADER_LEN - self.filled,
            };
            let want = self.filled + need.max(chunk);
            if self.rbuf.len() < want {
                self.rbuf.resize(want, 0);
            }
            let n = loop {
                match self.stream.read(&mut self.rbuf[self.filled..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_error("reading from", e)),
                }
            };
            if n == 0 {
                if self.filled == 0 {
                    return Ok(None);
                }
                return Err(ConnError::ClosedMidFrame { have: self.filled });
            }
            self.filled += n;
            self.stats.bytes_received += n as u64;
        }
    }
}

impl Connection<TcpStream> {
    /// Sets the read and write timeout of the socket (`None`: wait forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ConnError> {
        self.stream.set_read_timeout(timeout).map_err(ConnError::Socket)?;
        self.stream.set_write_timeout(timeout).map_err(ConnError::Socket)
    }

    /// Turns on TCP keepalive so that a peer that vanished without a reset (power loss, network split) is noticed
    /// within about `within`: the first probe after half of it without traffic, then [`KEEPALIVE_PROBES`] probes
    /// spread over the other half.
    pub fn set_tcp_keepalive(&self, within: Duration) -> Result<(), ConnError> {
        let half = (within / 2).max(Duration::from_secs(1));
        let interval = (half / KEEPALIVE_PROBES).max(Duration::from_secs(1));
        let ka = socket2::TcpKeepalive::new().with_time(half).with_interval(interval).with_retries(KEEPALIVE_PROBES);
        socket2::SockRef::from(&self.stream).set_tcp_keepalive(&ka).map_err(ConnError::Socket)
    }
}

/// Connects to the standby at `addr` ("host:port"), runs the handshake as client with node name `node` and `keys` (a
/// [`KeySet`], or one `&Key`), and
/// returns the authenticated connection. `timeout` bounds the connect and the handshake; afterwards the socket
/// has no timeout (set one with [`Connection::set_timeout`]).
pub fn connect(addr: &str, keys: impl Into<KeySet>, node: &str, timeout: Duration) -> Result<Connection, ConnError> {
    connect_with(addr, keys, &HandshakeOptions::new(node), timeout)
}

/// [`connect`] with explicit handshake options.
pub fn connect_with(
    addr: &str,
    keys: impl Into<KeySet>,
    opts: &HandshakeOptions,
    timeout: Duration,
) -> Result<Connection, ConnError> {
    let stream = connect_stream(addr, timeout)?;
    let conn = client_handshake(stream, keys, opts)?;
    conn.set_timeout(None)?;
    Ok(conn)
}

/// A TCP connection to `addr` with Nagle off (every frame leaves at once) and `timeout` on reads and writes
/// until the handshake is done.
fn connect_stream(addr: &str, timeout: Duration) -> Result<TcpStream, ConnError> {
    let unreachable = |source| ConnError::Unreachable { addr: addr.to_owned(), source };
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the address resolves to nothing");
    let mut stream = None;
    for a in addr.to_socket_addrs().map_err(unreachable)? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let stream = stream.ok_or_else(|| unreachable(last))?;
    stream.set_nodelay(true).map_err(ConnError::Socket)?;
    stream.set_read_timeout(Some(timeout)).map_err(ConnError::Socket)?;
    stream.set_write_timeout(Some(timeout)).map_err(ConnError::Socket)?;
    Ok(stream)
}

/// Runs the server side of the handshake on an accepted socket (within [`HANDSHAKE_TIMEOUT`]). On a wrong key
/// or version the client is told why before the error is returned.
/// `keys`: a [`KeySet`], or a [`crate::KeyFile`] read again for each handshake.
pub fn accept_handshake(stream: TcpStream, keys: &dyn KeyStore, node: &str) -> Result<Connection, ConnError> {
    accept_handshake_with(stream, keys, &HandshakeOptions::new(node))
}

/// [`accept_handshake`] with explicit handshake options.
pub fn accept_handshake_with(
    stream: TcpStream,
    keys: &dyn KeyStore,
    opts: &HandshakeOptions,
) -> Result<Connection, ConnError> {
    stream.set_nodelay(true).map_err(ConnError::Socket)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(ConnError::Socket)?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(ConnError::Socket)?;
    let conn = server_handshake(stream, keys, opts)?;
    conn.set_timeout(None)?;
    Ok(conn)
}

/// Runs the client side of the handshake over any byte stream.
pub fn client_handshake<S: Read + Write>(
    stream: S,
    keys: impl Into<KeySet>,
    opts: &HandshakeOptions,
) -> Result<Connection<S>, ConnError> {
    let mut conn = Connection::new_unauthenticated(stream, Role::Client);
    handshake::run_client_then(&mut conn, &keys.into(), opts, None)?;
    Ok(conn)
}

/// [`client_handshake`], then sends `first`, the session's first request, without waiting for the standby's
/// proof when it can (this node holds one key, so the session key is known once `HelloAck` is in): `first`
/// travels behind `Auth`, and its answer comes right behind `AuthOk`, one round trip earlier. During a key
/// rotation (two keys) it is sent after `AuthOk`. Its answer is left for the caller to receive. The standby
/// reads it only after it verified `Auth`, so nothing changes on the wire but the timing.
pub fn client_handshake_then<S: Read + Write>(
    stream: S,
    keys: impl Into<KeySet>,
    opts: &HandshakeOptions,
    first: &Message,
) -> Result<Connection<S>, ConnError> {
    let mut conn = Connection::new_unauthenticated(stream, Role::Client);
    handshake::run_client_then(&mut conn, &keys.into(), opts, Some(first))?;
    Ok(conn)
}

/// [`connect_with`], then sends `first` as [`client_handshake_then`] does (behind `Auth` when this node holds
/// one key); the caller receives its answer.
pub fn connect_then(
    addr: &str,
    keys: impl Into<KeySet>,
    opts: &HandshakeOptions,
    timeout: Duration,
    first: &Message,
) -> Result<Connection, ConnError> {
    let stream = connect_stream(addr, timeout)?;
    let conn = client_handshake_then(stream, keys, opts, first)?;
    conn.set_timeout(None)?;
    Ok(conn)
}

/// Runs the server side of the handshake over any byte stream.
pub fn server_handshake<S: Read + Write>(
    stream: S,
    keys: &dyn KeyStore,
    opts: &HandshakeOptions,
) -> Result<Connection<S>, ConnError> {
    let mut conn = Connection::new_unauthenticated(stream, Role::Server);
    handshake::run_server(&mut conn, keys, opts)?;
    Ok(conn)
}
