//! Both ends of the link over 127.0.0.1: `RemoteTarget` (client) against `serve_session` (server) driving a
//! small in-memory target, so the session's vocabulary crosses the wire without any conversion layer.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use link::{
    BeginAck, BeginPlan, BlockHash, CommitAck, Extent, ExtentData, LinkError, RemoteKind, TargetInfo, TargetLink,
};
use netproto::message::{code, OpenVolume, RoleInfo};
use netproto::{Bytes, Key, Message, Refusal, RemoteTarget, Standby};

const KEY: Key = Key([0x33; 32]);
const TIMEOUT: Duration = Duration::from_secs(20);
const SIZE: u64 = 64 * 1024;

/// A shadow in memory: writes extents straight into a byte vector, hashes with BLAKE3.
#[derive(Debug, Clone)]
struct MemTarget {
    bytes: Arc<Mutex<Vec<u8>>>,
    generation: u64,
}

impl TargetLink for MemTarget {
    fn info(&mut self) -> Result<TargetInfo, LinkError> {
        Ok(TargetInfo {
            volume_size: SIZE,
            generation: self.generation,
            block_size: 4096,
            root: None,
            complete: self.generation > 0,
            pending: None,
            generation_id: Some([self.generation as u8; 16]),
            trusted: true,
            distrust: String::new(),
            history: vec![link::GenRecord { generation: self.generation, id: [1; 16], time: 2, node: "p".into() }],
        })
    }
    fn begin(&mut self, plan: &BeginPlan) -> Result<BeginAck, LinkError> {
        if plan.volume_size != SIZE {
            return Err(LinkError::Refused(format!("size {} is not {SIZE}", plan.volume_size)));
        }
        Ok(BeginAck { resumed: false, in_place: true })
    }
    fn block_hashes(&mut self, first: u64, count: u32) -> Result<Vec<BlockHash>, LinkError> {
        let b = self.bytes.lock().unwrap();
        Ok((first..first + count as u64).map(|i| *blake3::hash(&b[i as usize * 4096..][..4096]).as_bytes()).collect())
    }
    /// One made-up fingerprint per block (a 4096-byte block is one piece): the block's number, so that a test can
    /// tell the answers apart.
    fn sub_hashes(&mut self, blocks: &[u64]) -> Result<Vec<BlockHash>, LinkError> {
        Ok(blocks.iter().map(|&b| [b as u8; 32]).collect())
    }
    fn extent(&mut self, e: Extent) -> Result<(), LinkError> {
        let mut b = self.bytes.lock().unwrap();
        let dst = &mut b[e.offset as usize..][..e.len as usize];
        match e.data {
            ExtentData::Data(d) => dst.copy_from_slice(&d),
            ExtentData::Zero => dst.fill(0),
        }
        Ok(())
    }
    fn commit(&mut self, root: BlockHash) -> Result<CommitAck, LinkError> {
        self.generation += 1;
        Ok(CommitAck { generation: self.generation, root })
    }
}

struct Node {
    target: MemTarget,
}

impl Standby for Node {
    type Target = MemTarget;
    fn open_volume(&self, peer: &str, req: &OpenVolume) -> Result<MemTarget, Refusal> {
        if req.name != "data" || peer != "primary" {
            return Err(Refusal::new(code::UNKNOWN_VOLUME, format!("volume {:?} is not configured", req.name)));
        }
        Ok(self.target.clone())
    }
    fn role(&self) -> Result<RoleInfo, Refusal> {
        Ok(RoleInfo { role: 0, node: "standby".into() })
    }
    fn demote(
        &self,
        _peer: &str,
        _reason: &str,
        _confirm: &mut dyn FnMut(Vec<netproto::message::Committed>) -> Result<(), Refusal>,
    ) -> Result<(), Refusal> {
        Err(Refusal::new(code::REFUSED, "not primary"))
    }
}

fn serve(target: MemTarget) -> (String, thread::JoinHandle<Result<(), netproto::SessionError>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut conn = netproto::accept_handshake(s, &KEY, "standby")?;
        netproto::serve_session(&mut conn, &Node { target })
    });
    (addr, h)
}

