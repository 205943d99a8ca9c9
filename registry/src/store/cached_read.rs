//! Reads of cache files that are already in the page cache, done on the calling (async) thread
//! without blocking it: `preadv2` with `RWF_NOWAIT` (Linux 4.14+) returns the bytes the page
//! cache holds and refuses, instead of waiting for the disk, when it holds none.
//!
//! A cached blob is usually served from memory, so a hop to the blocking pool per chunk (a
//! thread wake-up and two context switches) is most of the cost of reading it. Callers try
//! [`read_nowait`] first and go to the blocking pool only when it gives nothing. Where the
//! filesystem or the kernel does not support `RWF_NOWAIT`, the first read clears the caller's
//! [`NowaitSupport`] (one for the whole cache) and it is not tried again.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};

/// Whether `RWF_NOWAIT` reads still look supported for a file (cleared on the first
/// `EOPNOTSUPP`/`EINVAL`/`ENOSYS`).
#[derive(Debug)]
pub struct NowaitSupport(AtomicBool);

impl NowaitSupport {
    /// Supported until a read says otherwise (never outside Linux).
    #[must_use]
    pub const fn new() -> NowaitSupport {
        NowaitSupport(AtomicBool::new(cfg!(target_os = "linux")))
    }
}

impl Default for NowaitSupport {
    fn default() -> Self {
        NowaitSupport::new()
    }
}

/// Up to `len` bytes of `file` at `offset`, when the page cache holds at least the first of
/// them: fewer than `len` when only a prefix is cached. `None` when none is cached, at the end
/// of the file, on any error (the blocking read that follows reports it) or without support.
#[must_use]
pub fn read_nowait(file: &File, offset: u64, len: usize, support: &NowaitSupport) -> Option<Bytes> {
    if len == 0 || !support.0.load(Ordering::Relaxed) {
        return None;
    }
    let mut buf = BytesMut::zeroed(len);
    match preadv2_nowait(file, &mut buf, offset) {
        Ok(0) => None,
        Ok(n) => {
            buf.truncate(n);
            Some(buf.freeze())
        }
        Err(e) => {
            if matches!(
                e.raw_os_error(),
                Some(code) if code == libc_errno::EOPNOTSUPP
                    || code == libc_errno::EINVAL
                    || code == libc_errno::ENOSYS
            ) {
                support.0.store(false, Ordering::Relaxed);
                tracing::debug!(error = %e, "RWF_NOWAIT reads are not supported here; cached blobs are read on the blocking pool");
            }
            None
        }
    }
}

#[cfg(target_os = "linux")]
fn preadv2_nowait(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut bufs = [std::io::IoSliceMut::new(buf)];
    rustix::io::preadv2(file, &mut bufs, offset, rustix::io::ReadWriteFlags::NOWAIT)
        .map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn preadv2_nowait(_file: &File, _buf: &mut [u8], _offset: u64) -> std::io::Result<usize> {
    Err(std::io::Error::from_raw_os_error(libc_errno::ENOSYS))
}

/// The errno values [`read_nowait`] takes as "not supported" (Linux numbering; the same on the
/// other targets the registry builds for).
mod libc_errno {
    pub const EINVAL: i32 = 22;
    pub const ENOSYS: i32 = 38;
    pub const EOPNOTSUPP: i32 = 95;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::io::Write as _;

    #[test]
    fn a_file_just_written_is_read_from_the_page_cache_without_blocking() {
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&data).unwrap();
        let support = NowaitSupport::default();
        let got = read_nowait(&file, 1000, 50_000, &support);
        if !support.0.load(Ordering::Relaxed) {
            // tmpfs or a kernel without RWF_NOWAIT: nothing read, and not tried again.
            assert!(got.is_none());
            return;
        }
        let got = got.expect("freshly written pages are cached");
        assert_eq!(&got[..], &data[1000..1000 + got.len()]);
        assert!(!got.is_empty() && got.len() <= 50_000);
    }

    #[test]
    fn at_the_end_of_the_file_it_gives_nothing() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"abc").unwrap();
        let support = NowaitSupport::default();
        assert!(read_nowait(&file, 3, 10, &support).is_none());
        assert!(read_nowait(&file, 0, 0, &support).is_none());
    }
}
