//! The primary's end of a session: [`RemoteTarget`] implements [`TargetLink`] over an authenticated
//! [`Connection`], so the engine's source-side orchestration syncs to a standby exactly as it syncs to a local
//! target.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use link::{BeginAck, BeginPlan, BlockHash, CommitAck, Extent, LinkError, RemoteKind, TargetInfo, TargetLink};

use crate::conn::{ConnError, Connection};
use crate::message::{code, OpenVolume, MAX_SUB_BLOCKS};
use crate::Message;

/// The kind of a standby's error code.
pub fn remote_kind(c: u16) -> RemoteKind {
    match c {
        code::PROTOCOL => RemoteKind::Protocol,
        code::VERSION => RemoteKind::Version,
        code::AUTH => RemoteKind::Auth,
        code::UNKNOWN_VOLUME => RemoteKind::UnknownVolume,
        code::BUSY => RemoteKind::Busy,
        code::REFUSED => RemoteKind::Refused,
        code::FAILED => RemoteKind::Failed,
        code::SHUTDOWN => RemoteKind::Shutdown,
        other => RemoteKind::Unknown(other),
    }
}

/// The wire code of a refusal kind.
pub fn remote_code(k: RemoteKind) -> u16 {
    match k {
        RemoteKind::Protocol => code::PROTOCOL,
        RemoteKind::Version => code::VERSION,
        RemoteKind::Auth => code::AUTH,
        RemoteKind::UnknownVolume => code::UNKNOWN_VOLUME,
        RemoteKind::Busy => code::BUSY,
        RemoteKind::Refused => code::REFUSED,
        RemoteKind::Failed => code::FAILED,
        RemoteKind::Shutdown => code::SHUTDOWN,
        RemoteKind::Unknown(c) => c,
    }
}

/// A connection error as a link error: the standby's own refusals keep their kind and message.
pub fn link_error(e: ConnError) -> LinkError {
    match e {
        ConnError::Remote { code, message } => LinkError::Remote { kind: remote_kind(code), message },
        e => LinkError::Transport(Box::new(e)),
    }
}

fn unexpected(expected: &'static str, got: &Message) -> LinkError {
    LinkError::Unexpected { expected, got: got.frame_type().to_string() }
}

/// A quiet client sends [`Message::Keepalive`] after this long without sending anything (well below the
/// standby's idle timeout, whose default is a minute).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Most hash requests a client keeps unanswered (the source bounds its own pipeline well below this; the bound
/// keeps a buggy caller from growing the answer queue without limit).
pub const MAX_OUTSTANDING: usize = 64;

/// A byte stream with a second handle, so that one thread receives while another sends (a `TcpStream`).
pub trait Duplex: Read + Write + Send + Sized + 'static {
    /// A second handle of the same stream (`TcpStream::try_clone`).
    fn second_handle(&self) -> std::io::Result<Self>;
    /// Shuts the stream down in both directions (wakes a thread blocked reading it).
    fn shut_down(&self);
}

