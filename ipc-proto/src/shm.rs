//! The shared activation region: one sealed memfd, mapped by the daemon and one worker.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::error::{ProtoError, Result};
use crate::types::{Limits, SetupMsg, MAX_SHM_BYTES};

const PAGE: u64 = 4096;

/// Where the two areas lie. Both start on a page boundary; the input area holds
/// `max_tokens * n_embd` f32 (one row per token), the output area `max_pairs * n_embd` f32
/// (one row per (token, expert) pair), row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmLayout {
    pub len: u64,
    pub input_offset: u64,
    pub output_offset: u64,
}

impl ShmLayout {
    /// The one layout the protocol allows for `limits`: input at 0, output at the next page
    /// boundary after the input area, the region ending at the page boundary after the
    /// output area.
    pub fn for_limits(limits: &Limits) -> Result<Self> {
        let page_round = |b: u64| b.div_ceil(PAGE) * PAGE;
        let output_offset = page_round(limits.input_area_bytes());
        let len = output_offset + page_round(limits.output_area_bytes());
        if len > MAX_SHM_BYTES || len == 0 {
            return Err(ProtoError::OutOfRange { what: "shared region bytes", max: MAX_SHM_BYTES, found: len });
        }
        Ok(ShmLayout { len, input_offset: 0, output_offset })
    }
}

/// A mapping of the shared region. The two areas are only ever accessed through the
/// connection objects, which hand out slices according to the protocol's ownership rule:
///
/// * the daemon owns the input area between evals (it writes it before `eval_begin`) and the
///   output area after `eval_end` returned;
/// * the worker owns the output area from receiving an eval until it sends `EvalDone`, and
///   reads the input area in that window.
///
/// A peer that breaks the rule (writes outside its window) can only make the values we read
/// meaningless; it cannot change the mapping's size (the memfd is sealed against shrinking and
/// growing) nor make us read outside it.
pub(crate) struct SharedRegion {
    ptr: NonNull<u8>,
    len: usize,
    layout: ShmLayout,
    limits: Limits,
}

// SAFETY: the region is a plain memory mapping owned by this value; moving it to another
// thread moves the only handle.
unsafe impl Send for SharedRegion {}

/// Which of the two areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Area {
    Input,
    Output,
}

impl SharedRegion {
    /// Daemon side: a fresh sealed memfd sized for `limits`, mapped read-write.
    pub(crate) fn create(limits: &Limits) -> Result<(Self, OwnedFd)> {
        let layout = ShmLayout::for_limits(limits)?;
        let fd = memfd_create(c"dflash-ipc", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
            .map_err(|e| ProtoError::io("memfd_create", e))?;
        let len = i64::try_from(layout.len)
            .map_err(|_| ProtoError::OutOfRange { what: "shared region bytes", max: i64::MAX as u64, found: layout.len })?;
        nix::unistd::ftruncate(&fd, len).map_err(|e| ProtoError::io("ftruncate memfd", e))?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).map_err(|e| ProtoError::io("seal memfd", e))?;
        let region = Self::map(&fd, layout, *limits)?;
        Ok((region, fd))
    }

    /// Worker side: checks that the layout announced in Setup is the one the limits fix,
    /// that the memfd has that size and is sealed against shrinking, then maps it.
    pub(crate) fn attach(fd: &OwnedFd, setup: &SetupMsg) -> Result<Self> {
        let want = ShmLayout::for_limits(&setup.limits)?;
        for (what, expected, found) in [
            ("shared region length", want.len, setup.shm_len),
            ("input area offset", want.input_offset, setup.input_offset),
            ("output area offset", want.output_offset, setup.output_offset),
        ] {
            if expected != found {
                return Err(ProtoError::Mismatch { what, expected, found });
            }
        }
        let st = nix::sys::stat::fstat(fd).map_err(|e| ProtoError::io("fstat shared memfd", e))?;
        if st.st_size as u64 != want.len {
            return Err(ProtoError::Mismatch { what: "shared memfd size", expected: want.len, found: st.st_size as u64 });
        }
        let seals = fcntl(fd, FcntlArg::F_GET_SEALS).map_err(|e| ProtoError::io("read memfd seals", e))?;
        let need = (SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW).bits();
        if seals & need != need {
            return Err(ProtoError::Mismatch { what: "shared memfd seals", expected: need as u64, found: seals as u64 });
        }
        Self::map(fd, want, setup.limits)
    }

