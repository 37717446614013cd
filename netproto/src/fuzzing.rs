//! Entry points of the fuzz targets in `fuzz/` and the generator of their seed corpus.
//!
//! Each entry point takes arbitrary bytes and must never panic (except on a violated round-trip property, which
//! is a bug). They are run by cargo-fuzz and, over the seed corpus plus random and mutated inputs, by this
//! crate's tests.

use std::io::{Read, Write};

use bytes::{Bytes, BytesMut};

use crate::conn::{Connection, Role};
use crate::frame::{self, AeadKey, Direction, EncodedFrame, Header, MacKey};
use crate::handshake::HandshakeOptions;
use crate::key::{Key, KeySet};
use crate::message::*;

/// The key the handshake target uses (both sides' current key).
pub const FUZZ_KEY: Key = Key([0x42; 32]);
/// The server's next key in the handshake target (a rotation only the server has started).
pub const FUZZ_NEXT_KEY: Key = Key([0x43; 32]);
/// The session key of the frame target's MAC and AEAD keys.
const FRAME_SESSION: [u8; 32] = [0x17; 32];
const CLIENT_NONCE: [u8; 32] = [0xc1; 32];
const SERVER_NONCE: [u8; 32] = [0x5e; 32];

/// A stream that reads the fuzz input in chunks of varying size and discards what is written.
struct FuzzStream<'a> {
    input: &'a [u8],
    pos: usize,
    chunk: usize,
}

impl Read for FuzzStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.input.len() - self.pos).min(self.chunk);
        buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        // Vary the chunk size so frames get split at many places.
        self.chunk = self.chunk % 4093 * 7 + 1;
        Ok(n)
    }
}

impl Write for FuzzStream<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn check_round_trip(m: &Message) {
    let (mut head, body) = m.encode(None).expect("a decoded message must encode");
    head.extend_from_slice(&body);
    let back = Message::decode(m.frame_type(), Bytes::from(head)).expect("an encoded message must decode");
    assert_eq!(&back, m, "decode(encode(m)) != m");
}

/// The frame decoder: two-phase decoding of back-to-back frames (without a session key, with a MAC key and with an
/// encryption key, at the sequence number each header claims), message decoding with a round-trip check, and a
/// connection reading the input as a stream.
pub fn frame(data: &[u8]) {
    let key = MacKey::new(FRAME_SESSION, Direction::ToServer);
    let sealing = AeadKey::new(FRAME_SESSION, Direction::ToServer);
    let mut buf = data;
    while let Ok(Some(n)) = frame::check(buf) {
        let h = Header::decode(buf).expect("checked").expect("complete");
        let f = Bytes::copy_from_slice(&buf[..n]);
        let mut decoded = Vec::new();
        for k in [None, Some(&key)] {
            decoded.push(frame::parse(f.clone(), h.seq, k));
        }
        decoded.push(frame::open(BytesMut::from(&buf[..n]), h.seq, &sealing));
        for (h2, payload) in decoded.into_iter().flatten() {
            assert_eq!(h, h2);
            if let Ok(m) = Message::decode(h.ty, payload) {
                check_round_trip(&m);
            }
        }
        buf = &buf[n..];
    }
    let chunk = data.first().map_or(1, |&b| b as usize + 1);
    let mut conn = Connection::new_unauthenticated(FuzzStream { input: data, pos: 0, chunk }, Role::Server);
    while let Ok(Some(m)) = conn.recv() {
        check_round_trip(&m);
    }
}

/// The handshake: the first byte picks the role (bit 0 clear: this node is the server, set: the client) and the
/// encryption setting (bit 1 set: `aead`), the rest is what the peer sends. The server holds [`FUZZ_KEY`] and, as a
/// next key, [`FUZZ_NEXT_KEY`]; the client holds [`FUZZ_KEY`]. After a successful handshake, messages are received
/// (decrypted, with `aead`) until the input ends or fails.
pub fn handshake(data: &[u8]) {
    let _ = handshake_session(data);
}

