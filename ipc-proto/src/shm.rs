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

/// A mapping of the shared region. The peer process maps the same pages and may write them
/// at any time (the protocol says when it should, a faulty or hostile peer need not obey), so
/// no Rust reference is ever made over the mapping: the bytes are copied in and out through
/// raw pointers at exactly two places, [`SharedRegion::write_rows`] and
/// [`SharedRegion::read_rows`], one copy each way. Which side copies which area when follows
/// the protocol's ownership rule, enforced by the connection objects:
///
/// * the daemon writes the input area before `eval_begin` and reads the output area after
///   `eval_end` returned;
/// * the worker reads the input area after receiving an eval and writes the output area
///   before sending `EvalDone`.
///
/// A peer that breaks the rule (writes outside its window) can only make the values we copy
/// meaningless (any bit pattern is a valid f32); it cannot change the mapping's size (the
/// memfd is sealed against shrinking and growing) nor make us copy outside it.
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

    /// Byte offset of `area` and the f32 count of `values` whole rows of it; refuses a
    /// count that is not whole rows or more rows than the area holds (`max_tokens` token rows
    /// in the input area, `max_pairs` pair rows in the output area).
    fn range(&self, area: Area, values: usize) -> Result<(usize, usize)> {
        let n_embd = self.limits.n_embd as usize;
        if !values.is_multiple_of(n_embd) {
            return Err(ProtoError::Mismatch {
                what: "f32 values of whole activation rows (a multiple of n_embd)",
                expected: (values - values % n_embd) as u64,
                found: values as u64,
            });
        }
        let n_rows = values / n_embd;
        let (what, max, off) = match area {
            Area::Input => ("tokens in the input area", u64::from(self.limits.max_tokens), self.layout.input_offset),
            Area::Output => ("pairs in the output area", self.limits.max_pairs(), self.layout.output_offset),
        };
        if n_rows as u64 > max {
            return Err(ProtoError::OutOfRange { what, max, found: n_rows as u64 });
        }
        let off = off as usize;
        debug_assert!(off + values * 4 <= self.len);
        Ok((off, values))
    }

    /// Copies `src` (whole rows of `n_embd` f32) into the first rows of `area`.
    pub(crate) fn write_rows(&mut self, area: Area, src: &[f32]) -> Result<()> {
        let (off, n) = self.range(area, src.len())?;
        // SAFETY: `off + n * 4 <= len` (the layout reserves max_tokens rows for the input area
        // and max_pairs rows for the output area, and `range` checked the row count against
        // them); `src` is our own memory, which the mapping cannot overlap. The destination is
        // only ever addressed through this raw pointer, never a reference.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off).cast::<f32>(), n) };
        Ok(())
    }

    /// Copies the first rows of `area` into `dst` (whole rows of `n_embd` f32).
    pub(crate) fn read_rows(&self, area: Area, dst: &mut [f32]) -> Result<()> {
        let (off, n) = self.range(area, dst.len())?;
        // SAFETY: bounds as in `write_rows`; `off` is page aligned and rows are whole f32, so
        // the source is aligned; the source is only addressed through this raw pointer, and
        // whatever the peer writes meanwhile, every bit pattern is a valid f32.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off).cast::<f32>(), dst.as_mut_ptr(), n) };
        Ok(())
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping created in `map`; no reference into it exists.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            tracing::warn!(error = %e, "munmap of the shared region failed");
        }
    }
}
