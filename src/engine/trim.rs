//! Giving the heap that closed connections freed back to the system.
//!
//! glibc's allocator keeps freed memory in its arenas for reuse; only the top of an arena is
//! returned by itself. A connection's allocations (its session, its subscriptions, buffers)
//! are scattered among everyone else's, so after thousands of connections close the engine
//! would keep their pages resident: 10,000 idle connections closing left 55 MiB behind
//! (`tests/faults.rs`). `malloc_trim(3)` walks every arena and hands whole free pages back
//! (`madvise(MADV_DONTNEED)`); the pages are faulted in again only if they are used again.
//!
//! A reactor calls [`release_free_heap`] at a quiet moment (about to sleep) once
//! [`TRIM_AFTER_CLOSES`] connections have closed on it since its last call: a mass disconnect
//! costs a few calls, steady churn one per that many closes, and a stable set of connections
//! none.

/// Connections a reactor sees close between two trims.
pub(crate) const TRIM_AFTER_CLOSES: u64 = 256;

/// Returns free heap pages of every arena to the system. A no-op where the C library has no
/// `malloc_trim`.
pub(crate) fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim(3) takes no pointer and has no precondition; it works on glibc's own
    // arenas under their locks, so it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
