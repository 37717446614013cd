//! The network side of a sync: [`RemoteTarget`] implements the engine's `TargetLink` over a netproto
//! connection, and the conversions between engine and wire types live here (netproto does not depend on the
//! engine, the engine has no network code).

use engine::hash::BlockHash;
use engine::sync::{
    BeginAck, BeginPlan, CommitAck, Extent, ExtentData, LinkError, PendingInfo, TargetInfo, TargetLink,
};
use netproto::message as m;
use netproto::{Connection, Message};

/// Wire form of the target's state.
pub fn info_to_wire(i: &TargetInfo) -> m::VolumeInfo {
    m::VolumeInfo {
        shadow_size: i.volume_size,
        generation: i.generation,
        block_size: i.block_size,
        root: i.root,
        complete: i.complete,
        pending: i.pending.as_ref().map(|p| m::Pending {
            generation: p.generation,
            base_generation: p.base_generation,
            bytes: p.bytes,
            end_offset: p.end_offset,
        }),
    }
}

/// Engine form of the target's state.
pub fn info_from_wire(i: &m::VolumeInfo) -> TargetInfo {
    TargetInfo {
        volume_size: i.shadow_size,
        generation: i.generation,
        block_size: i.block_size,
        root: i.root,
        complete: i.complete,
        pending: i.pending.as_ref().map(|p| PendingInfo {
            generation: p.generation,
            base_generation: p.base_generation,
            bytes: p.bytes,
            end_offset: p.end_offset,
        }),
    }
}

/// Engine form of a begin request.
pub fn begin_from_wire(b: &m::Begin) -> BeginPlan {
    BeginPlan {
        generation: b.generation,
        base_generation: b.base_generation,
        volume_size: b.volume_size,
        block_size: b.block_size,
        resume: b.resume,
    }
}

/// Engine form of an extent.
pub fn extent_from_wire(e: m::Extent) -> Extent {
    Extent {
        offset: e.offset,
        len: e.len,
        data: match e.data {
            m::ExtentData::Data(b) => ExtentData::Data(b),
            m::ExtentData::Zero => ExtentData::Zero,
        },
    }
}

/// The standby's shadow of one volume, reached over an authenticated connection.
#[derive(Debug)]
pub struct RemoteTarget {
    conn: Connection,
    info: TargetInfo,
}

fn transport(e: netproto::ConnError) -> LinkError {
    match e {
        netproto::ConnError::Remote { message, .. } => LinkError::Remote(message),
        e => LinkError::Transport(Box::new(e)),
    }
}

fn unexpected(expected: &'static str, got: &Message) -> LinkError {
    LinkError::Transport(
        format!("protocol violation: expected {expected}, the standby sent {}", got.frame_type()).into(),
    )
}

impl RemoteTarget {
    /// Opens volume `name` on the standby.
    pub fn open(mut conn: Connection, name: &str, source_size: u64, block_size: u32) -> Result<Self, LinkError> {
        conn.send(&Message::OpenVolume(m::OpenVolume { name: name.into(), source_size, block_size }))
            .map_err(transport)?;
        match conn.recv_expect("the volume's state").map_err(transport)? {
            Message::VolumeInfo(v) => Ok(RemoteTarget { info: info_from_wire(&v), conn }),
            other => Err(unexpected("VolumeInfo", &other)),
        }
    }

    /// Ends the session politely.
    pub fn close(mut self) -> Connection {
        let _ = self.conn.send(&Message::Bye);
        self.conn
    }
}

impl TargetLink for RemoteTarget {
    fn info(&mut self) -> Result<TargetInfo, LinkError> {
        Ok(self.info.clone())
    }

    fn begin(&mut self, p: &BeginPlan) -> Result<BeginAck, LinkError> {
        let msg = Message::Begin(m::Begin {
            generation: p.generation,
            base_generation: p.base_generation,
            volume_size: p.volume_size,
            block_size: p.block_size,
            resume: p.resume,
        });
        self.conn.send(&msg).map_err(transport)?;
        match self.conn.recv_expect("the answer to begin").map_err(transport)? {
            Message::BeginAck(a) => Ok(BeginAck { resumed: a.resumed, in_place: a.in_place }),
            other => Err(unexpected("BeginAck", &other)),
        }
    }

    fn block_hashes(&mut self, first: u64, count: u32) -> Result<Vec<BlockHash>, LinkError> {
        self.conn.send(&Message::BlockHashesReq { first, count }).map_err(transport)?;
        match self.conn.recv_expect("block hashes").map_err(transport)? {
            Message::BlockHashes(h) => Ok(h),
            other => Err(unexpected("BlockHashes", &other)),
        }
    }

    fn sub_hashes(&mut self, blocks: &[u64]) -> Result<Vec<BlockHash>, LinkError> {
        let mut out = Vec::new();
        for part in blocks.chunks(m::MAX_SUB_BLOCKS as usize) {
            self.conn.send(&Message::SubHashesReq(part.to_vec())).map_err(transport)?;
            match self.conn.recv_expect("sub-block hashes").map_err(transport)? {
                Message::SubHashes(h) => out.extend(h),
                other => return Err(unexpected("SubHashes", &other)),
            }
        }
        Ok(out)
    }

    fn extent(&mut self, e: Extent) -> Result<(), LinkError> {
        let data = match e.data {
            ExtentData::Data(b) => m::ExtentData::Data(b),
            ExtentData::Zero => m::ExtentData::Zero,
        };
        self.conn.send(&Message::Extent(m::Extent { offset: e.offset, len: e.len, data })).map_err(transport)
    }

    fn commit(&mut self, root: BlockHash) -> Result<CommitAck, LinkError> {
        self.conn.send(&Message::Commit(root)).map_err(transport)?;
        match self.conn.recv_expect("the commit acknowledgement").map_err(transport)? {
            Message::CommitAck(a) => Ok(CommitAck { generation: a.generation, root: a.root }),
            other => Err(unexpected("CommitAck", &other)),
        }
    }
}
