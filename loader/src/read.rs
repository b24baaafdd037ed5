//! Tensor bytes from the file into ggml backend buffers: several threads doing large
//! positioned reads in file order (buffered, `O_DIRECT`, or copies out of an mmap), straight
//! into host buffers or through a per-thread staging buffer for device memory. Host
//! destinations are faulted in a chunk at a time just before each read (fresh buffer memory
//! is otherwise faulted page by page inside the copy). Which tensors, which experts of an
//! expert tensor, and which buffer type are the caller's choice.
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ggml::{sys, Buffer, Context};

use crate::{LoadError, ModelFile, TensorInfo};

/// One tensor to load; `experts` selects slices along the last dimension of an expert
/// tensor ({in, out, n_expert}), in the order given (the loaded tensor's slice i holds
/// expert `experts[i]`).
#[derive(Clone, Debug)]
pub struct TensorRequest {
    pub name: String,
    pub experts: Option<Vec<u32>>,
}

impl TensorRequest {
    pub fn whole(name: impl Into<String>) -> TensorRequest {
        TensorRequest { name: name.into(), experts: None }
    }

    pub fn experts(name: impl Into<String>, experts: Vec<u32>) -> TensorRequest {
        TensorRequest { name: name.into(), experts: Some(experts) }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// Parallel buffered `pread` straight into host destinations (the default).
    Pread,
    /// Parallel `O_DIRECT` reads into aligned per-thread staging buffers, copied into the
    /// destination: the page cache is bypassed, so the weights are not held twice in memory
    /// (for models near the size of RAM). Falls back to [`ReadMode::Pread`] where the file
    /// system refuses `O_DIRECT` (tmpfs, some network file systems).
    Direct,
    /// Copy out of a read-only memory map (fallback for files `pread` cannot serve). The
    /// kernel copies (`process_vm_readv`), so a file truncated while mapped gives an error,
    /// not SIGBUS.
    Mmap,
}

#[derive(Clone, Debug)]
pub struct ReadOptions {
    pub threads: usize,
    pub chunk_bytes: usize,
    pub mode: ReadMode,
    /// Show a progress bar on stderr if loading takes longer than a second.
    pub progress: bool,
}

impl Default for ReadOptions {
    /// Buffered reads of 8 MiB chunks by twice as many threads as cores (at least 4, at
    /// most 16): the threads spend much of their time blocked on the device or on faults
    /// into fresh memory, so more of them than cores keeps both busy (BENCHMARKS.md, "Load").
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(4);
        let threads = (2 * cores).clamp(4, 16);
        ReadOptions { threads, chunk_bytes: 8 << 20, mode: ReadMode::Pread, progress: true }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ReadStats {
    pub bytes: u64,
    pub seconds: f64,
}

impl ReadStats {
    pub fn gb_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e9
        } else {
            0.0
        }
    }
}

/// Tensors allocated in one backend buffer, filled from the file.
pub struct LoadedTensors {
    // Field order: the buffer is freed before the context that describes its tensors.
    buffer: Buffer,
    _ctx: Context,
    tensors: HashMap<String, *mut sys::ggml_tensor>,
    pub stats: ReadStats,
}

// SAFETY: the tensors are owned by `_ctx` and `buffer`, which move with this value.
unsafe impl Send for LoadedTensors {}

impl LoadedTensors {
    pub fn get(&self, name: &str) -> Option<*mut sys::ggml_tensor> {
        self.tensors.get(name).copied()
    }

    pub fn buffer(&self) -> &Buffer {
        &self.buffer
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }
}

/// `len` bytes at file offset `src`.
#[derive(Clone, Copy, Debug)]
struct Piece {
    src: u64,
    len: u64,
}

/// One copy into `tensor` at `dst_off`: the bytes of `pieces`, one after the other. A job
/// of a host buffer has one piece (written in place); a job of a whole-tensor buffer has all
/// the tensor's pieces (gathered, then set at once).
struct Job {
    pieces: Vec<Piece>,
    tensor: *mut sys::ggml_tensor,
    dst_off: u64,
}

impl Job {
    fn len(&self) -> u64 {
        self.pieces.iter().map(|p| p.len).sum()
    }

    fn src(&self) -> u64 {
        self.pieces.first().map_or(0, |p| p.src)
    }
}

struct Jobs(Vec<Job>);
// SAFETY: jobs write disjoint byte ranges of tensors that outlive the worker threads.
unsafe impl Sync for Jobs {}

