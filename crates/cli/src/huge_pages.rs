//! The process's allocator: the system one, with every large block offered transparent huge pages.
//!
//! The engine's activations at 512 × 512 are tens of MiB each and freshly allocated per operation;
//! glibc maps blocks that large anew every time, and the kernel then faults them in 4 KiB at a time.
//! On Linux with transparent huge pages in `madvise` mode (the common default) `MADV_HUGEPAGE` lets
//! those blocks fault in 2 MiB at a time: 512 times fewer faults, and fewer TLB misses for the strided
//! reads of the convolution and attention kernels. glibc does the same with
//! `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, but only when set before the process starts. Measured on
//! the bf16 product of a 512² UNet feed-forward layer (8192 × 2560 × 320, fresh output each call):
//! 45 → 22 ms with that setting (the time of a product into an already-touched buffer), 73 → 41 ms
//! with this allocator in a slower minute of the same VM. Elsewhere this is the plain system allocator.
//!
//! Freed large blocks are also kept, up to [`CACHE_BYTES`] in all (the longest-kept freed first to make
//! room), and handed out again for the next request of the same size (sizes rounded up to whole 2 MiB
//! pages); a request the cache cannot serve first frees as much of it as it takes, so the cache adds
//! little to the process's peak memory (80 MB on a 512² UNet step, where keeping 256 MiB without that
//! rule added 250 MB). A UNet step asks for the same few activation sizes over and over, and a kept
//! block is already faulted in, where a fresh one has every page cleared by the kernel first (a tenth
//! of a bf16 512² step's CPU time on an AMD EPYC VM).
//!
//! Blocks below [`LARGE`] are glibc's: by default it maps any block above a threshold that grows only
//! to 32 MiB anew each time, and gives the top of its heap back to the kernel at every free past 128 KiB,
//! so the next step's activations are faulted in and cleared again. [`tune_system_allocator`] makes it
//! keep its heap instead (measured on a 512² SD 1.5 UNet step, 2 Zen 5 cores held to AVX2: 7.7 → 6.8 s,
//! peak +30 MiB), and [`give_back_free_memory`] returns what is free to the kernel once a generation
//! ends, so an idle server does not hold the memory its last request used.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Blocks at least this large are advised (the interior 2 MiB pages of one).
const LARGE: usize = 8 << 20;
/// A transparent huge page.
const HUGE_PAGE: usize = 2 << 20;

/// Freed large blocks kept for reuse take at most this many bytes.
const CACHE_BYTES: usize = 256 << 20;
/// How many freed blocks can be kept.
const SLOTS: usize = 32;

/// [`System`] plus `MADV_HUGEPAGE` on large blocks and a small cache of freed ones.
pub struct HugePages;

/// A kept block: address, size, alignment, and when it was kept (0 for an empty slot).
#[derive(Clone, Copy)]
struct Kept {
    ptr: usize,
    size: usize,
    align: usize,
    stamp: u64,
}

const EMPTY: Kept = Kept {
    ptr: 0,
    size: 0,
    align: 0,
    stamp: 0,
};

/// Freed large blocks, their total size, and the next stamp.
struct Cache {
    slots: [Kept; SLOTS],
    bytes: usize,
    clock: u64,
}

impl Cache {
    /// Takes the longest-kept block out of the cache (the caller frees it), if there is one.
    fn evict_oldest(&mut self) -> Option<Kept> {
        let oldest = (0..SLOTS)
            .filter(|&i| self.slots[i].size != 0)
            .min_by_key(|&i| self.slots[i].stamp)?;
        let kept = std::mem::replace(&mut self.slots[oldest], EMPTY);
        self.bytes -= kept.size;
        Some(kept)
    }
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    slots: [EMPTY; SLOTS],
    bytes: 0,
    clock: 0,
});

/// The size a large block of `size` bytes is really allocated with: whole 2 MiB pages, so that blocks
/// of nearly equal sizes can stand in for each other.
fn rounded(size: usize) -> usize {
    if size >= LARGE {
        size.next_multiple_of(HUGE_PAGE)
    } else {
        size
    }
}

/// A kept block of exactly `size` bytes aligned to `align`, if there is one.
fn take(size: usize, align: usize) -> Option<*mut u8> {
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let slot = cache
        .slots
        .iter()
        .position(|k| k.size == size && k.ptr.is_multiple_of(align))?;
    let kept = std::mem::replace(&mut cache.slots[slot], EMPTY);
    cache.bytes -= size;
    Some(kept.ptr as *mut u8)
}

/// Keeps a freed block of `size` bytes (rounded) with alignment `align`, freeing the longest-kept
/// blocks to make room; false if it is too large to keep (the caller frees it).
fn keep(ptr: *mut u8, size: usize, align: usize) -> bool {
    if size > CACHE_BYTES {
        return false;
    }
    let mut evicted = [EMPTY; SLOTS];
    let kept = {
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        while cache.bytes + size > CACHE_BYTES || cache.slots.iter().all(|k| k.size != 0) {
            let Some(oldest) = cache.evict_oldest() else {
                break;
            };
            evicted[n] = oldest;
            n += 1;
        }
        cache.clock += 1;
        let stamp = cache.clock;
        // There is a free slot now (the loop above emptied one if all were taken).
        match cache.slots.iter().position(|k| k.size == 0) {
            Some(slot) => {
                cache.slots[slot] = Kept {
                    ptr: ptr as usize,
                    size,
                    align,
                    stamp,
                };
                cache.bytes += size;
                true
            }
            None => false,
        }
    };
    release(&evicted);
    kept
}

