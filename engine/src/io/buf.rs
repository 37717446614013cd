//! Aligned, owned I/O buffers and a pool to recycle them.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use crossbeam_channel::{Receiver, Sender};

use super::DIRECT_ALIGN;

/// A heap buffer aligned to [`DIRECT_ALIGN`], with a fixed capacity and a current length.
///
/// It derefs to its first `len()` bytes. The memory never moves while the buffer lives, so a pointer to it can be
/// handed to the kernel for as long as the buffer is owned by the request.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out `&[u8]`, which is Sync.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `cap` bytes (rounded up to [`DIRECT_ALIGN`]), with `len() == cap`.
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let layout = Layout::from_size_align(cap, DIRECT_ALIGN).expect("buffer size overflows a Layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, cap, len: cap }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::new(data.len());
        b.set_len(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Capacity in bytes (a multiple of [`DIRECT_ALIGN`]).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the number of valid bytes. Bytes up to the capacity are always initialised (zeroed at allocation).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "length {len} exceeds capacity {}", self.cap);
        self.len = len;
    }

    /// The whole capacity as a mutable slice, regardless of `len()`.
    pub fn as_full_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for cap bytes, initialised at allocation, and uniquely borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }

    /// Raw pointer for handing to the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Raw const pointer for handing to the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, DIRECT_ALIGN).expect("layout was valid at allocation");
        // SAFETY: ptr was allocated with exactly this layout in `new` and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes for the lifetime of &self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in Deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).field("cap", &self.cap).finish()
    }
}

/// A bounded pool of equally sized [`AlignedBuf`]s shared between threads.
///
/// `get` blocks while every buffer is in use, which bounds the memory of a pipeline and gives back-pressure.
#[derive(Clone, Debug)]
pub struct BufPool {
    tx: Sender<AlignedBuf>,
    rx: Receiver<AlignedBuf>,
    buf_size: usize,
}

impl BufPool {
    /// A pool of `count` buffers of `buf_size` bytes each.
    pub fn new(count: usize, buf_size: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(count.max(1));
        for _ in 0..count.max(1) {
            tx.send(AlignedBuf::new(buf_size)).expect("pool channel has room");
        }
        BufPool { tx, rx, buf_size }
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Takes a buffer (length reset to its capacity), waiting for one to be returned if all are in use.
    pub fn get(&self) -> AlignedBuf {
        let mut b = self.rx.recv().expect("the pool holds its own sender, so it never disconnects");
        let cap = b.capacity();
        b.set_len(cap);
        b
    }

    /// Takes a buffer if one is free.
    pub fn try_get(&self) -> Option<AlignedBuf> {
        self.rx.try_recv().ok().map(|mut b| {
            let cap = b.capacity();
            b.set_len(cap);
            b
        })
    }

    /// Returns a buffer to the pool. Buffers of another size, or beyond the pool's capacity, are dropped.
    pub fn put(&self, buf: AlignedBuf) {
        if buf.capacity() == self.buf_size.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN {
            let _ = self.tx.try_send(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_recycled() {
        let pool = BufPool::new(2, 10_000);
        let mut a = pool.get();
        assert_eq!(a.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(a.len(), 12_288);
        assert!(a.iter().all(|&b| b == 0));
        a.set_len(5);
        a.copy_from_slice(b"hello");
        let _b = pool.get();
        assert!(pool.try_get().is_none(), "pool of two is empty after two gets");
        pool.put(a);
        let again = pool.get();
        assert_eq!(again.len(), 12_288, "length is reset on get");
        assert_eq!(&again[..5], b"hello");
    }
}