impl Jobs {
    fn get(&self, i: usize) -> Option<&Job> {
        self.0.get(i)
    }
}

fn new_tensor(ctx: &Context, info: &TensorInfo, last_dim: Option<u64>) -> *mut sys::ggml_tensor {
    let mut ne: Vec<i64> = info.shape().iter().map(|&d| d as i64).collect();
    if let Some(n) = last_dim {
        *ne.last_mut().expect("a shape has a dimension") = n as i64;
    }
    // SAFETY: the context has room for every requested tensor (sized by the caller), the
    // type is valid and the shape was validated against the file.
    unsafe {
        let t = sys::ggml_new_tensor(ctx.as_ptr(), info.ty.raw(), ne.len() as i32, ne.as_ptr());
        let name = std::ffi::CString::new(info.name.as_str()).unwrap_or_default();
        sys::ggml_set_name(t, name.as_ptr());
        t
    }
}

/// Allocate the requested tensors in one buffer of type `buft` and read their bytes.
pub fn load_tensors(
    model: &ModelFile,
    requests: &[TensorRequest],
    buft: ggml::BufferType,
    opts: &ReadOptions,
) -> Result<LoadedTensors, LoadError> {
    load_tensors_with(model, requests, buft, opts, TensorWrites::Ranges, &mut |_| {})
}

/// How a buffer type takes tensor bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorWrites {
    /// Any byte range at a time: the reader's pieces are set straight into the tensor.
    Ranges,
    /// Only a whole tensor per write (ggml's CPU_REPACK buffer re-lays each tensor out as it
    /// is set): each tensor (for an expert subset, its experts' slices one after the other)
    /// is read into a staging buffer and set at once.
    Whole,
}

/// [`load_tensors`] for a buffer type that takes its bytes as `writes` says, calling
/// `on_progress(bytes)` on the calling thread each time the bytes read so far have grown
/// (checked every 50 ms); the last call reports all of them.
pub fn load_tensors_with(
    model: &ModelFile,
    requests: &[TensorRequest],
    buft: ggml::BufferType,
    opts: &ReadOptions,
    writes: TensorWrites,
    on_progress: &mut dyn FnMut(u64),
) -> Result<LoadedTensors, LoadError> {
    load_impl(model, requests, buft, opts, writes == TensorWrites::Whole, on_progress)
}

fn load_impl(
    model: &ModelFile,
    requests: &[TensorRequest],
    buft: ggml::BufferType,
    opts: &ReadOptions,
    whole: bool,
    on_progress: &mut dyn FnMut(u64),
) -> Result<LoadedTensors, LoadError> {
    let ctx = Context::new_no_alloc(requests.len().max(1), 0)?;
    let mut tensors = HashMap::new();
    let mut plan: Vec<(&TensorInfo, *mut sys::ggml_tensor, Option<&[u32]>)> = Vec::new();
    for req in requests {
        let info = model.tensors.expect(&req.name)?;
        let t = match &req.experts {
            None => new_tensor(&ctx, info, None),
            Some(ids) => {
                let dim = info.shape().len() - 1;
                let n = info.ne[dim];
                if dim == 0 {
                    return Err(LoadError::TensorData { name: req.name.clone(), reason: "an expert subset needs a tensor of 2+ dimensions".into() });
                }
                let mut seen = std::collections::HashSet::new();
                for &e in ids {
                    if e as u64 >= n || !seen.insert(e) {
                        return Err(LoadError::TensorData {
                            name: req.name.clone(),
                            reason: format!("expert {e} is out of range [0, {n}) or repeated"),
                        });
                    }
                }
                new_tensor(&ctx, info, Some(ids.len() as u64))
            }
        };
        tensors.insert(req.name.clone(), t);
        plan.push((info, t, req.experts.as_deref()));
    }
    let buffer = Buffer::alloc_context_tensors(&ctx, buft)?;
    buffer.set_weights_usage();

    let chunk = opts.chunk_bytes.max(1 << 16) as u64;
    let mut jobs = Vec::new();
    for (info, t, experts) in &plan {
        // The tensor's bytes in the file, in the order they go into it.
        let pieces: Vec<Piece> = match experts {
            None => vec![Piece { src: info.offset, len: info.nbytes }],
            Some(ids) => {
                let slice = info.slice_bytes(info.shape().len() - 1);
                ids.iter().map(|&e| Piece { src: info.offset + e as u64 * slice, len: slice }).collect()
            }
        };
        if whole {
            jobs.push(Job { pieces, tensor: *t, dst_off: 0 });
            continue;
        }
        let mut dst_off = 0;
        for p in pieces {
            let mut done = 0;
            while done < p.len {
                let n = chunk.min(p.len - done);
                jobs.push(Job { pieces: vec![Piece { src: p.src + done, len: n }], tensor: *t, dst_off: dst_off + done });
                done += n;
            }
            dst_off += p.len;
        }
    }
    let stats = run_jobs(model, Jobs(jobs), buffer.is_host() && !whole, opts, on_progress)?;
    Ok(LoadedTensors { buffer, _ctx: ctx, tensors, stats })
}