/// Frees the longest-kept blocks until at least `size` bytes are freed or none are left: called before
/// a large block is allocated afresh, so that the cache gives back what the new block takes and the
/// process's resident memory only grows when the cache is empty (its peak stays near that of the live
/// blocks).
fn shrink(size: usize) {
    let mut evicted = [EMPTY; SLOTS];
    {
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let (mut n, mut freed) = (0, 0);
        while freed < size {
            let Some(oldest) = cache.evict_oldest() else {
                break;
            };
            freed += oldest.size;
            evicted[n] = oldest;
            n += 1;
        }
    }
    release(&evicted);
}

/// Returns evicted blocks (empty slots skipped) to `System`.
fn release(evicted: &[Kept]) {
    for block in evicted.iter().filter(|k| k.size != 0) {
        // SAFETY: a block this allocator got from `System` with this size and alignment, freed by its
        // owner and no longer in the cache.
        unsafe {
            System.dealloc(
                block.ptr as *mut u8,
                Layout::from_size_align_unchecked(block.size, block.align),
            )
        };
    }
}

/// Sets glibc's malloc to keep freed memory in its heap during a generation: no fresh mapping for
/// blocks up to 1 GiB (they come from the heap and go back to it) and no trimming of the heap's top at
/// each free. Elsewhere (other C libraries) nothing changes.
pub fn tune_system_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: plain settings of glibc's malloc, allowed at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Frees the blocks kept for reuse and hands glibc's free heap pages back to the kernel: called when a
/// generation ends, so the process's resident memory falls back to its models between requests.
pub fn give_back_free_memory() {
    shrink(usize::MAX);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: releases only memory malloc holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Advises the whole 2 MiB pages inside `size` bytes at `ptr` to be backed by huge pages. Advice only:
/// a kernel without transparent huge pages refuses it and nothing changes.
fn advise(ptr: *mut u8, size: usize) {
    if ptr.is_null() || size < LARGE {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
        let end = (ptr as usize + size) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside a block this allocator just handed out; the advice does
            // not change its contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
}

// SAFETY: blocks come from `System` with their size rounded by `rounded` (and are returned to it with
// the same rounded size), or from the cache, which only holds such blocks after their owner freed them
// and hands each out once; `advise` only adds advice on a block.
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let size = rounded(layout.size());
        if size >= LARGE {
            if let Some(ptr) = take(size, layout.align()) {
                return ptr;
            }
            shrink(size);
        }
        // SAFETY: a non-zero size (at least the caller's) with the caller's alignment.
        let ptr = unsafe { System.alloc(Layout::from_size_align_unchecked(size, layout.align())) };
        advise(ptr, size);
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let size = rounded(layout.size());
        if size >= LARGE {
            if let Some(ptr) = take(size, layout.align()) {
                // SAFETY: the block has `size` bytes.
                unsafe { ptr.write_bytes(0, size) };
                return ptr;
            }
            shrink(size);
        }
        // SAFETY: as in `alloc`.
        let ptr =
            unsafe { System.alloc_zeroed(Layout::from_size_align_unchecked(size, layout.align())) };
        advise(ptr, size);
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let size = rounded(layout.size());
        if size >= LARGE && keep(ptr, size, layout.align()) {
            return;
        }
        // SAFETY: the pointer `alloc` returned for this layout, with the size it allocated.
        unsafe { System.dealloc(ptr, Layout::from_size_align_unchecked(size, layout.align())) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old, new) = (rounded(layout.size()), rounded(new_size));
        if old == new {
            return ptr;
        }
        // SAFETY: the block as it was allocated (rounded size, the caller's alignment).
        let ptr = unsafe {
            System.realloc(
                ptr,
                Layout::from_size_align_unchecked(old, layout.align()),
                new,
            )
        };
        advise(ptr, new);
        ptr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kept block stays kept until the generation ends, and then goes back.
    #[test]
    fn kept_blocks_are_given_back_when_a_generation_ends() {
        let size = LARGE + 3 * HUGE_PAGE;
        // SAFETY: a non-zero size with a valid alignment.
        let ptr = unsafe { System.alloc(Layout::from_size_align(size, 4096).unwrap()) };
        assert!(!ptr.is_null());
        let held = |ptr: *mut u8| {
            let cache = CACHE.lock().unwrap();
            cache.slots.iter().any(|k| k.ptr == ptr as usize)
        };
        assert!(keep(ptr, size, 4096));
        assert!(held(ptr));
        give_back_free_memory();
        assert!(!held(ptr));
    }
}