impl Duplex for TcpStream {
    fn second_handle(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn shut_down(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

/// What an outstanding request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// `Begin` of a transfer that does not resume, sent without waiting ([`TargetLink::begin_request`]).
    Begin,
    BlockHashes,
    SubHashes,
}

/// The pipelined state of a session: a thread receives every answer into a channel while this one sends.
#[derive(Debug)]
struct Pipeline<S> {
    sender: crate::conn::FrameSender<S>,
    answers: Receiver<Result<Message, ConnError>>,
    reader: JoinHandle<Connection<S>>,
    /// The kinds of the requests sent and not yet answered, oldest first.
    outstanding: VecDeque<Answer>,
    /// Answers received while waiting for another kind, oldest first.
    early: VecDeque<Message>,
}

/// The standby's shadow of one volume, reached over an authenticated connection.
///
/// Once the source begins a transfer or asks for hashes without waiting ([`TargetLink::begin_request`],
/// [`TargetLink::sub_hashes_request`], [`TargetLink::block_hashes_request`]), a second thread receives the
/// standby's answers while this one goes on sending extents and requests, so the source never waits a round trip
/// per batch (nor for `Begin`) and neither side can block the other (the standby always finds its answers read).
/// The connection is whole again after the commit.
#[derive(Debug)]
pub struct RemoteTarget<S: Duplex = TcpStream> {
    conn: Option<Connection<S>>,
    pipe: Option<Pipeline<S>>,
    info: TargetInfo,
    last_send: Instant,
}

fn receive_answers<S: Duplex>(mut conn: Connection<S>, tx: Sender<Result<Message, ConnError>>) -> Connection<S> {
    loop {
        let r = conn.recv_expect("the standby's answers");
        let last = match &r {
            Ok(Message::CommitAck(_)) | Err(_) => true,
            Ok(_) => false,
        };
        if tx.send(r).is_err() || last {
            return conn;
        }
    }
}

/// The request that opens volume `name`: send it with [`crate::connect_then`] (behind the handshake's `Auth`, a
/// round trip earlier) and receive its answer with [`RemoteTarget::opened`].
pub fn open_request(name: &str, source_size: u64, block_size: u32) -> Message {
    Message::OpenVolume(OpenVolume { name: name.into(), source_size, block_size })
}

impl<S: Duplex> RemoteTarget<S> {
    /// Opens volume `name` on the standby; the answer is the shadow's state.
    pub fn open(mut conn: Connection<S>, name: &str, source_size: u64, block_size: u32) -> Result<Self, LinkError> {
        conn.send(&open_request(name, source_size, block_size)).map_err(link_error)?;
        Self::opened(conn)
    }

    /// The session of a connection whose [`open_request`] was sent: receives the shadow's state.
    pub fn opened(mut conn: Connection<S>) -> Result<Self, LinkError> {
        match conn.recv_expect("the volume's state").map_err(link_error)? {
            Message::VolumeInfo(info) => {
                Ok(RemoteTarget { info, conn: Some(conn), pipe: None, last_send: Instant::now() })
            }
            other => Err(unexpected("VolumeInfo", &other)),
        }
    }

    /// The shadow's state as the standby reported it when the volume was opened.
    pub fn info_now(&self) -> TargetInfo {
        self.info.clone()
    }

    fn send(&mut self, m: &Message) -> Result<(), LinkError> {
        self.last_send = Instant::now();
        if let Some(p) = &mut self.pipe {
            return match p.sender.send(m) {
                Ok(()) => Ok(()),
                Err(e) => Err(Self::peer_reason(p, e)),
            };
        }
        self.conn.as_mut().expect("whole when not pipelined").send(m).map_err(link_error)
    }

    /// After a failed write while pipelined: the standby may have said why it closed (the receiving thread has
    /// its Error message).
    fn peer_reason(p: &mut Pipeline<S>, e: ConnError) -> LinkError {
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match p.answers.recv_timeout(left) {
                Ok(Ok(_)) => {}
                Ok(Err(e @ ConnError::Remote { .. })) => return link_error(e),
                Ok(Err(_)) | Err(_) => break,
            }
        }
        link_error(e)
    }

    /// Starts the receiving thread (once per session).
    fn pipeline(&mut self) -> Result<&mut Pipeline<S>, LinkError> {
        if self.pipe.is_none() {
            let mut conn = self.conn.take().expect("whole when not pipelined");
            let second = match conn.get_ref().second_handle() {
                Ok(s) => s,
                Err(e) => {
                    self.conn = Some(conn);
                    return Err(LinkError::Transport(Box::new(ConnError::Socket(e))));
                }
            };
            let sender = conn.split_sender(second).expect("the connection is whole");
            let (tx, rx) = std::sync::mpsc::channel();
            let reader = std::thread::Builder::new()
                .name("blockrep-answers".into())
                .spawn(move || receive_answers(conn, tx))
                .map_err(|e| LinkError::Transport(Box::new(ConnError::Socket(e))))?;
            self.pipe =
                Some(Pipeline { sender, answers: rx, reader, outstanding: VecDeque::new(), early: VecDeque::new() });
        }
        Ok(self.pipe.as_mut().expect("set above"))
    }

    /// Sends a request whose answer is collected later.
    fn request(&mut self, m: &Message, kind: Answer) -> Result<(), LinkError> {
        let p = self.pipeline()?;
        if p.outstanding.len() >= MAX_OUTSTANDING {
            return Err(LinkError::Refused(format!(
                "the source asked for more than {MAX_OUTSTANDING} hash answers ahead; this is a bug of the source"
            )));
        }
        p.outstanding.push_back(kind);
        self.send(m)
    }

    /// The next message from the standby while pipelined.
    fn next_answer(p: &mut Pipeline<S>) -> Result<Message, LinkError> {
        match p.answers.recv() {
            Ok(r) => r.map_err(link_error),
            Err(_) => Err(LinkError::Transport(Box::new(ConnError::Closed { waiting_for: "the standby's answers" }))),
        }
    }

    /// The answer to the oldest outstanding request of `kind` (answers of other kinds that come first are kept).
    fn wait(&mut self, kind: Answer) -> Result<Message, LinkError> {
        let p = self
            .pipe
            .as_mut()
            .ok_or(LinkError::Unexpected { expected: "an outstanding request", got: "none".into() })?;
        Self::settle_begin(p)?;
        let Some(pos) = p.outstanding.iter().position(|&k| k == kind) else {
            return Err(LinkError::Unexpected { expected: "an outstanding request", got: "none".into() });
        };
        // Answers come in request order: the one wanted is the (pos+1)-th still to be claimed.
        while p.early.len() <= pos {
            let m = Self::next_answer(p)?;
            p.early.push_back(m);
        }
        p.outstanding.remove(pos);
        Ok(p.early.remove(pos).expect("received above"))
    }

    /// Checks the answer to a `Begin` sent without waiting, if it is still unclaimed (it is the first answer of the
    /// session, so any later answer waits for it anyway): a refusal fails the session here, with the standby's
    /// reason.
    fn settle_begin(p: &mut Pipeline<S>) -> Result<(), LinkError> {
        if p.outstanding.front() != Some(&Answer::Begin) {
            return Ok(());
        }
        let m = match p.early.pop_front() {
            Some(m) => m,
            None => Self::next_answer(p)?,
        };
        p.outstanding.pop_front();
        match m {
            Message::BeginAck(a) if !a.resumed => Ok(()),
            Message::BeginAck(_) => Err(LinkError::Unexpected {
                expected: "BeginAck of a new transfer",
                got: "BeginAck of a resumed transfer".into(),
            }),
            other => Err(unexpected("BeginAck", &other)),
        }
    }

    /// Waits for the answer to a request sent with [`RemoteTarget::send`] while pipelined (nothing else may be
    /// outstanding).
    fn wait_direct(&mut self, what: &'static str) -> Result<Message, LinkError> {
        match &mut self.pipe {
            Some(p) => {
                Self::settle_begin(p)?;
                if !p.outstanding.is_empty() || !p.early.is_empty() {
                    return Err(LinkError::Unexpected {
                        expected: what,
                        got: format!("{} hash answers still outstanding", p.outstanding.len() + p.early.len()),
                    });
                }
                Self::next_answer(p)
            }
            None => self.conn.as_mut().expect("whole").recv_expect(what).map_err(link_error),
        }
    }

    /// Makes the connection whole again after the receiving thread ended (after the commit's answer, or a
    /// shutdown of the stream).
    fn rejoin(&mut self) {
        if let Some(p) = self.pipe.take() {
            let mut conn = p.reader.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            conn.rejoin_sender(p.sender);
            self.conn = Some(conn);
        }
    }

    /// The connection (for its byte counters); `None` while the receiving thread holds it (between the first
    /// pipelined request and the commit).
    pub fn connection(&self) -> Option<&Connection<S>> {
        self.conn.as_ref()
    }

    /// Ends the session politely and returns the connection.
    pub fn close(mut self) -> Connection<S> {
        if let Some(p) = &self.pipe {
            // A session that ended before its commit: the receiving thread still reads; stop it.
            p.sender.get_ref().shut_down();
        }
        self.rejoin();
        let mut c = self.conn.take().expect("whole after rejoin");
        let _ = c.send(&Message::Bye);
        c
    }
}

impl<S: Duplex> Drop for RemoteTarget<S> {
    fn drop(&mut self) {
        if let Some(p) = self.pipe.take() {
            p.sender.get_ref().shut_down();
            let _ = p.reader.join();
        }
    }
}

impl<S: Duplex> TargetLink for RemoteTarget<S> {
    fn info(&mut self) -> Result<TargetInfo, LinkError> {
        Ok(self.info.clone())
    }

