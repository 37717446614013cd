//! The vocabulary of one replication session, shared by the engine (both ends of a local sync) and netproto (both
//! ends of the network link), so that an extent travels from the source's scan to the standby's spool as one type.
//!
//! A sync talks to its target only through [`TargetLink`]. Order of calls in one session: [`TargetLink::info`],
//! [`TargetLink::begin`] (or [`TargetLink::begin_request`], whose answer a network link does not wait for), then
//! any mix of [`TargetLink::block_hashes`] / [`TargetLink::sub_hashes`] (for blocks
//! not yet sent in this session; also as requests whose answers are collected later, so that a network link does
//! not wait a round trip per batch) and [`TargetLink::extent`] (in increasing offset order), then
//! [`TargetLink::commit`].
//!
//! This crate holds types and limits only: no I/O, and no dependency on the engine or the protocol.
#![deny(missing_docs)]

use bytes::Bytes;

/// A BLAKE3 hash of one block or piece (full 32 bytes: no truncation arguments to make).
pub type BlockHash = [u8; 32];

/// Granularity of sub-block refinement: a changed block is narrowed down to the pieces of this size that changed.
/// Both ends must agree on it: [`TargetLink::sub_hashes`] answers in pieces of this size.
pub const SUB_BLOCK_SIZE: u32 = 4096;

/// Longest data extent, in bytes: the most a source hands to a link at once, and the most a network frame may
/// announce (before compression). A larger data extent is refused by both ends.
pub const MAX_EXTENT_LEN: u64 = 1 << 20;

/// Longest zero extent (it has no payload, so it may be long).
pub const MAX_ZERO_EXTENT_LEN: u64 = 1 << 30;

/// A generation's random identifier (128 bits): two generations with the same number made by different nodes
/// (split brain) or content the number alone cannot tell apart have different identifiers.
pub type GenId = [u8; 16];

/// Most earlier generations a side keeps in its history (and the most a `TargetInfo` carries).
pub const MAX_HISTORY: usize = 32;

/// Longest node name kept in a history record (longer names are cut at a character boundary).
pub const MAX_RECORD_NODE: usize = 31;

/// One generation in a side's history: which number, which identifier, when, and which node made it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GenRecord {
    /// The generation number.
    pub generation: u64,
    /// Its identifier.
    pub id: GenId,
    /// Unix seconds when it was committed (or, for a promote, when the shadow became production).
    pub time: u64,
    /// The node that wrote it: the primary that synced it, or the node that promoted its shadow (at most
    /// [`MAX_RECORD_NODE`] bytes).
    pub node: String,
}

/// How a sync compares the source with the shadow; the source decides and tells the target in [`BeginPlan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlanMode {
    /// Against the source's manifest of the shadow's committed generation (the shadow is trusted).
    Incremental,
    /// Against hashes the target computes from the shadow's actual content.
    #[default]
    Compare,
    /// Every block is sent (the shadow holds no complete generation).
    Full,
}

/// What the target reports at the start of a session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TargetInfo {
    /// Size of the shadow volume in bytes.
    pub volume_size: u64,
    /// The last committed generation (0: none).
    pub generation: u64,
    /// Block size of the committed generation's manifest (0: none).
    pub block_size: u32,
    /// Root hash of the committed generation.
    pub root: Option<BlockHash>,
    /// Whether the shadow holds a complete generation (false before the first full sync commits).
    pub complete: bool,
    /// An uncommitted, durably spooled transfer kept for resume.
    pub pending: Option<PendingInfo>,
    /// The identifier of the shadow's current content: the committed generation's, or the one a promote gave
    /// it; `None` when unknown (older state, or a crash before it was recorded).
    pub generation_id: Option<GenId>,
    /// Whether the shadow is known untouched since its generation was committed (evidence recorded at commit
    /// still matches, and nothing marked it untrusted).
    pub trusted: bool,
    /// Why it is not trusted (empty when trusted).
    pub distrust: String,
    /// The records of the shadow's content, newest first: the current one (also when its identifier does not
    /// describe the committed generation) and earlier ones (at most [`MAX_HISTORY`]).
    pub history: Vec<GenRecord>,
}

/// A durably spooled, uncommitted transfer that a new session may continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingInfo {
    /// The generation it was building.
    pub generation: u64,
    /// The generation it was based on.
    pub base_generation: u64,
    /// Bytes of extents durably received.
    pub bytes: u64,
    /// Byte offset up to which extents were received (extents arrive in increasing offset order).
    pub end_offset: u64,
}

