//! The `ferry` binary: parse, run, map the error to an exit code once.

use std::process::ExitCode;

fn main() -> ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    heap::start();
    match ferry::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Gives glibc's freed heap back to the system once freeing settles.
///
/// glibc's malloc keeps what a program frees for reuse and returns little of it: after a first
/// sync of 100,000 files, whose listings, journal batches and snapshots are freed again, each
/// agent sat idle on some 50 MiB of free heap (more than its whole index). `malloc_trim`
/// returns every free page. It is called from a small thread once a MiB or more was freed
/// and the freeing has stopped for a moment (or every few seconds during long work), so an
/// idle agent costs nothing and a busy one does not fault its pages back in at every step.
///
/// Only the binary does this (the library forbids unsafe code), and only on glibc: musl's and
/// bionic's allocators return memory by themselves.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::time::Duration;

    #[global_allocator]
    static ALLOC: Counting = Counting;

    /// Bytes freed (or moved away from by a reallocation) since the last trim.
    static FREED: AtomicUsize = AtomicUsize::new(0);

    /// Less than this freed is not worth a trim.
    const WORTH: usize = 1 << 20;
    /// How often the thread looks.
    const TICK: Duration = Duration::from_secs(1);
    /// During steady work, a trim at least this many ticks apart.
    const BUSY_TICKS: u32 = 10;

    extern "C" {
        /// glibc: returns the free memory at the top of the heap and every free page inside
        /// it to the system.
        fn malloc_trim(pad: usize) -> i32;
    }

    /// The system allocator, counting what is freed.
    struct Counting;

    // SAFETY: every call is passed on to `System` unchanged; only a counter is added.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            FREED.fetch_add(layout.size(), Relaxed);
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let moved = unsafe { System.realloc(ptr, layout, new_size) };
            if !moved.is_null() {
                FREED.fetch_add(layout.size(), Relaxed);
            }
            moved
        }
    }

    /// Starts the trimming thread (before any other thread, so it must block the signals
    /// `crate::signals` waits for itself: they go to whichever thread has them unblocked).
    pub fn start() {
        let spawned = std::thread::Builder::new()
            .name("heap-trim".into())
            .spawn(|| {
                let _ = nix::sys::signal::SigSet::all().thread_block();
                let (mut last, mut busy) = (0, 0);
                loop {
                    std::thread::sleep(TICK);
                    let freed = FREED.load(Relaxed);
                    if freed < WORTH {
                        continue;
                    }
                    busy += 1;
                    if freed != last && busy < BUSY_TICKS {
                        last = freed;
                        continue;
                    }
                    FREED.fetch_sub(freed, Relaxed);
                    (last, busy) = (0, 0);
                    // SAFETY: malloc_trim only releases free pages; it is thread-safe.
                    unsafe { malloc_trim(0) };
                }
            });
        if let Err(e) = spawned {
            eprintln!("ferry: cannot start the heap trimming thread: {e}");
        }
    }
}
