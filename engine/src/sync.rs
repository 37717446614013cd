//! The link between a source and a target, and the orchestration of one sync.
//!
//! A sync talks to its target only through [`TargetLink`]. In one process (`blockrep sync --local`, the demo,
//! tests) the link is [`crate::target::Target`] itself; over the network the netproto client implements the
//! same trait and the standby's `serve` loop drives a `Target` with the requests it receives.
//!
//! Order of calls in one session: [`TargetLink::info`], [`TargetLink::begin`], then any mix of
//! [`TargetLink::block_hashes`] / [`TargetLink::sub_hashes`] (for blocks not yet sent in this session) and
//! [`TargetLink::extent`] (in increasing offset order), then [`TargetLink::commit`].

use bytes::Bytes;

use crate::hash::BlockHash;

/// What the target reports at the start of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginPlan {
    /// The new generation (the target's committed generation + 1).
    pub generation: u64,
    /// The generation the source's diff is based on (must equal the target's committed generation, or 0 for a
    /// transfer that does not depend on the shadow's content).
    pub base_generation: u64,
    /// Size of the source volume (the shadow must be at least as large).
    pub volume_size: u64,
    /// Block size of the source's manifest.
    pub block_size: u32,
    /// Continue the pending transfer (`TargetInfo::pending`) instead of discarding it.
    pub resume: bool,
}

/// The target's answer to `begin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginAck {
    /// Whether the pending transfer is continued: extents below `PendingInfo::end_offset` were kept, and hash
    /// queries answer for the content including them.
    pub resumed: bool,
    /// Whether extents are written in place (no complete generation to protect) instead of spooled.
    pub in_place: bool,
}

/// The payload of an extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentData {
    /// Bytes to write (`len` bytes).
    Data(Bytes),
    /// `len` zero bytes, without payload.
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

/// The target's answer to `commit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitAck {
    /// The generation now committed.
    pub generation: u64,
    /// Its root hash, computed by the target from its own manifest.
    pub root: BlockHash,
}

/// Errors of a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The local target failed.
    #[error(transparent)]
    Target(#[from] crate::target::TargetError),
    /// The remote target refused or failed; the message is the standby's.
    #[error("the standby reported: {0}")]
    Remote(String),
    /// The transport failed.
    #[error(transparent)]
    Transport(Box<dyn std::error::Error + Send + Sync>),
}

/// The operations a source needs from a target. See the module docs for the order of calls.
pub trait TargetLink {
    /// State of the shadow.
    fn info(&mut self) -> Result<TargetInfo, LinkError>;
    /// Starts (or resumes) a transfer.
    fn begin(&mut self, plan: &BeginPlan) -> Result<BeginAck, LinkError>;
    /// Hashes of blocks `first..first + count` of the shadow's current content, in blocks of the plan's block size.
    fn block_hashes(&mut self, first: u64, count: u32) -> Result<Vec<BlockHash>, LinkError>;
    /// For each listed block, the hashes of its [`crate::hash::SUB_BLOCK_SIZE`] pieces, back to back (a partial
    /// last block has fewer).
    fn sub_hashes(&mut self, blocks: &[u64]) -> Result<Vec<BlockHash>, LinkError>;
    /// Writes one extent (spooled or in place).
    fn extent(&mut self, extent: Extent) -> Result<(), LinkError>;
    /// Makes the transfer the new committed generation; `root` is the source's root hash, which the target
    /// checks against its own before committing.
    fn commit(&mut self, root: BlockHash) -> Result<CommitAck, LinkError>;
}