    fn begin(&mut self, p: &BeginPlan) -> Result<BeginAck, LinkError> {
        self.send(&Message::Begin(p.clone()))?;
        match self.wait_direct("the answer to begin")? {
            Message::BeginAck(a) => Ok(a),
            other => Err(unexpected("BeginAck", &other)),
        }
    }

    /// Sends `Begin` and returns at once: the source goes on with its requests and extents while the standby
    /// begins, and the answer is checked before the first answer the source waits for (a refusal fails that
    /// call with the standby's reason; a standby that refused closes the session, so nothing sent after
    /// `Begin` is ever applied). A plan that resumes waits, as the source needs to know whether it did.
    fn begin_request(&mut self, p: &BeginPlan) -> Result<Option<BeginAck>, LinkError> {
        if p.resume {
            return self.begin(p).map(Some);
        }
        self.request(&Message::Begin(p.clone()), Answer::Begin)?;
        Ok(None)
    }

    fn block_hashes(&mut self, first: u64, count: u32) -> Result<Vec<BlockHash>, LinkError> {
        match self.block_hashes_request(first, count)? {
            Some(h) => Ok(h),
            None => self.block_hashes_wait(),
        }
    }

    fn block_hashes_request(&mut self, first: u64, count: u32) -> Result<Option<Vec<BlockHash>>, LinkError> {
        self.request(&Message::BlockHashesReq { first, count }, Answer::BlockHashes)?;
        Ok(None)
    }

