//! Volumes: block devices or regular files, with their size and the I/O policy used on them.
//!
//! A [`Volume`] is opened once and shared (it is `Send + Sync`): [`Volume::read_at`] serves positional reads
//! from any thread, [`Volume::reader`] and [`Volume::writer`] hand out engines with several requests in flight.
//!
//! Block devices are opened with `O_DIRECT` by default, so that a sync does not evict the production server's
//! page cache; regular files are opened buffered. [`IoOptions::direct`] overrides either. Under `O_DIRECT` the
//! engines keep every kernel request aligned to [`DIRECT_ALIGN`](crate::io::DIRECT_ALIGN) and send the pieces
//! that cannot be aligned (the tail of a volume whose size is not a multiple of 4096, an unaligned offset)
//! through a second, buffered descriptor, so callers may use any offset and length.
//!
//! ```no_run
//! use engine::volume::{Access, IoOptions, Volume};
//! use engine::io::AlignedBuf;
//!
//! let vol = Volume::open("/dev/vg0/data".as_ref(), Access::Read, &IoOptions::default())?;
//! let mut buf = AlignedBuf::new(1 << 20);
//! let n = vol.read_at(0, &mut buf)?;
//! println!("{}: {} bytes, read {n}", vol.path().display(), vol.size());
//! # Ok::<(), engine::volume::VolumeError>(())
//! ```

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::io::{self, AlignedBuf, BufPool, EngineKind, IoError, ReadEngine, Target, WriteEngine};

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
    /// Opening failed (missing path, no permission, ...).
    #[error("cannot open volume {path}: check that it exists and that this user may access it")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Neither a block device nor a regular file.
    #[error("{path} is neither a block device nor a regular file: give the path of a block device or an image file")]
    NotAVolume {
        /// The path.
        path: PathBuf,
    },
    /// The filesystem holding the volume refuses `O_DIRECT`.
    #[error("{path} cannot be opened with O_DIRECT (its filesystem refuses it): open it buffered instead")]
    DirectUnsupported {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The size of a block device could not be read.
    #[error("cannot read the size of block device {path}")]
    Size {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A writer was asked of a volume opened read-only.
    #[error("volume {path} was opened read-only: open it with Access::ReadWrite to write to it")]
    ReadOnly {
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

mod ioctl {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t): the size of a block device in bytes.
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
}

/// An open volume.
#[derive(Debug)]
pub struct Volume {
    path: PathBuf,
    target: Target,
    is_block: bool,
    access: Access,
    /// The engine asked for (`Auto` falls back per engine if a ring cannot be set up).
    requested: EngineKind,
    /// `requested`, resolved at open.
    engine: EngineKind,
}

impl Volume {
    /// Opens `path` as a volume.
    ///
    /// The path must name a block device or a regular file (symlinks such as `/dev/vg/lv` are followed).
    /// `opts.engine` is resolved here: `Auto` becomes io_uring or the synchronous engine, and `Uring` fails
    /// when the kernel refuses io_uring.
    pub fn open(path: &Path, access: Access, opts: &IoOptions) -> Result<Volume, VolumeError> {
        let open_err = |source| VolumeError::Open { path: path.to_owned(), source };
        // Look before opening: opening a FIFO would block and a directory cannot be opened for writing.
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let is_block = meta.file_type().is_block_device();
        if !is_block && !meta.is_file() {
            return Err(VolumeError::NotAVolume { path: path.to_owned() });
        }
        let engine = opts.engine.resolve().map_err(|source| VolumeError::Io { path: path.to_owned(), source })?;
        let direct = opts.direct.unwrap_or(is_block);
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(access == Access::ReadWrite);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let file = match open(direct) {
            Ok(f) => f,
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(VolumeError::DirectUnsupported { path: path.to_owned(), source: e })
            }
            Err(e) => return Err(open_err(e)),
        };
        // The path may have been replaced between the look and the open: check what was opened.
        let meta = file.metadata().map_err(open_err)?;
        if meta.file_type().is_block_device() != is_block || !(is_block || meta.is_file()) {
            return Err(VolumeError::NotAVolume { path: path.to_owned() });
        }
        let size = if is_block {
            let mut size = 0u64;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live, writable u64; the
            // descriptor is open for the duration of the call.
            unsafe { ioctl::blkgetsize64(file.as_raw_fd(), &mut size) }
                .map_err(|e| VolumeError::Size { path: path.to_owned(), source: e.into() })?;
            size
        } else {
            meta.len()
        };
        let file = Arc::new(file);
        let buffered = if direct { Arc::new(open(false).map_err(open_err)?) } else { Arc::clone(&file) };
        let target = Target { file, buffered, size, direct, max_io: io::MAX_IO };
        Ok(Volume { path: path.to_owned(), target, is_block, access, requested: opts.engine, engine })
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.target.size
    }

    /// Whether this is a block device.
    pub fn is_block_device(&self) -> bool {
        self.is_block
    }

    /// Whether O_DIRECT is in use.
    pub fn direct(&self) -> bool {
        self.target.direct
    }

    /// The engine [`Volume::reader`] and [`Volume::writer`] hand out (never `Auto`). With [`EngineKind::Auto`],
    /// an engine whose ring cannot be set up falls back to the synchronous engine; its `kind()` says which.
    pub fn engine(&self) -> EngineKind {
        self.engine
    }

    /// The file, for operations the engines do not cover (`fsync`, `fallocate`, locking). With `O_DIRECT`
    /// this descriptor is the direct one: keep every offset, length and buffer aligned to
    /// [`DIRECT_ALIGN`](crate::io::DIRECT_ALIGN) on it.
    pub fn file(&self) -> &File {
        &self.target.file
    }

    /// A read engine with up to `depth` requests in flight.
    pub fn reader(&self, depth: usize) -> Result<Box<dyn ReadEngine>, VolumeError> {
        self.engine_reader(depth).map_err(|source| self.io_error(source))
    }

    /// A write engine with up to `depth` requests in flight; completed buffers go back to `pool`.
    pub fn writer(&self, depth: usize, pool: BufPool) -> Result<Box<dyn WriteEngine>, VolumeError> {
        if self.access != Access::ReadWrite {
            return Err(VolumeError::ReadOnly { path: self.path.clone() });
        }
        io::new_writer(self.requested, self.target.clone(), depth, pool).map_err(|source| self.io_error(source))
    }

    /// Reads `buf.len()` bytes at `offset`, short only at the end of the volume; returns the bytes read and
    /// sets `buf.len()` to that count. Safe to call from several threads at once.
    pub fn read_at(&self, offset: u64, buf: &mut AlignedBuf) -> Result<usize, VolumeError> {
        let want = self.target.expected(offset, buf.len());
        io::sync::pread_exact(&self.target, offset, want, buf).map_err(|source| self.io_error(source))?;
        Ok(want)
    }

    /// Writes all of `data` at `offset` synchronously (not durable until [`Volume::sync_data`]).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        if self.access != Access::ReadWrite {
            return Err(VolumeError::ReadOnly { path: self.path.clone() });
        }
        io::sync::pwrite_all(&self.target, offset, data).map_err(|source| self.io_error(source))
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn sync_data(&self) -> Result<(), VolumeError> {
        self.target.sync_data().map_err(|source| self.io_error(source))
    }

    /// Caps every kernel request at `max_io` bytes (rounded down to whole 4 KiB units for direct requests), so
    /// that reads and writes come back short and the engines must resubmit the rest.
    #[cfg(test)]
    pub(crate) fn cap_requests(&mut self, max_io: usize) {
        self.target.max_io = max_io.max(1);
    }

    pub(crate) fn engine_reader(&self, depth: usize) -> Result<Box<dyn ReadEngine>, IoError> {
        io::new_reader(self.requested, self.target.clone(), depth)
    }

    fn io_error(&self, source: IoError) -> VolumeError {
        VolumeError::Io { path: self.path.clone(), source }
    }
}
