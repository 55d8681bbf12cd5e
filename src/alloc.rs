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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_keeps_its_bytes_across_the_threshold_both_ways() {
        let a = Allocator;
        let small = Layout::from_size_align(1000, 16).unwrap();
        unsafe {
            let p = a.alloc(small);
            assert!(!p.is_null());
            for i in 0..1000 {
                *p.add(i) = i as u8;
            }
            let big = a.realloc(p, small, LARGE * 2);
            assert!(!big.is_null());
            assert_eq!(big as usize % 16, 0);
            assert!((0..1000).all(|i| *big.add(i) == i as u8));
            *big.add(LARGE * 2 - 1) = 7;
            let big_layout = Layout::from_size_align(LARGE * 2, 16).unwrap();
            let back = a.realloc(big, big_layout, 500);
            assert!((0..500).all(|i| *back.add(i) == i as u8));
            a.dealloc(back, Layout::from_size_align(500, 16).unwrap());
            let zeroed = a.alloc_zeroed(big_layout);
            assert!((0..LARGE * 2).all(|i| *zeroed.add(i) == 0));
            a.dealloc(zeroed, big_layout);
        }
    }
}