    fn block_hashes_wait(&mut self) -> Result<Vec<BlockHash>, LinkError> {
        match self.wait(Answer::BlockHashes)? {
            Message::BlockHashes(h) => Ok(h),
            other => Err(unexpected("BlockHashes", &other)),
        }
    }

    fn sub_hashes(&mut self, blocks: &[u64]) -> Result<Vec<BlockHash>, LinkError> {
        match self.sub_hashes_request(blocks)? {
            Some(h) => Ok(h),
            None => self.sub_hashes_wait(),
        }
    }

    /// Sends one request per [`MAX_SUB_BLOCKS`] blocks; the answer is collected with `sub_hashes_wait`.
    fn sub_hashes_request(&mut self, blocks: &[u64]) -> Result<Option<Vec<BlockHash>>, LinkError> {
        if blocks.len() > MAX_SUB_BLOCKS as usize {
            // Larger batches are split; their parts are collected together (see sub_hashes_wait).
            let mut out = Vec::new();
            for part in blocks.chunks(MAX_SUB_BLOCKS as usize) {
                self.request(&Message::SubHashesReq(part.to_vec()), Answer::SubHashes)?;
                out.extend(self.sub_hashes_wait()?);
            }
            return Ok(Some(out));
        }
        self.request(&Message::SubHashesReq(blocks.to_vec()), Answer::SubHashes)?;
        Ok(None)
    }

    /// Takes every answer the receiving thread has queued (without waiting) and says whether the oldest
    /// outstanding `sub_hashes` request's is among them.
    fn sub_hashes_ready(&mut self) -> Result<bool, LinkError> {
        let Some(p) = self.pipe.as_mut() else { return Ok(false) };
        while let Ok(r) = p.answers.try_recv() {
            p.early.push_back(r.map_err(link_error)?);
        }
        // Answers come in request order (a `Begin` sent without waiting is the first).
        Ok(p.outstanding.iter().position(|&k| k == Answer::SubHashes).is_some_and(|pos| p.early.len() > pos))
    }

    fn sub_hashes_wait(&mut self) -> Result<Vec<BlockHash>, LinkError> {
        match self.wait(Answer::SubHashes)? {
            Message::SubHashes(h) => Ok(h),
            other => Err(unexpected("SubHashes", &other)),
        }
    }

    fn extent(&mut self, e: Extent) -> Result<(), LinkError> {
        self.send(&Message::Extent(e))
    }

    fn keepalive(&mut self) -> Result<(), LinkError> {
        if self.last_send.elapsed() < KEEPALIVE_INTERVAL {
            return Ok(());
        }
        self.send(&Message::Keepalive)
    }

    fn commit(&mut self, root: BlockHash) -> Result<CommitAck, LinkError> {
        self.send(&Message::Commit(root))?;
        let r = match self.wait_direct("the commit acknowledgement")? {
            Message::CommitAck(a) => Ok(a),
            other => Err(unexpected("CommitAck", &other)),
        };
        if r.is_ok() {
            self.rejoin();
        }
        r
    }
}
