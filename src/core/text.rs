//! `SharedStr`: an immutable string shared by reference count, behind one pointer, with an
//! 8-byte header. It holds the text of every path (`RelPath`), a key in every map of an agent's
//! index, so its header is paid once per tracked file: `Arc<str>` takes two pointers in each
//! map slot and a 16-byte header, `arcstr::ArcStr` one pointer and a 16-byte header. Here the
//! count and the length are `u32`s (a path is at most a few KiB, and no path is held four
//! billion times). glibc's heap chunks grow by 16 bytes, so half of all path lengths land in a
//! chunk 16 bytes smaller (an 11-byte path: 32 bytes, not 48), 8 bytes a path on average.

#![allow(unsafe_code)]

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};

/// The allocation's start: the text follows it.
#[repr(C)]
struct Header {
    count: AtomicU32,
    len: u32,
}

/// More references than this abort the process, as `Arc` does, so the count cannot wrap.
const MAX_COUNT: u32 = i32::MAX as u32;

/// An immutable, reference-counted string, one pointer wide. Clones share the text.
pub struct SharedStr(NonNull<Header>);

// SAFETY: the text is never written after `new`, and the count is atomic, as in `Arc<str>`.
unsafe impl Send for SharedStr {}
// SAFETY: as above; `&SharedStr` only ever reads.
unsafe impl Sync for SharedStr {}

impl SharedStr {
    fn layout(len: usize) -> Layout {
        Layout::from_size_align(size_of::<Header>() + len, align_of::<Header>())
            .expect("a path's length fits a layout")
    }

    /// A new allocation holding a copy of `s`.
    pub fn new(s: &str) -> SharedStr {
        let len = u32::try_from(s.len()).expect("shared text is shorter than 4 GiB");
        let layout = Self::layout(s.len());
        // SAFETY: the layout is never zero-sized (it holds the header). The header is written
        // whole, then `len` bytes after it, all within the allocation.
        unsafe {
            let Some(p) = NonNull::new(alloc(layout).cast::<Header>()) else {
                handle_alloc_error(layout)
            };
            p.as_ptr().write(Header {
                count: AtomicU32::new(1),
                len,
            });
            std::ptr::copy_nonoverlapping(s.as_ptr(), p.as_ptr().add(1).cast::<u8>(), s.len());
            SharedStr(p)
        }
    }

    fn header(&self) -> &Header {
        // SAFETY: the allocation lives as long as any reference to it, `self` among them.
        unsafe { self.0.as_ref() }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        let len = self.header().len as usize;
        // SAFETY: `new` copied `len` bytes of a `str` right after the header, never changed.
        unsafe {
            let text = self.0.as_ptr().add(1).cast::<u8>();
            std::str::from_utf8_unchecked(std::slice::from_raw_parts(text, len))
        }
    }

    /// Whether `a` and `b` share one allocation.
    pub fn ptr_eq(a: &SharedStr, b: &SharedStr) -> bool {
        a.0 == b.0
    }
}

impl Clone for SharedStr {
    fn clone(&self) -> SharedStr {
        // Relaxed, as in `Arc::clone`: a new reference is made from an existing one, which
        // keeps the allocation alive meanwhile.
        if self.header().count.fetch_add(1, Ordering::Relaxed) > MAX_COUNT {
            std::process::abort();
        }
        SharedStr(self.0)
    }
}

impl Drop for SharedStr {
    fn drop(&mut self) {
        // As `Arc::drop`: the last reference frees, after every other reference's use.
        if self.header().count.fetch_sub(1, Ordering::Release) != 1 {
            return;
        }
        fence(Ordering::Acquire);
        let layout = Self::layout(self.header().len as usize);
        // SAFETY: this was the last reference; the allocation was made with this layout.
        unsafe { dealloc(self.0.as_ptr().cast::<u8>(), layout) }
    }
}

impl Deref for SharedStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for SharedStr {
    fn eq(&self, other: &SharedStr) -> bool {
        SharedStr::ptr_eq(self, other) || self.as_str() == other.as_str()
    }
}

impl Eq for SharedStr {}

impl PartialOrd for SharedStr {
    fn partial_cmp(&self, other: &SharedStr) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SharedStr {
    fn cmp(&self, other: &SharedStr) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

/// Hashes as its text does, as `Borrow<str>` requires of a map key.
impl Hash for SharedStr {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.as_str().hash(h);
    }
}

impl fmt::Debug for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for SharedStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(s: &SharedStr) -> u32 {
        s.header().count.load(Ordering::Relaxed)
    }

    #[test]
    fn it_holds_its_text_and_shares_it() {
        for text in ["", "a", "photos/2026/cat.jpg", &"é/".repeat(1500)] {
            let a = SharedStr::new(text);
            assert_eq!(a.as_str(), text);
            let b = a.clone();
            assert!(SharedStr::ptr_eq(&a, &b));
            assert_eq!(count(&a), 2);
            drop(b);
            assert_eq!(count(&a), 1);
            let c = SharedStr::new(text);
            assert!(!SharedStr::ptr_eq(&a, &c));
            assert_eq!(a, c);
        }
        assert_eq!(size_of::<SharedStr>(), size_of::<usize>());
        assert_eq!(size_of::<Option<SharedStr>>(), size_of::<usize>());
    }

    #[test]
    fn it_orders_and_hashes_as_its_text() {
        use std::collections::hash_map::DefaultHasher;
        let (a, b) = (SharedStr::new("a/b"), SharedStr::new("a0"));
        assert!(a < b && "a/b" < "a0");
        let h = |x: &dyn Fn(&mut DefaultHasher)| {
            let mut h = DefaultHasher::new();
            x(&mut h);
            h.finish()
        };
        assert_eq!(h(&|s| a.hash(s)), h(&|s| "a/b".hash(s)));
        assert_eq!(format!("{a} {a:?}"), "a/b \"a/b\"");
    }

    #[test]
    fn clones_dropped_on_many_threads_free_it_once() {
        let s = SharedStr::new("shared/between/threads");
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    let n = if cfg!(miri) { 100 } else { 10_000 };
                    let mine: Vec<SharedStr> = (0..n).map(|_| s.clone()).collect();
                    assert!(mine.iter().all(|m| m.as_str() == "shared/between/threads"));
                });
            }
        });
        assert_eq!(count(&s), 1);
    }
}
