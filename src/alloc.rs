//! The plugin's allocator under musl: dlmalloc for small blocks, musl's own for large ones.
//!
//! musl's allocator hands small blocks' memory back to the kernel eagerly (munmap, TLB flushes,
//! then faults to get it again), which cost a quarter of an ADD's work; dlmalloc keeps it for
//! the process's short life. A large block (a big policy's JSON, a netlink batch) goes to musl,
//! which maps it on its own and unmaps it when freed, as glibc does past its mmap threshold, so
//! a large policy's peak RSS does not grow by what dlmalloc would keep.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks this size and larger go to musl.
const LARGE: usize = 256 * 1024;

pub struct Allocator;

static SMALL: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn large(layout: Layout) -> bool {
    layout.size() >= LARGE
}

// SAFETY: each block is freed and resized by the allocator that made it, told apart by its
// size, which the caller passes back unchanged; a resize across the threshold copies.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match large(layout) {
            true => unsafe { System.alloc(layout) },
            false => unsafe { SMALL.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match large(layout) {
            true => unsafe { System.alloc_zeroed(layout) },
            false => unsafe { SMALL.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match large(layout) {
            true => unsafe { System.dealloc(ptr, layout) },
            false => unsafe { SMALL.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        match (large(layout), large(new_layout)) {
            (true, true) => unsafe { System.realloc(ptr, layout, new_size) },
            (false, false) => unsafe { SMALL.realloc(ptr, layout, new_size) },
            _ => {
                let new = unsafe { self.alloc(new_layout) };
                if !new.is_null() {
                    let kept = layout.size().min(new_size);
                    // SAFETY: distinct blocks, each at least `kept` bytes.
                    unsafe { std::ptr::copy_nonoverlapping(ptr, new, kept) };
                    unsafe { self.dealloc(ptr, layout) };
                }
                new
            }
        }
    }
}