/// [`handshake`], returning how many messages were received after a successful handshake (`None`: the
/// handshake failed).
pub fn handshake_session(data: &[u8]) -> Option<usize> {
    let (&sel, rest) = data.split_first()?;
    let stream = FuzzStream { input: rest, pos: 0, chunk: (sel >> 2) as usize + 1 };
    let enc = if sel & 2 == 0 { Encryption::None } else { Encryption::Aead };
    let conn = if sel & 1 == 0 {
        let opts = HandshakeOptions::new("fuzz-standby").fixed_nonce(SERVER_NONCE).encryption(enc);
        crate::conn::server_handshake(stream, &KeySet::with_next(FUZZ_KEY, FUZZ_NEXT_KEY), &opts)
    } else {
        let opts = HandshakeOptions::new("fuzz-primary").fixed_nonce(CLIENT_NONCE).encryption(enc);
        crate::conn::client_handshake(stream, &FUZZ_KEY, &opts)
    };
    let mut conn = conn.ok()?;
    let mut n = 0;
    while let Ok(Some(m)) = conn.recv() {
        check_round_trip(&m);
        n += 1;
    }
    Some(n)
}

/// One message of every type (extents: raw, compressible, zero).
pub fn sample_messages() -> Vec<Message> {
    let text: Vec<u8> = b"blockrep ships changed extents. ".iter().cycle().take(8192).copied().collect();
    let noise: Vec<u8> = (0u32..4096).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    vec![
        Message::Hello(Hello { min_version: 1, max_version: 1, node: "primary".into(), nonce: [1; 32] }),
        Message::HelloAck(HelloAck {
            version: 1,
            min_version: 1,
            max_version: 1,
            node: "standby".into(),
            nonce: [2; 32],
        }),
        Message::Auth(Auth { encryption: Encryption::Aead, proofs: vec![[3; 32], [13; 32]] }),
        Message::AuthOk([4; 32]),
        Message::Error(ErrorMsg { code: code::REFUSED, message: "extent past the end of the shadow".into() }),
        Message::OpenVolume(OpenVolume { name: "data".into(), source_size: 1 << 30, block_size: 65536 }),
        Message::VolumeInfo(TargetInfo {
            volume_size: 1 << 30,
            generation: 7,
            block_size: 65536,
            root: Some([5; 32]),
            complete: true,
            pending: Some(PendingInfo { generation: 8, base_generation: 7, bytes: 4096, end_offset: 65536 }),
            generation_id: Some([9; 16]),
            trusted: false,
            distrust: "the shadow was promoted on node b".into(),
            history: vec![link::GenRecord { generation: 6, id: [10; 16], time: 1_700_000_000, node: "a".into() }],
        }),
        Message::Begin(BeginPlan {
            generation: 8,
            base_generation: 7,
            volume_size: 1 << 30,
            block_size: 65536,
            resume: true,
            mode: link::PlanMode::Compare,
            id: [11; 16],
        }),
        Message::BeginAck(BeginAck { resumed: true, in_place: false }),
        Message::BlockHashesReq { first: 16, count: 4 },
        Message::BlockHashes(vec![[6; 32], [7; 32]]),
        Message::SubHashesReq(vec![1, 5, 9]),
        Message::SubHashes(vec![[8; 32]; 3]),
        Message::Extent(Extent { offset: 4096, len: 4096, data: ExtentData::Data(Bytes::from(noise)) }),
        Message::Extent(Extent { offset: 65536, len: 8192, data: ExtentData::Data(Bytes::from(text)) }),
        Message::Extent(Extent { offset: 1 << 20, len: 1 << 20, data: ExtentData::Zero }),
        Message::Commit([9; 32]),
        Message::CommitAck(CommitAck { generation: 8, root: [9; 32] }),
        Message::Bye,
        Message::RoleReq,
        Message::RoleInfo(crate::message::RoleInfo { role: 2, node: "alpha".into() }),
        Message::DemoteReq("switchover".into()),
        Message::DemoteDone,
        Message::FinalSynced(vec![crate::message::Committed { volume: "vol".into(), generation: 9, id: [12; 16] }]),
        Message::DemoteConfirm,
    ]
}

