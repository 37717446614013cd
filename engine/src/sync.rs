//! The link between a source and a target, and the public paths of one sync.
//!
//! The session's vocabulary is defined once in the `link` crate and re-exported here; the orchestration of one
//! sync (source side) lives in [`crate::source`] and is re-exported here under its historical paths
//! (`engine::sync::{sync_volume, SyncOptions, SyncReport, SyncMode, SyncError}`).
//!
//! A sync talks to its target only through [`TargetLink`]. In one process (`blockrep sync --local`, the demo,
//! tests) the link is [`crate::target::Target`] itself; over the network the netproto client implements the
//! same trait and the standby's `serve` loop drives a `Target` with the requests it receives.
//!
//! Order of calls in one session: [`TargetLink::info`], [`TargetLink::begin`], then any mix of
//! [`TargetLink::block_hashes`] / [`TargetLink::sub_hashes`] (for blocks not yet sent in this session) and
//! [`TargetLink::extent`] (in increasing offset order), then [`TargetLink::commit`].

pub use link::{
    BeginAck, BeginPlan, BlockHash, CommitAck, Extent, ExtentData, LinkError, PendingInfo, TargetInfo, TargetLink,
    MAX_EXTENT_LEN, MAX_ZERO_EXTENT_LEN,
};

pub use crate::source::{sync_volume, SyncError, SyncMode, SyncOptions, SyncReport};