fn io_err(model: &ModelFile, source: std::io::Error) -> LoadError {
    LoadError::Io { path: model.path.display().to_string(), source }
}

/// O_DIRECT transfers use this alignment for file offsets, lengths and memory (the largest
/// logical block size in common use; 512-byte devices accept it too).
const DIRECT_ALIGN: usize = 4096;

/// `madvise(MADV_POPULATE_WRITE)` (Linux 5.14), not yet in the `libc` crate.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Fault in `[ptr, ptr + len)` writable in one call, ahead of the copy into it. Freshly
/// allocated buffer memory is otherwise faulted page by page from inside the kernel's or
/// `memcpy`'s copy loop, which costs more than the copy itself. The range is widened to
/// whole pages; populating changes no byte, so the neighbours of the range are safe.
/// Returns false when the kernel or the mapping does not support it.
fn populate_write(ptr: *mut u8, len: usize) -> bool {
    let page = 4096usize;
    let start = ptr as usize & !(page - 1);
    let end = (ptr as usize).saturating_add(len);
    // SAFETY: advisory call over pages of a live mapping that this process owns (the range
    // holds `ptr..ptr+len`, part of a buffer we are about to overwrite); no byte changes.
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE) == 0 }
}

/// A zeroed heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Option<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(AlignedBuf { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `layout.size()` initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// Read file bytes `[src, src + len)` with O_DIRECT into `buf` (aligned, at least
/// `len + 2 * DIRECT_ALIGN` bytes); returns where in `buf` the requested bytes start.
fn read_direct(file: &File, buf: &mut [u8], src: u64, len: usize) -> std::io::Result<usize> {
    let align = DIRECT_ALIGN as u64;
    let first = src & !(align - 1);
    let skip = (src - first) as usize;
    let want = (skip + len).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    if want > buf.len() {
        let msg = format!("staging buffer of {} bytes, expected at least {want}", buf.len());
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg));
    }
    let mut got = 0usize;
    while got < skip + len {
        match file.read_at(&mut buf[got..want], first + got as u64) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("file ends at byte {} inside [{src}, {})", first + got as u64, src + len as u64),
                ))
            }
            // A short read not on a block boundary (only at end of file) cannot be continued
            // with O_DIRECT; the loop then ends or the next read reports the error.
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(skip)
}

fn open_direct(path: &std::path::Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok()
}

fn truncated(src: u64, len: u64, size: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("the file is now {size} bytes and ends inside [{src}, {}): it was truncated after it was opened", src + len),
    )
}

/// Copy `dst.len()` bytes at offset `src` of the read-only mapping `map` of `file` into `dst`. The
/// kernel does the copy (`process_vm_readv` on this process), so a page the file no longer
/// backs (truncated by another process after the size check) fails the call with EFAULT
/// instead of raising SIGBUS in this thread; and no Rust reference is ever made over the
/// mapped bytes, which another process may change.
fn copy_from_map(map: &memmap2::Mmap, file: &File, src: u64, dst: &mut [u8]) -> std::io::Result<()> {
    let len = dst.len() as u64;
    if src.checked_add(len).is_none_or(|end| end > map.len() as u64) {
        return Err(truncated(src, len, map.len() as u64));
    }
    let mut done = 0usize;
    while done < dst.len() {
        let rest = dst.len() - done;
        let local = libc::iovec { iov_base: dst[done..].as_mut_ptr().cast(), iov_len: rest };
        // SAFETY: only an address computed for the kernel: `src + done + rest` ≤ map.len().
        let remote = libc::iovec { iov_base: unsafe { map.as_ptr().add(src as usize + done) } as *mut libc::c_void, iov_len: rest };
        // SAFETY: `local` is `rest` writable bytes of `dst`; the kernel validates `remote`
        // and reports a bad page as an error.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EFAULT) => return Err(truncated(src + done as u64, rest as u64, file.metadata()?.len())),
                Some(libc::EPERM) | Some(libc::ENOSYS) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("mmap reads copy through process_vm_readv, which this system refuses ({e}); use the pread or direct read mode"),
                    ))
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(truncated(src + done as u64, rest as u64, file.metadata()?.len()));
        }
        done += n as usize;
    }
    Ok(())
}