/// A stream wrapper that records everything written.
struct Recorder<S> {
    inner: S,
    log: Vec<u8>,
}

impl<S: Read> Read for Recorder<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<S: Write> Write for Recorder<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.log.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The seed corpus: `(target, file name, content)`. Frame seeds are real encoded frames (one per message type,
/// with and without MAC, encrypted, zstd-compressed extents, a stream of several); handshake seeds are the bytes
/// each side of a real session (fixed nonces, [`FUZZ_KEY`], with and without encryption) wrote, so they replay
/// through [`handshake`] up to the MAC'd or encrypted messages.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let key = MacKey::new(FRAME_SESSION, Direction::ToServer);
    let sealing = AeadKey::new(FRAME_SESSION, Direction::ToServer);
    let mut z = ExtentCompressor::new(3).expect("zstd level 3");
    let mut stream = Vec::new();
    for (i, m) in sample_messages().iter().enumerate() {
        let (head, body) = m.encode(Some(&mut z)).expect("sample messages encode");
        let plain = EncodedFrame::new(1, m.frame_type(), i as u64, head.clone(), body.clone(), None).to_vec();
        let maced = EncodedFrame::new(1, m.frame_type(), 0, head.clone(), body.clone(), Some(&key)).to_vec();
        let sealed = EncodedFrame::sealed(crate::frame::MAX_VERSION, m.frame_type(), 0, head, body, &sealing).to_vec();
        let name = m.frame_type().name().to_lowercase();
        stream.extend_from_slice(&plain);
        out.push(("frame", format!("{i:02}-{name}"), plain));
        out.push(("frame", format!("{i:02}-{name}-mac"), maced));
        out.push(("frame", format!("{i:02}-{name}-aead"), sealed));
    }
    out.push(("frame", "stream".into(), stream));
    for enc in [Encryption::None, Encryption::Aead] {
        let (client_log, server_log) = seed_session(enc);
        let suffix = if enc == Encryption::Aead { "-aead" } else { "" };
        let aead_bit = if enc == Encryption::Aead { 2 } else { 0 };
        let mut s = vec![aead_bit];
        s.extend_from_slice(&client_log);
        out.push(("handshake", format!("server-full-session{suffix}"), s));
        let mut c = vec![1 | aead_bit];
        c.extend_from_slice(&server_log);
        out.push(("handshake", format!("client-full-session{suffix}"), c));
    }
    out
}

/// A real session over a socket pair with fixed nonces: what the client wrote, and what the server wrote.
fn seed_session(enc: Encryption) -> (Vec<u8>, Vec<u8>) {
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let server = std::thread::spawn(move || {
        let opts = HandshakeOptions::new("fuzz-standby").fixed_nonce(SERVER_NONCE).encryption(enc);
        let keys = KeySet::with_next(FUZZ_KEY, FUZZ_NEXT_KEY);
        let mut conn = crate::conn::server_handshake(Recorder { inner: b, log: Vec::new() }, &keys, &opts)
            .expect("seed session: server handshake");
        for m in sample_messages().iter().filter(|m| matches!(m, Message::VolumeInfo(_) | Message::BeginAck(_))) {
            conn.send(m).expect("seed session: server send");
        }
        while conn.recv().expect("seed session: server recv").is_some() {}
        conn.get_ref().log.clone()
    });
    let opts = HandshakeOptions::new("fuzz-primary").fixed_nonce(CLIENT_NONCE).encryption(enc);
    let mut conn = crate::conn::client_handshake(Recorder { inner: a, log: Vec::new() }, &FUZZ_KEY, &opts)
        .expect("seed session: client handshake");
    conn.set_compression(Some(3)).expect("zstd level 3");
    for m in sample_messages().iter().skip(5) {
        conn.send(m).expect("seed session: client send");
    }
    conn.get_ref().inner.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let client_log = conn.get_ref().log.clone();
    let server_log = server.join().expect("seed session: server thread");
    (client_log, server_log)
}