/// What the source asks the target to start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BeginPlan {
    /// The new generation (the target's committed generation + 1).
    pub generation: u64,
    /// The generation the source's diff is based on (must equal the target's committed generation, or 0 for a
    /// transfer that does not depend on the shadow's content).
    pub base_generation: u64,
    /// Size of the source volume.
    pub volume_size: u64,
    /// Block size of the source's manifest.
    pub block_size: u32,
    /// Continue the pending transfer ([`TargetInfo::pending`]) instead of discarding it.
    pub resume: bool,
    /// How the source compares: in [`PlanMode::Compare`] the target answers hash queries from the shadow's actual
    /// content, never from its manifest.
    pub mode: PlanMode,
    /// The identifier the new generation gets when it commits.
    pub id: GenId,
}

/// The target's answer to `begin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginAck {
    /// Whether the pending transfer is continued: extents below [`PendingInfo::end_offset`] were kept, and hash
    /// queries answer for the content including them.
    pub resumed: bool,
    /// Whether extents are written in place (no complete generation to protect) instead of spooled.
    pub in_place: bool,
}

/// The payload of an extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentData {
    /// Bytes to write (`len` bytes, at most [`MAX_EXTENT_LEN`]).
    Data(Bytes),
    /// `len` zero bytes, without payload (at most [`MAX_ZERO_EXTENT_LEN`]).
    Zero,
}

/// A run of bytes to write at `offset` on the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset in the volume.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Payload.
    pub data: ExtentData,
}

impl Extent {
    /// The most bytes an extent of this kind may cover.
    pub fn max_len(&self) -> u64 {
        match self.data {
            ExtentData::Data(_) => MAX_EXTENT_LEN,
            ExtentData::Zero => MAX_ZERO_EXTENT_LEN,
        }
    }
}

/// The target's answer to `commit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitAck {
    /// The generation now committed.
    pub generation: u64,
    /// Its root hash, computed by the target from its own manifest.
    pub root: BlockHash,
}

/// Why a remote target refused or failed, as the standby reports it (the wire carries it as a number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteKind {
    /// The request broke the protocol.
    Protocol,
    /// No common protocol version.
    Version,
    /// Authentication failed (wrong key).
    Auth,
    /// The volume is not configured on the standby.
    UnknownVolume,
    /// Another session holds the volume.
    Busy,
    /// The standby refuses the request (size mismatch, role, plan).
    Refused,
    /// The standby failed while carrying it out.
    Failed,
    /// The standby is shutting down.
    Shutdown,
    /// A code this version does not know.
    Unknown(u16),
}

/// Errors of a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The local target failed (the engine's target error, boxed so this crate need not know it).
    #[error(transparent)]
    Local(Box<dyn std::error::Error + Send + Sync>),
    /// The remote target refused or failed; the message is the standby's.
    #[error("the standby reported: {message}")]
    Remote {
        /// What kind of refusal.
        kind: RemoteKind,
        /// The standby's message.
        message: String,
    },
    /// The target refuses the request in its present state (for example a standby that became primary refuses
    /// to commit); the message says why.
    #[error("{0}")]
    Refused(String),
    /// The transport failed (connection lost, corrupt frame, timeout).
    #[error(transparent)]
    Transport(Box<dyn std::error::Error + Send + Sync>),
    /// The other end answered with something the protocol does not allow here.
    #[error("protocol violation: expected {expected}, the standby sent {got}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What arrived.
        got: String,
    },
}