#[test]
fn remote_target_drives_a_served_target_and_keepalives_are_accepted() {
    let target = MemTarget { bytes: Arc::new(Mutex::new(vec![0xee; SIZE as usize])), generation: 0 };
    let (addr, server) = serve(target.clone());
    let conn = netproto::connect(&addr, &KEY, "primary", TIMEOUT).unwrap();
    let mut remote = RemoteTarget::open(conn, "data", SIZE, 4096).unwrap();
    assert_eq!(remote.info().unwrap().volume_size, SIZE);
    let plan = BeginPlan {
        generation: 1,
        base_generation: 0,
        volume_size: SIZE,
        block_size: 4096,
        resume: false,
        ..Default::default()
    };
    assert!(remote.begin(&plan).unwrap().in_place);
    let data = Bytes::from(vec![7u8; 8192]);
    remote.extent(Extent { offset: 4096, len: 8192, data: ExtentData::Data(data) }).unwrap();
    remote.keepalive().unwrap(); // quiet for less than the interval: nothing sent
    remote.extent(Extent { offset: 0, len: 4096, data: ExtentData::Zero }).unwrap();
    let hashes = remote.block_hashes(0, 3).unwrap();
    assert_eq!(hashes[0], *blake3::hash(&[0u8; 4096]).as_bytes());
    assert_eq!(hashes[1], *blake3::hash(&[7u8; 4096]).as_bytes());
    let ack = remote.commit([9; 32]).unwrap();
    assert_eq!((ack.generation, ack.root), (1, [9; 32]));
    let sent_before = remote.connection().expect("whole after the commit").stats().frames_sent;
    drop(remote.close());
    server.join().unwrap().unwrap();
    assert!(sent_before >= 6);
    let b = target.bytes.lock().unwrap();
    assert_eq!(&b[..4096], &[0u8; 4096][..]);
    assert_eq!(&b[4096..12288], &[7u8; 8192][..]);
    assert_eq!(&b[12288..], &vec![0xee; SIZE as usize - 12288][..]);
}

#[test]
fn a_keepalive_frame_is_accepted_between_requests() {
    let target = MemTarget { bytes: Arc::new(Mutex::new(vec![0; SIZE as usize])), generation: 0 };
    let (addr, server) = serve(target);
    let mut conn = netproto::connect(&addr, &KEY, "primary", TIMEOUT).unwrap();
    conn.send(&Message::OpenVolume(OpenVolume { name: "data".into(), source_size: SIZE, block_size: 4096 })).unwrap();
    assert!(matches!(conn.recv_expect("info").unwrap(), Message::VolumeInfo(_)));
    conn.send(&Message::Keepalive).unwrap();
    conn.send(&Message::RoleReq).unwrap();
    assert!(matches!(conn.recv_expect("role").unwrap(), Message::RoleInfo(_)));
    conn.send(&Message::Bye).unwrap();
    server.join().unwrap().unwrap();
}

