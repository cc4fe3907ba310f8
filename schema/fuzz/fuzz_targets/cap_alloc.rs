//! A capping global allocator for the fuzz targets. Without a sanitizer,
//! libFuzzer cannot hook malloc, so its `-malloc_limit_mb` does nothing and
//! `-rss_limit_mb` only notices a blow-up once the pages are touched. This
//! allocator aborts — which libFuzzer reports as a crash and saves the input
//! for — when one allocation asks for more than [`MALLOC_LIMIT`] or the live
//! total would pass [`LIVE_LIMIT`]. `scripts/fuzz.sh` passes the same
//! figures to libFuzzer (`-malloc_limit_mb=256 -rss_limit_mb=2048`).
//!
//! This is the one copy: the other fuzz crates include it with
//! `#[path = "…/schema/fuzz/fuzz_targets/cap_alloc.rs"] mod cap_alloc;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Largest single allocation: 256 MiB.
pub const MALLOC_LIMIT: usize = 256 << 20;
/// Most bytes live at once: 2 GiB.
pub const LIVE_LIMIT: usize = 2048 << 20;

pub struct Capped;

static LIVE: AtomicUsize = AtomicUsize::new(0);

fn over(what: &[u8]) -> ! {
    // Writing a static slice to the unbuffered stderr does not allocate.
    let _ = std::io::stderr().write_all(what);
    std::process::abort()
}

fn admit(size: usize) {
    if size > MALLOC_LIMIT {
        over(b"==cap_alloc== single allocation over the 256 MiB malloc limit\n");
    }
    if LIVE.fetch_add(size, Ordering::Relaxed) + size > LIVE_LIMIT {
        over(b"==cap_alloc== live allocations over the 2 GiB limit\n");
    }
}

#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        admit(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        admit(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            admit(new_size - layout.size());
            if new_size > MALLOC_LIMIT {
                over(b"==cap_alloc== single allocation over the 256 MiB malloc limit\n");
            }
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Capped = Capped;
