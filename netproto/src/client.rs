//! The primary's end of a session: [`RemoteTarget`] implements [`TargetLink`] over an authenticated
//! [`Connection`], so the engine's source-side orchestration syncs to a standby exactly as it syncs to a local
//! target.

use std::io::{Read, Write};
use std::net::TcpStream;
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

/// The standby's shadow of one volume, reached over an authenticated connection.
#[derive(Debug)]
pub struct RemoteTarget<S = TcpStream> {
    conn: Connection<S>,
    info: TargetInfo,
    last_send: Instant,
}

impl<S: Read + Write> RemoteTarget<S> {
    /// Opens volume `name` on the standby; the answer is the shadow's state.
    pub fn open(mut conn: Connection<S>, name: &str, source_size: u64, block_size: u32) -> Result<Self, LinkError> {
        conn.send(&Message::OpenVolume(OpenVolume { name: name.into(), source_size, block_size }))
            .map_err(link_error)?;
        match conn.recv_expect("the volume's state").map_err(link_error)? {
            Message::VolumeInfo(info) => Ok(RemoteTarget { info, conn, last_send: Instant::now() }),
            other => Err(unexpected("VolumeInfo", &other)),
        }
    }

    /// The shadow's state as the standby reported it when the volume was opened.
    pub fn info_now(&self) -> TargetInfo {
        self.info.clone()
    }

    /// The connection (for its byte counters).
    pub fn connection(&self) -> &Connection<S> {
        &self.conn
    }

    fn send(&mut self, m: &Message) -> Result<(), LinkError> {
        self.last_send = Instant::now();
        self.conn.send(m).map_err(link_error)
    }

    /// Ends the session politely and returns the connection.
    pub fn close(mut self) -> Connection<S> {
        let _ = self.conn.send(&Message::Bye);
        self.conn
    }
}

impl<S: Read + Write> TargetLink for RemoteTarget<S> {
    fn info(&mut self) -> Result<TargetInfo, LinkError> {
        Ok(self.info.clone())
    }

    fn begin(&mut self, p: &BeginPlan) -> Result<BeginAck, LinkError> {
        self.send(&Message::Begin(p.clone()))?;
        match self.conn.recv_expect("the answer to begin").map_err(link_error)? {
            Message::BeginAck(a) => Ok(a),
            other => Err(unexpected("BeginAck", &other)),
        }
    }

    fn block_hashes(&mut self, first: u64, count: u32) -> Result<Vec<BlockHash>, LinkError> {
        self.send(&Message::BlockHashesReq { first, count })?;
        match self.conn.recv_expect("block hashes").map_err(link_error)? {
            Message::BlockHashes(h) => Ok(h),
            other => Err(unexpected("BlockHashes", &other)),
        }
    }

    fn sub_hashes(&mut self, blocks: &[u64]) -> Result<Vec<BlockHash>, LinkError> {
        let mut out = Vec::new();
        for part in blocks.chunks(MAX_SUB_BLOCKS as usize) {
            self.send(&Message::SubHashesReq(part.to_vec()))?;
            match self.conn.recv_expect("sub-block hashes").map_err(link_error)? {
                Message::SubHashes(h) => out.extend(h),
                other => return Err(unexpected("SubHashes", &other)),
            }
        }
        Ok(out)
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
        match self.conn.recv_expect("the commit acknowledgement").map_err(link_error)? {
            Message::CommitAck(a) => Ok(a),
            other => Err(unexpected("CommitAck", &other)),
        }
    }
}