#[test]
fn refusals_keep_their_kind_and_message_on_the_client() {
    let target = MemTarget { bytes: Arc::new(Mutex::new(vec![0; SIZE as usize])), generation: 0 };
    let (addr, server) = serve(target.clone());
    let conn = netproto::connect(&addr, &KEY, "primary", TIMEOUT).unwrap();
    let e = RemoteTarget::open(conn, "nope", SIZE, 4096).unwrap_err();
    match &e {
        LinkError::Remote { kind: RemoteKind::UnknownVolume, message } => assert!(message.contains("\"nope\"")),
        other => panic!("{other:?}"),
    }
    assert!(server.join().unwrap().is_err());

    // A target's own refusal (LinkError::Refused) reaches the client as kind Refused with its message.
    let (addr, server) = serve(target);
    let conn = netproto::connect(&addr, &KEY, "primary", TIMEOUT).unwrap();
    let mut remote = RemoteTarget::open(conn, "data", SIZE, 4096).unwrap();
    let plan = BeginPlan {
        generation: 1,
        base_generation: 0,
        volume_size: SIZE + 1,
        block_size: 4096,
        resume: false,
        ..Default::default()
    };
    match remote.begin(&plan).unwrap_err() {
        LinkError::Remote { kind: RemoteKind::Refused, message } => {
            assert!(message.contains("is not 65536"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(server.join().unwrap().is_err());
}

/// Pipelined requests (issue 15: no lock-step exchange per batch): the client sends many hash requests and
/// megabytes of extents without reading any answer, so neither side may wait for the other to read; every answer
/// then arrives, in the order of its kind's requests, and the connection is whole again after the commit.
#[test]
fn pipelined_requests_never_block_either_side_and_answers_keep_their_order() {
    let target = MemTarget { bytes: Arc::new(Mutex::new(vec![0; SIZE as usize])), generation: 0 };
    let (addr, server) = serve(target.clone());
    let conn = netproto::connect(&addr, &KEY, "primary", TIMEOUT).unwrap();
    let mut remote = RemoteTarget::open(conn, "data", SIZE, 4096).unwrap();
    let plan = BeginPlan { generation: 1, volume_size: SIZE, block_size: 4096, ..Default::default() };
    remote.begin(&plan).unwrap();
    let blocks: Vec<u64> = (0..1024).map(|i| i % 16).collect();
    let rounds = 30; // 60 requests outstanding, within MAX_OUTSTANDING
    for r in 0..rounds {
        // 32 KiB of answer per request, 1 MiB of extents per round (16 extents rewriting the volume).
        let rotated: Vec<u64> = blocks.iter().map(|b| (b + r) % 16).collect();
        assert_eq!(remote.sub_hashes_request(&rotated).unwrap(), None);
        assert_eq!(remote.block_hashes_request(r % 16, 1).unwrap(), None);
        let data = Bytes::from(vec![r as u8; SIZE as usize]);
        remote.extent(Extent { offset: 0, len: SIZE, data: ExtentData::Data(data) }).unwrap();
    }
    for _ in 0..rounds {
        // Block hashes first: the sub-hash answers that came before them are kept for their own wait.
        let h = remote.block_hashes_wait().unwrap();
        assert_eq!(h.len(), 1);
    }
    for r in 0..rounds {
        let subs = remote.sub_hashes_wait().unwrap();
        assert_eq!(subs.len(), 1024);
        assert_eq!(subs[0], [(r % 16) as u8; 32], "answer {r} out of order");
    }
    assert!(remote.sub_hashes_wait().is_err(), "nothing is outstanding any more");
    let ack = remote.commit([5; 32]).unwrap();
    assert_eq!(ack.generation, 1);
    let frames = remote.connection().expect("whole after the commit").stats().frames_sent;
    assert!(frames >= 3 * rounds + 3, "{frames}");
    drop(remote.close());
    server.join().unwrap().unwrap();
    assert_eq!(*target.bytes.lock().unwrap(), vec![(rounds - 1) as u8; SIZE as usize]);
}

/// `sub_hashes_ready` (the source sends refined blocks as soon as their fingerprints are here, holding less): false
/// with nothing outstanding, true once the oldest sub-hash answer has arrived (behind an earlier block-hash
/// answer), and the answers are then collected in their order.
#[test]
fn sub_hashes_ready_says_when_the_oldest_answer_has_arrived() {
    let target = MemTarget { bytes: Arc::new(Mutex::new(vec![0; SIZE as usize])), generation: 0 };
    let (addr, server) = serve(target.clone());
    let conn = netproto::connect(&addr, &KEY, "primary", TIMEOUT).unwrap();
    let mut remote = RemoteTarget::open(conn, "data", SIZE, 4096).unwrap();
    assert!(!remote.sub_hashes_ready().unwrap(), "nothing was asked");
    let plan = BeginPlan { generation: 1, volume_size: SIZE, block_size: 4096, ..Default::default() };
    assert_eq!(remote.begin_request(&plan).unwrap(), None);
    assert_eq!(remote.block_hashes_request(3, 1).unwrap(), None);
    assert!(!remote.sub_hashes_ready().unwrap(), "no sub_hashes request is outstanding");
    assert_eq!(remote.sub_hashes_request(&[5, 6]).unwrap(), None);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !remote.sub_hashes_ready().unwrap() {
        assert!(std::time::Instant::now() < deadline, "the answer never counted as arrived");
        thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(remote.sub_hashes_wait().unwrap(), vec![[5; 32], [6; 32]]);
    assert_eq!(remote.block_hashes_wait().unwrap(), vec![*blake3::hash(&[0; 4096]).as_bytes()]);
    assert!(!remote.sub_hashes_ready().unwrap(), "every answer was collected");
    assert_eq!(remote.commit([5; 32]).unwrap().generation, 1);
    drop(remote.close());
    server.join().unwrap().unwrap();
}

/// Issue 15 item 4: `OpenVolume` travels behind the handshake's `Auth` (one round trip fewer), and a session whose
/// keys differ is still refused with the authentication message, not with a broken pipe or a volume error.
#[test]
fn the_volume_opened_behind_auth_answers_after_the_proof_and_a_wrong_key_is_still_named() {
    let target = MemTarget { bytes: Arc::new(Mutex::new(vec![0; SIZE as usize])), generation: 0 };
    let opts = netproto::HandshakeOptions::new("primary");
    let open = netproto::client::open_request("data", SIZE, 4096);
    let (addr, server) = serve(target.clone());
    let conn = netproto::connect_then(&addr, &KEY, &opts, TIMEOUT, &open).unwrap();
    let mut remote = RemoteTarget::opened(conn).unwrap();
    assert_eq!(remote.info().unwrap().volume_size, SIZE);
    drop(remote.close());
    server.join().unwrap().unwrap();

    // During a key rotation the client holds two keys and waits for the standby's proof before sending.
    let (addr, server) = serve(target.clone());
    let keys = netproto::KeySet::with_next(KEY, Key([0x44; 32]));
    let conn = netproto::connect_then(&addr, keys, &opts, TIMEOUT, &open).unwrap();
    assert_eq!(RemoteTarget::opened(conn).unwrap().info_now().volume_size, SIZE);
    server.join().unwrap().unwrap();

    let (addr, server) = serve(target.clone());
    let e = netproto::connect_then(&addr, Key([0x99; 32]), &opts, TIMEOUT, &open).unwrap_err();
    assert_eq!(e.to_string(), netproto::handshake::AUTH_FAILED_MESSAGE);
    assert!(server.join().unwrap().is_err());

    // A volume the standby does not know: refused after authentication, as when it is asked after AuthOk.
    let (addr, server) = serve(target);
    let nope = netproto::client::open_request("nope", SIZE, 4096);
    let conn = netproto::connect_then(&addr, &KEY, &opts, TIMEOUT, &nope).unwrap();
    match RemoteTarget::opened(conn).unwrap_err() {
        LinkError::Remote { kind: RemoteKind::UnknownVolume, message } => assert!(message.contains("\"nope\"")),
        other => panic!("{other:?}"),
    }
    assert!(server.join().unwrap().is_err());
}

/// `begin_request` does not wait for `BeginAck`: requests and extents follow at once, and a standby that refuses
/// the plan fails the first call that waits for an answer, with its own reason; nothing after the refused
/// `Begin` is applied.
#[test]
fn a_pipelined_begin_is_checked_at_the_first_answer_and_its_refusal_keeps_its_reason() {
    let target = MemTarget { bytes: Arc::new(Mutex::new(vec![0; SIZE as usize])), generation: 0 };
    let plan = BeginPlan { generation: 1, volume_size: SIZE, block_size: 4096, ..Default::default() };

    let (addr, server) = serve(target.clone());
    let conn = netproto::connect(&addr, &KEY, "primary", TIMEOUT).unwrap();
    let mut remote = RemoteTarget::open(conn, "data", SIZE, 4096).unwrap();
    assert_eq!(remote.begin_request(&plan).unwrap(), None, "not waited for");
    remote.extent(Extent { offset: 0, len: 4096, data: ExtentData::Data(Bytes::from(vec![3u8; 4096])) }).unwrap();
    assert_eq!(remote.sub_hashes(&[2]).unwrap(), vec![[2u8; 32]]);
    assert_eq!(remote.commit([1; 32]).unwrap().generation, 1);
    drop(remote.close());
    server.join().unwrap().unwrap();
    assert_eq!(&target.bytes.lock().unwrap()[..4096], &[3u8; 4096][..]);

    // Nothing outstanding but the Begin: the commit checks it.
    let (addr, server) = serve(target.clone());
    let conn = netproto::connect(&addr, &KEY, "primary", TIMEOUT).unwrap();
    let mut remote = RemoteTarget::open(conn, "data", SIZE, 4096).unwrap();
    assert_eq!(remote.begin_request(&plan).unwrap(), None);
    assert_eq!(remote.commit([2; 32]).unwrap().root, [2; 32]);
    drop(remote.close());
    server.join().unwrap().unwrap();

    let (addr, server) = serve(target.clone());
    let conn = netproto::connect(&addr, &KEY, "primary", TIMEOUT).unwrap();
    let mut remote = RemoteTarget::open(conn, "data", SIZE, 4096).unwrap();
    let bad = BeginPlan { volume_size: SIZE + 1, ..plan };
    assert_eq!(remote.begin_request(&bad).unwrap(), None);
    // Sent behind the refused Begin: the standby must not apply it.
    let _ = remote.extent(Extent { offset: 0, len: 4096, data: ExtentData::Data(Bytes::from(vec![9u8; 4096])) });
    match remote.sub_hashes(&[0]).unwrap_err() {
        LinkError::Remote { kind: RemoteKind::Refused, message } => {
            assert!(message.contains("is not 65536"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(server.join().unwrap().is_err());
    assert_eq!(&target.bytes.lock().unwrap()[..4096], &[3u8; 4096][..], "nothing after the refusal was applied");
}