/// The operations a source needs from a target. See the crate docs for the order of calls.
pub trait TargetLink {
    /// State of the shadow.
    fn info(&mut self) -> Result<TargetInfo, LinkError>;
    /// Starts (or resumes) a transfer.
    fn begin(&mut self, plan: &BeginPlan) -> Result<BeginAck, LinkError>;
    /// Starts a transfer whose answer the source can do without: `Ok(Some(ack))` when the link answered (the
    /// default, which calls [`TargetLink::begin`]); `Ok(None)` when the link sent the request and goes on without
    /// waiting for it (a network link: the source's first requests and extents follow at once). Then the transfer
    /// is new (`resumed` false, which a plan that does not resume always gets), and a refusal fails a later call
    /// of the session with the target's reason; nothing sent after a refused `begin` is applied. A link waits
    /// anyway for a plan that resumes.
    fn begin_request(&mut self, plan: &BeginPlan) -> Result<Option<BeginAck>, LinkError> {
        self.begin(plan).map(Some)
    }
    /// Hashes of blocks `first..first + count` of the shadow's current content, in blocks of the plan's block size.
    fn block_hashes(&mut self, first: u64, count: u32) -> Result<Vec<BlockHash>, LinkError>;
    /// For each listed block, the fingerprints of its [`SUB_BLOCK_SIZE`] pieces, back to back (a partial last
    /// block has fewer). A piece's fingerprint is the BLAKE3 chaining value of the piece as a subtree of its
    /// block's hash tree (the engine's `hash::piece_cv`), so that the target can merge them into the block's hash.
    fn sub_hashes(&mut self, blocks: &[u64]) -> Result<Vec<BlockHash>, LinkError>;
    /// Asks for [`TargetLink::block_hashes`] without waiting for the answer, so that the target hashes while the
    /// source scans. `Ok(Some(answer))` when the link answered at once (the default, which calls `block_hashes`);
    /// `Ok(None)` when the answer is collected later with [`TargetLink::block_hashes_wait`]. Answers of each kind
    /// come in the order of their requests; extents and other requests may be sent in between.
    fn block_hashes_request(&mut self, first: u64, count: u32) -> Result<Option<Vec<BlockHash>>, LinkError> {
        self.block_hashes(first, count).map(Some)
    }
    /// The answer to the oldest [`TargetLink::block_hashes_request`] that returned `Ok(None)`.
    fn block_hashes_wait(&mut self) -> Result<Vec<BlockHash>, LinkError> {
        Err(LinkError::Unexpected { expected: "an outstanding block_hashes request", got: "none".into() })
    }
    /// Asks for [`TargetLink::sub_hashes`] without waiting for the answer (see
    /// [`TargetLink::block_hashes_request`]); collect a `Ok(None)` answer with [`TargetLink::sub_hashes_wait`].
    fn sub_hashes_request(&mut self, blocks: &[u64]) -> Result<Option<Vec<BlockHash>>, LinkError> {
        self.sub_hashes(blocks).map(Some)
    }
    /// The answer to the oldest [`TargetLink::sub_hashes_request`] that returned `Ok(None)`.
    fn sub_hashes_wait(&mut self) -> Result<Vec<BlockHash>, LinkError> {
        Err(LinkError::Unexpected { expected: "an outstanding sub_hashes request", got: "none".into() })
    }
    /// Whether the answer to the oldest outstanding [`TargetLink::sub_hashes_request`] has arrived, so that
    /// [`TargetLink::sub_hashes_wait`] returns without waiting. Never blocks. The default, `false`, means "not
    /// known": the source then collects the answer only when it must.
    fn sub_hashes_ready(&mut self) -> Result<bool, LinkError> {
        Ok(false)
    }
    /// Writes one extent (spooled or in place).
    fn extent(&mut self, extent: Extent) -> Result<(), LinkError>;
    /// Makes the transfer the new committed generation; `root` is the source's root hash, which the target
    /// checks against its own before committing.
    fn commit(&mut self, root: BlockHash) -> Result<CommitAck, LinkError>;
    /// Called by the source between chunks of its scan, also when it has nothing to send: a link whose other end
    /// ends idle sessions (the standby's idle timeout) uses it to say that the source is still there. A local
    /// link has nothing to do.
    fn keepalive(&mut self) -> Result<(), LinkError> {
        Ok(())
    }
}

/// Walks an error and its sources into one line, `outer: inner: innermost` (for logs and for messages that
/// cross the wire, where the source chain would otherwise be lost).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        // Transparent wrappers repeat their source's message; say it once.
        if !s.ends_with(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_names_every_cause_once() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(error_chain(&e), "outer: disk on fire");
        let l = LinkError::Local(Box::new(e));
        assert_eq!(error_chain(&l), "outer: disk on fire");
    }

    #[test]
    fn extent_limits_depend_on_the_kind() {
        let d = Extent { offset: 0, len: 1, data: ExtentData::Data(Bytes::from_static(b"x")) };
        assert_eq!(d.max_len(), MAX_EXTENT_LEN);
        let z = Extent { offset: 0, len: 1, data: ExtentData::Zero };
        assert_eq!(z.max_len(), MAX_ZERO_EXTENT_LEN);
    }
}
