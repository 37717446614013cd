//! Volumes: block devices or regular files, with their size and the I/O policy used on them.
//!
//! STUB: signatures only; the implementation lands with the io engines.

use std::path::{Path, PathBuf};

use crate::io::{BufPool, EngineKind, IoError, ReadEngine, WriteEngine};

/// How a volume is opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoOptions {
    /// Engine choice.
    pub engine: EngineKind,
    /// `Some(true)`: O_DIRECT; `Some(false)`: buffered; `None`: O_DIRECT for block devices, buffered for files.
    pub direct: Option<bool>,
}

/// Read-only or read-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Source side.
    Read,
    /// Target side.
    ReadWrite,
}

/// Errors opening or using a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Opening failed.
    #[error("cannot open volume {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Neither a block device nor a regular file.
    #[error("{path} is neither a block device nor a regular file")]
    NotAVolume {
        /// The path.
        path: PathBuf,
    },
    /// An I/O error on the volume.
    #[error("I/O error on volume {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The engine error.
        #[source]
        source: IoError,
    },
}

/// An open volume.
#[derive(Debug)]
pub struct Volume {
    path: PathBuf,
}

impl Volume {
    /// Opens `path` as a volume.
    pub fn open(path: &Path, access: Access, opts: &IoOptions) -> Result<Volume, VolumeError> {
        let _ = (path, access, opts);
        unimplemented!("volume::open")
    }
    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        unimplemented!()
    }
    /// Whether this is a block device.
    pub fn is_block_device(&self) -> bool {
        unimplemented!()
    }
    /// Whether O_DIRECT is in use.
    pub fn direct(&self) -> bool {
        unimplemented!()
    }
    /// A read engine with up to `depth` requests in flight.
    pub fn reader(&self, depth: usize) -> Result<Box<dyn ReadEngine>, VolumeError> {
        let _ = depth;
        unimplemented!()
    }
    /// A write engine with up to `depth` requests in flight; completed buffers go back to `pool`.
    pub fn writer(&self, depth: usize, pool: BufPool) -> Result<Box<dyn WriteEngine>, VolumeError> {
        let _ = (depth, pool);
        unimplemented!()
    }
    /// Reads exactly `buf.len()` bytes at `offset` (short only at the end of the volume; returns bytes read).
    pub fn read_at(&self, offset: u64, buf: &mut crate::io::AlignedBuf) -> Result<usize, VolumeError> {
        let _ = (offset, buf);
        unimplemented!()
    }
}
