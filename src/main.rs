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
/// and the freeing has stopped for a moment (or every few seconds during long work), so a
/// busy agent does not fault its pages back in at every step. The thread sleeps (parked, no
/// timer) until the count of freed bytes crosses a MiB, so an idle agent never wakes it; after
/// a trim it looks once more a few seconds on, for what the end of the work freed.
///
/// Blocks of a MiB or more are mapped on their own (`M_MMAP_THRESHOLD`), and unmapped when
/// freed. glibc starts at 128 KiB but raises that bound to the size of each large block freed,
/// so after the first, the large and short-lived buffers of a sync (a listing, a snapshot's
/// encoding) were carved from the heap among the small blocks that outlive them, and left it
/// in free pieces whose edges stay resident. Fixed at a MiB: idle after a first sync of
/// 100,000 files, server 30.5 → 27.5 MiB and client 27.5 → 23.8 MiB; their peaks 69 → 55 and
/// 62 → 56 MiB.
///
/// One arena for every thread (`M_ARENA_MAX`): glibc gives each thread that allocates an arena
/// of its own, and each kept half a MiB or so resident of what its thread had freed. The
/// agents' threads allocate little and rarely at once, so they do not queue on the one lock.
///
/// Only the binary does this (the library keeps unsafe code to `core::text`), and only on
/// glibc: musl's and bionic's allocators map large blocks on their own and return memory by
/// themselves.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::sync::OnceLock;
    use std::thread::Thread;
    use std::time::Duration;

    #[global_allocator]
    static ALLOC: Counting = Counting;

    /// Bytes freed (or moved away from by a reallocation) since the last trim.
    static FREED: AtomicUsize = AtomicUsize::new(0);

    /// The trimming thread, woken when `FREED` crosses `WORTH`.
    static TRIMMER: OnceLock<Thread> = OnceLock::new();

    /// Counts `n` freed bytes, waking the trimming thread when they cross `WORTH`
    /// (`unpark` neither allocates nor blocks).
    #[inline(always)]
    fn freed(n: usize) {
        let before = FREED.fetch_add(n, Relaxed);
        if before < WORTH && before + n >= WORTH {
            wake_trimmer();
        }
    }

    /// Out of line: every free in the program goes through `freed`.
    #[cold]
    #[inline(never)]
    fn wake_trimmer() {
        if let Some(t) = TRIMMER.get() {
            t.unpark();
        }
    }

    /// Less than this freed is not worth a trim.
    const WORTH: usize = 1 << 20;
    /// Blocks at least this large are mapped on their own (see above).
    const MMAP_THRESHOLD: i32 = 1 << 20;
    /// `mallopt`'s parameter for it (glibc's malloc.h).
    const M_MMAP_THRESHOLD: i32 = -3;
    /// `mallopt`'s parameter for the most arenas (glibc's malloc.h).
    const M_ARENA_MAX: i32 = -8;
    /// How often the thread looks.
    const TICK: Duration = Duration::from_secs(1);
    /// After a trim, the wait before the one that takes what the end of the work freed.
    const TAIL: Duration = Duration::from_secs(3);
    /// During steady work, a trim at least this many ticks apart.
    const BUSY_TICKS: u32 = 10;

    extern "C" {
        /// glibc: returns the free memory at the top of the heap and every free page inside
        /// it to the system.
        fn malloc_trim(pad: usize) -> i32;
        /// glibc: sets one of malloc's parameters; 0 if it was refused.
        fn mallopt(param: i32, value: i32) -> i32;
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

        // Out of line (and `realloc` too): inlined into every free in the program, the count
        // grew the binary by some 400 KiB.
        #[inline(never)]
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            freed(layout.size());
            unsafe { System.dealloc(ptr, layout) }
        }

        #[inline(never)]
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let moved = unsafe { System.realloc(ptr, layout, new_size) };
            if !moved.is_null() {
                freed(layout.size());
            }
            moved
        }
    }

    /// Starts the trimming thread (before any other thread, so it must block the signals
    /// `crate::signals` waits for itself: they go to whichever thread has them unblocked).
    pub fn start() {
        // SAFETY: called before any other thread exists; it only sets a malloc parameter.
        if unsafe { mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) } == 0 {
            eprintln!("ferry: cannot set malloc's mmap threshold");
        }
        // SAFETY: as above.
        if unsafe { mallopt(M_ARENA_MAX, 1) } == 0 {
            eprintln!("ferry: cannot set malloc's arena count");
        }
        let spawned = std::thread::Builder::new()
            .name("heap-trim".into())
            .spawn(|| {
                let _ = nix::sys::signal::SigSet::all().thread_block();
                loop {
                    // Asleep until a MiB has been freed (`park` may also return early).
                    std::thread::park();
                    if FREED.load(Relaxed) < WORTH {
                        continue;
                    }
                    // Then until the freeing settles, or at most BUSY_TICKS during long work.
                    let mut last = FREED.load(Relaxed);
                    for _ in 1..BUSY_TICKS {
                        std::thread::sleep(TICK);
                        let now = FREED.load(Relaxed);
                        if now == last {
                            break;
                        }
                        last = now;
                    }
                    FREED.store(0, Relaxed);
                    // SAFETY: malloc_trim only releases free pages; it is thread-safe.
                    unsafe { malloc_trim(0) };
                    // What is freed as the work winds down (the last batch, a map folded at
                    // its end) is less than WORTH and would stay resident: one more trim once
                    // it has settled. An idle agent is not woken again.
                    std::thread::sleep(TAIL);
                    if FREED.load(Relaxed) < WORTH && FREED.swap(0, Relaxed) > 0 {
                        // SAFETY: as above.
                        unsafe { malloc_trim(0) };
                    }
                }
            });
        match spawned {
            Ok(handle) => {
                let _ = TRIMMER.set(handle.thread().clone());
                // In case the count crossed before the thread could be woken.
                handle.thread().unpark();
            }
            Err(e) => eprintln!("ferry: cannot start the heap trimming thread: {e}"),
        }
    }
}