/// Where the bytes come from, shared by the reading threads.
struct Source<'a> {
    file: &'a File,
    map: Option<&'a memmap2::Mmap>,
    direct: Option<&'a File>,
    /// Cleared (for every thread) when an O_DIRECT read is refused.
    direct_ok: &'a AtomicBool,
    /// Cleared when `MADV_POPULATE_WRITE` is refused.
    populate_ok: &'a AtomicBool,
}

/// One thread's staging buffers: `aligned` for O_DIRECT, `plain` for device and
/// whole-tensor buffers.
struct Staging {
    plain: Vec<u8>,
    aligned: Option<AlignedBuf>,
}

impl Source<'_> {
    /// Copy one job's bytes into its tensor: in place for host buffers, else gathered in
    /// `staging.plain` and set at once.
    fn load_job(&self, job: &Job, host: bool, staging: &mut Staging) -> std::io::Result<()> {
        let len = job.len() as usize;
        if host {
            // SAFETY: for host buffers the destination is the tensor's own memory, and jobs
            // cover disjoint ranges inside it (built from validated sizes); each job is
            // handled by one thread, which holds this slice only within this call.
            let dst = unsafe {
                let base = (*job.tensor).data as *mut u8;
                std::slice::from_raw_parts_mut(base.add(job.dst_off as usize), len)
            };
            if self.populate_ok.load(Ordering::Relaxed) && !populate_write(dst.as_mut_ptr(), len) {
                tracing::debug!("MADV_POPULATE_WRITE refused; pages fault during the copy");
                self.populate_ok.store(false, Ordering::Relaxed);
            }
            return self.read_pieces(&job.pieces, dst, &mut staging.aligned);
        }
        let mut gathered = std::mem::take(&mut staging.plain);
        gathered.resize(len, 0u8);
        self.read_pieces(&job.pieces, &mut gathered, &mut staging.aligned)?;
        // SAFETY: the range lies inside the tensor (validated sizes).
        unsafe { ggml::backend::tensor_set(job.tensor, &gathered, job.dst_off as usize) };
        staging.plain = gathered;
        Ok(())
    }

    /// Read `pieces` one after the other into `dst` (exactly their total length).
    fn read_pieces(&self, pieces: &[Piece], dst: &mut [u8], aligned: &mut Option<AlignedBuf>) -> std::io::Result<()> {
        let mut at = 0;
        for p in pieces {
            let n = p.len as usize;
            self.read_at(p.src, &mut dst[at..at + n], aligned)?;
            at += n;
        }
        Ok(())
    }

    /// Read `dst.len()` bytes at file offset `src`: with O_DIRECT through `aligned` where
    /// the file system allows it, else from the map or with `pread`.
    fn read_at(&self, src: u64, dst: &mut [u8], aligned: &mut Option<AlignedBuf>) -> std::io::Result<()> {
        let len = dst.len();
        if let (Some(f), Some(buf), true) = (self.direct, aligned.as_mut(), self.direct_ok.load(Ordering::Relaxed)) {
            match read_direct(f, buf.as_mut_slice(), src, len) {
                Ok(skip) => {
                    dst.copy_from_slice(&buf.as_mut_slice()[skip..skip + len]);
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!("O_DIRECT read refused ({e}); buffered reads");
                    self.direct_ok.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        match self.map {
            Some(m) => {
                // A file shortened since it was mapped: a clear error, not a fault.
                let size = self.file.metadata()?.len();
                if src + len as u64 > size {
                    return Err(truncated(src, len as u64, size));
                }
                copy_from_map(m, self.file, src, dst)
            }
            None => self.file.read_exact_at(dst, src),
        }
    }
}

fn run_jobs(model: &ModelFile, mut jobs: Jobs, host: bool, opts: &ReadOptions, on_progress: &mut dyn FnMut(u64)) -> Result<ReadStats, LoadError> {
    // File order: one sequential sweep whatever order the tensors were requested in.
    jobs.0.sort_by_key(Job::src);
    let total: u64 = jobs.0.iter().map(Job::len).sum();
    let file = File::open(&model.path).map_err(|e| io_err(model, e))?;
    // SAFETY: advisory call on an open descriptor.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    let map = match opts.mode {
        // SAFETY: the file is opened read-only, and the mapping is only read through
        // `copy_from_map` (the kernel copies; a truncated file gives an error, not SIGBUS).
        ReadMode::Mmap => Some(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_err(model, e))?),
        ReadMode::Pread | ReadMode::Direct => None,
    };
    // O_DIRECT where the file system supports it; buffered `pread` otherwise.
    let direct = match opts.mode {
        ReadMode::Direct => {
            let f = open_direct(&model.path);
            if f.is_none() {
                tracing::debug!(path = %model.path.display(), "O_DIRECT refused; buffered reads");
            }
            f
        }
        _ => None,
    };
    let direct_ok = AtomicBool::new(direct.is_some());
    let populate_ok = AtomicBool::new(host);
    // O_DIRECT reads one piece at a time.
    let max_piece = jobs.0.iter().flat_map(|j| j.pieces.iter().map(|p| p.len)).max().unwrap_or(0) as usize;
    let next = AtomicUsize::new(0);
    let done_bytes = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let error: Mutex<Option<LoadError>> = Mutex::new(None);
    let finished = AtomicUsize::new(0);
    let threads = opts.threads.max(1).min(jobs.0.len().max(1));
    let start = Instant::now();

    let src =
        Source { file: &file, map: map.as_ref(), direct: direct.as_ref(), direct_ok: &direct_ok, populate_ok: &populate_ok };
    let worker = || {
        let mut staging = Staging { plain: Vec::new(), aligned: None };
        if direct.is_some() {
            staging.aligned = AlignedBuf::new(max_piece + 2 * DIRECT_ALIGN);
        }
        loop {
            if failed.load(Ordering::Relaxed) {
                break;
            }
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(job) = jobs.get(i) else { break };
            if let Err(e) = src.load_job(job, host, &mut staging) {
                failed.store(true, Ordering::Relaxed);
                error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(io_err(model, e));
                break;
            }
            done_bytes.fetch_add(job.len(), Ordering::Relaxed);
        }
        finished.fetch_add(1, Ordering::Relaxed);
    };

    let mut reported = 0;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(worker);
        }
        let bar = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::hidden());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message("loading");
        let mut shown = false;
        while finished.load(Ordering::Relaxed) < threads {
            std::thread::sleep(Duration::from_millis(50));
            if opts.progress && !shown && start.elapsed() > Duration::from_secs(1) {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                shown = true;
            }
            let done = done_bytes.load(Ordering::Relaxed);
            bar.set_position(done);
            if done > reported {
                reported = done;
                on_progress(done);
            }
        }
        bar.finish_and_clear();
    });

    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if reported < total {
        on_progress(total);
    }
    Ok(ReadStats { bytes: total, seconds: start.elapsed().as_secs_f64() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mapping whose file is truncated after it was made: copying a page the file no
    /// longer backs is an error naming the new size, not SIGBUS; pages still inside copy.
    #[test]
    fn copy_from_a_truncated_mapping_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.bin");
        let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).expect("write");
        let file = File::open(&path).expect("open");
        // SAFETY: read only through copy_from_map.
        let map = unsafe { memmap2::Mmap::map(&file) }.expect("map");
        let mut dst = vec![0u8; 8192];
        copy_from_map(&map, &file, 500_000, &mut dst).expect("inside the file");
        assert_eq!(dst, bytes[500_000..508_192]);

        std::fs::OpenOptions::new().write(true).open(&path).expect("open rw").set_len(65_536).expect("truncate");
        let err = copy_from_map(&map, &file, 500_000, &mut dst).expect_err("past the new end");
        assert!(err.to_string().contains("now 65536 bytes") && err.to_string().contains("truncated"), "{err}");
        // Straddling the new end: the copy stops with an error too.
        let err = copy_from_map(&map, &file, 60_000, &mut dst).expect_err("straddles the new end");
        assert!(err.to_string().contains("truncated"), "{err}");
        copy_from_map(&map, &file, 4096, &mut dst).expect("still inside");
        assert_eq!(dst, bytes[4096..12_288]);
        // Past the mapping itself.
        let err = copy_from_map(&map, &file, (1 << 20) - 100, &mut dst).expect_err("past the mapping");
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