    fn map(fd: &impl AsFd, layout: ShmLayout, limits: Limits) -> Result<Self> {
        let len = usize::try_from(layout.len).ok().and_then(NonZeroUsize::new).ok_or(ProtoError::OutOfRange {
            what: "shared region bytes",
            max: usize::MAX as u64,
            found: layout.len,
        })?;
        // SAFETY: a fresh shared mapping of a file we hold; no Rust object aliases it.
        let p = unsafe {
            mmap(None, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, fd, 0)
        }
        .map_err(|e| ProtoError::io("mmap shared region", e))?;
        Ok(SharedRegion { ptr: p.cast(), len: len.get(), layout, limits })
    }

    pub(crate) fn layout(&self) -> ShmLayout {
        self.layout
    }

    /// Offset and f32 count of the first `n_rows` rows of an area (token rows of the input
    /// area, pair rows of the output area).
    fn range(&self, area: Area, n_rows: usize) -> Result<(usize, usize)> {
        let (what, max, off) = match area {
            Area::Input => ("tokens in the input area", u64::from(self.limits.max_tokens), self.layout.input_offset),
            Area::Output => ("pairs in the output area", self.limits.max_pairs(), self.layout.output_offset),
        };
        if n_rows as u64 > max {
            return Err(ProtoError::OutOfRange { what, max, found: n_rows as u64 });
        }
        Ok((off as usize, n_rows * self.limits.n_embd as usize))
    }

    /// The first `n_rows` rows of an area.
    pub(crate) fn rows(&self, area: Area, n_rows: usize) -> Result<&[f32]> {
        let (off, n) = self.range(area, n_rows)?;
        debug_assert!(off + n * 4 <= self.len);
        // SAFETY: `off + n * 4 <= len` (the layout reserves max_tokens rows for the input area
        // and max_pairs rows for the output area, and `range` bounds `n_rows` by them); `off`
        // is page aligned so the f32 pointer is aligned; the borrow of `self` prevents a
        // mutable slice of this process from coexisting.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off).cast::<f32>(), n) })
    }

    /// The first `n_rows` rows of an area, writable.
    pub(crate) fn rows_mut(&mut self, area: Area, n_rows: usize) -> Result<&mut [f32]> {
        let (off, n) = self.range(area, n_rows)?;
        debug_assert!(off + n * 4 <= self.len);
        // SAFETY: as in `rows`, and `&mut self` makes this the only slice of this process.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off).cast::<f32>(), n) })
    }

    /// The first `n_tokens` input rows read-only and the first `n_pairs` output rows
    /// writable at once (the worker's view of an eval).
    pub(crate) fn io(&mut self, n_tokens: usize, n_pairs: usize) -> Result<(&[f32], &mut [f32])> {
        let (ioff, n_in) = self.range(Area::Input, n_tokens)?;
        let (ooff, n_out) = self.range(Area::Output, n_pairs)?;
        // SAFETY: the two areas do not overlap (output starts after the page-rounded input
        // area); bounds and alignment as in `rows`; `&mut self` excludes other slices.
        unsafe {
            let base = self.ptr.as_ptr();
            Ok((
                std::slice::from_raw_parts(base.add(ioff).cast::<f32>(), n_in),
                std::slice::from_raw_parts_mut(base.add(ooff).cast::<f32>(), n_out),
            ))
        }
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping created in `map`; no slice outlives `self`.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            tracing::warn!(error = %e, "munmap of the shared region failed");
        }
    }
}
