//! Devices, backends and buffers through ggml's generic registry API.
use std::ffi::{c_void, CStr, CString};
use std::path::Path;

use ggml_sys as sys;

use crate::{log, Context, GgmlError};

fn cstr(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: ggml returns NUL-terminated strings owned by the device/registry.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Load a backend module (e.g. `libggml-cuda.so` built with `GGML_BACKEND_DL`) and register
/// its devices. Returns the registry's name.
pub fn load_backend_module(path: &Path) -> Result<String, GgmlError> {
    let display = path.display().to_string();
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| GgmlError::ModuleLoad {
        path: display.clone(),
        reason: "path contains a NUL byte".into(),
    })?;
    // SAFETY: a valid C string; ggml returns NULL on failure and logs why.
    let (reg, why) = log::capture_errors(|| unsafe { sys::ggml_backend_load(c.as_ptr()) });
    if reg.is_null() {
        return Err(GgmlError::ModuleLoad {
            path: display,
            reason: if why.is_empty() { "ggml_backend_load returned nothing".into() } else { why },
        });
    }
    // SAFETY: non-null registry.
    Ok(cstr(unsafe { sys::ggml_backend_reg_name(reg) }))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Gpu,
    IntegratedGpu,
    Accelerator,
    Other,
}

/// A device ggml knows about (borrowed from ggml's static registry).
#[derive(Clone, Copy)]
pub struct Device {
    raw: sys::ggml_backend_dev_t,
}

// SAFETY: device handles are static registry entries, immutable after registration.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl Device {
    pub fn all() -> Vec<Device> {
        log::install();
        // SAFETY: indices below ggml_backend_dev_count are valid.
        let n = unsafe { sys::ggml_backend_dev_count() };
        (0..n).map(|i| Device { raw: unsafe { sys::ggml_backend_dev_get(i) } }).collect()
    }

    pub fn by_name(name: &str) -> Result<Device, GgmlError> {
        Device::all()
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| GgmlError::NoDevice(name.to_string()))
    }

    pub fn cpu() -> Result<Device, GgmlError> {
        Device::all().into_iter().find(|d| d.kind() == DeviceKind::Cpu).ok_or_else(|| GgmlError::NoDevice("CPU".into()))
    }

    pub fn name(&self) -> String {
        cstr(unsafe { sys::ggml_backend_dev_name(self.raw) })
    }

    pub fn description(&self) -> String {
        cstr(unsafe { sys::ggml_backend_dev_description(self.raw) })
    }

    pub fn kind(&self) -> DeviceKind {
        use sys::ggml_backend_dev_type as t;
        match unsafe { sys::ggml_backend_dev_type(self.raw) } {
            t::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
            t::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
            t::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
            t::GGML_BACKEND_DEVICE_TYPE_ACCEL => DeviceKind::Accelerator,
            _ => DeviceKind::Other,
        }
    }

    /// (free, total) bytes of device memory.
    pub fn memory(&self) -> (usize, usize) {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: out-pointers to locals.
        unsafe { sys::ggml_backend_dev_memory(self.raw, &mut free, &mut total) };
        (free, total)
    }

    /// The device's pinned host buffer type (e.g. CUDA's page-locked host memory, from which
    /// copies to the device run at full PCIe speed), if it has one.
    pub fn host_buffer_type(&self) -> Option<BufferType> {
        // SAFETY: a valid device handle.
        let raw = unsafe { sys::ggml_backend_dev_host_buffer_type(self.raw) };
        (!raw.is_null()).then(|| BufferType::from_raw(raw))
    }

    pub fn buffer_type(&self) -> BufferType {
        BufferType(unsafe { sys::ggml_backend_dev_buffer_type(self.raw) })
    }

    /// The device's extra buffer type called `name` (e.g. the CPU's `CPU_REPACK`), if its
    /// backend has one (asked through the registry's `ggml_backend_dev_get_extra_bufts`).
    pub fn extra_buffer_type(&self, name: &str) -> Option<BufferType> {
        type GetExtra = unsafe extern "C" fn(sys::ggml_backend_dev_t) -> *mut sys::ggml_backend_buffer_type_t;
        // SAFETY: registry lookups on a valid device; the entry point, when present, has the
        // signature above and returns a NULL-terminated array of static buffer types.
        unsafe {
            let reg = sys::ggml_backend_dev_backend_reg(self.raw);
            let f = sys::ggml_backend_reg_get_proc_address(reg, c"ggml_backend_dev_get_extra_bufts".as_ptr());
            if f.is_null() {
                return None;
            }
            let f: GetExtra = std::mem::transmute(f);
            let mut p = f(self.raw);
            while !p.is_null() && !(*p).is_null() {
                if cstr(sys::ggml_backend_buft_name(*p)) == name {
                    return Some(BufferType(*p));
                }
                p = p.add(1);
            }
            None
        }
    }

    /// Whether the device can compute the node `op`.
    ///
    /// # Safety
    /// `op` is a live tensor whose sources are live.
    pub unsafe fn supports_op(&self, op: *const sys::ggml_tensor) -> bool {
        // SAFETY: the caller's contract; valid device.
        unsafe { sys::ggml_backend_dev_supports_op(self.raw, op) }
    }

    pub fn as_ptr(&self) -> sys::ggml_backend_dev_t {
        self.raw
    }
}

/// A device's buffer type (a static registry entry; only obtainable from a [`Device`]).
#[derive(Clone, Copy)]
pub struct BufferType(sys::ggml_backend_buffer_type_t);

// SAFETY: buffer types are immutable registry entries.
unsafe impl Send for BufferType {}
unsafe impl Sync for BufferType {}

impl BufferType {
    /// Wrap a buffer type ggml handed out (buffer types live as long as their backend
    /// registry, i.e. the process).
    pub fn from_raw(raw: sys::ggml_backend_buffer_type_t) -> BufferType {
        BufferType(raw)
    }

    pub fn as_ptr(&self) -> sys::ggml_backend_buffer_type_t {
        self.0
    }

    pub fn name(&self) -> String {
        cstr(unsafe { sys::ggml_backend_buft_name(self.0) })
    }

    /// A buffer of `bytes` bytes (0 gives a buffer that only carries its type).
    pub fn alloc_buffer(&self, bytes: usize) -> Result<Buffer, GgmlError> {
        // SAFETY: valid buffer type; NULL handled.
        let raw = unsafe { sys::ggml_backend_buft_alloc_buffer(self.0, bytes) };
        if raw.is_null() {
            return Err(GgmlError::Alloc { buffer_type: self.name(), bytes });
        }
        Ok(Buffer { raw })
    }
}

/// An initialized backend (one stream of work on one device).
pub struct Backend {
    raw: sys::ggml_backend_t,
    device: Device,
}

// SAFETY: a backend is used by one thread at a time (&mut for compute).
unsafe impl Send for Backend {}

impl Backend {
    pub fn new(device: Device) -> Result<Backend, GgmlError> {
        // SAFETY: valid device; NULL handled.
        let raw = unsafe { sys::ggml_backend_dev_init(device.raw, std::ptr::null()) };
        if raw.is_null() {
            return Err(GgmlError::BackendInit(device.name()));
        }
        Ok(Backend { raw, device })
    }

    /// The CPU backend with `threads` worker threads.
    pub fn cpu(threads: usize) -> Result<Backend, GgmlError> {
        let b = Backend::new(Device::cpu()?)?;
        b.set_threads(threads);
        Ok(b)
    }

    /// Set the thread count where the backend has one (through the registry's
    /// `ggml_backend_set_n_threads` entry, so this also works for loaded modules).
    pub fn set_threads(&self, threads: usize) {
        // SAFETY: valid device; the proc address, when present, has this signature.
        unsafe {
            let reg = sys::ggml_backend_dev_backend_reg(self.device.raw);
            let name = c"ggml_backend_set_n_threads";
            let f = sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
            if !f.is_null() {
                let f: unsafe extern "C" fn(sys::ggml_backend_t, i32) = std::mem::transmute(f);
                f(self.raw, threads.max(1) as i32);
            }
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn name(&self) -> String {
        cstr(unsafe { sys::ggml_backend_name(self.raw) })
    }

    pub fn as_ptr(&self) -> sys::ggml_backend_t {
        self.raw
    }

    /// Compute a graph whose tensors live in buffers this backend can use.
    ///
    /// # Safety
    /// `graph` must be a live graph whose tensors are allocated in buffers usable by this
    /// backend.
    pub unsafe fn compute(&mut self, graph: *mut sys::ggml_cgraph) -> Result<(), GgmlError> {
        // SAFETY: the caller built `graph` from tensors allocated for this backend.
        let status = unsafe { sys::ggml_backend_graph_compute(self.raw, graph) };
        if status != sys::ggml_status::GGML_STATUS_SUCCESS {
            return Err(GgmlError::Compute { backend: self.name(), status: status as i32 });
        }
        Ok(())
    }
}

impl Backend {
    /// Queue a copy of `size` host bytes at `data` into `tensor` (from byte `offset`) on this
    /// backend's stream of work, and return at once where the backend copies asynchronously
    /// (CUDA: from pinned host memory the copy runs beside the device's compute on other
    /// streams); others copy before returning.
    ///
    /// # Safety
    /// `tensor` is a live tensor allocated in a buffer of this backend's device, `offset +
    /// size` is within it, and `data..data + size` stays readable and unchanged until the
    /// copy has run (an [`Event`] recorded after it, or [`Backend::synchronize`]).
    pub unsafe fn tensor_set_async(&self, tensor: *mut sys::ggml_tensor, data: *const u8, offset: usize, size: usize) {
        // SAFETY: the caller's contract.
        unsafe { sys::ggml_backend_tensor_set_async(self.raw, tensor, data.cast(), offset, size) };
    }

    /// Wait until the work queued on this backend has run.
    pub fn synchronize(&self) {
        // SAFETY: a live backend.
        unsafe { sys::ggml_backend_synchronize(self.raw) };
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        unsafe { sys::ggml_backend_free(self.raw) };
    }
}

/// A second backend of a device (its own stream of work) that copies host memory into the
/// device's tensors beside the compute. Dropping it waits for the copies it queued: a step that
/// failed part-way may leave some queued, and their host source and device destination must
/// outlive them. Declare it before the buffers it copies into, so that it drops first.
pub struct Copier {
    backend: Backend,
}

impl Copier {
    pub fn new(device: Device) -> Result<Copier, GgmlError> {
        Ok(Copier { backend: Backend::new(device)? })
    }
}

impl std::ops::Deref for Copier {
    type Target = Backend;
    fn deref(&self) -> &Backend {
        &self.backend
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        self.backend.synchronize();
    }
}

/// A point in a backend's stream of work (CUDA: an event), to order the work of two backends
/// of one device (e.g. a copy on one stream before a compute on another) without making the
/// host wait.
pub struct Event {
    raw: sys::ggml_backend_event_t,
}

// SAFETY: the event handle is only freed by its owner; recording and waiting are calls into
// the device's runtime, which allows them from any thread.
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    /// None where the device has no events (the CPU: its work runs when it is queued).
    pub fn new(device: Device) -> Option<Event> {
        // SAFETY: a valid device; NULL when it has no events.
        let raw = unsafe { sys::ggml_backend_event_new(device.raw) };
        (!raw.is_null()).then_some(Event { raw })
    }

    /// Mark the point `backend`'s queued work has reached.
    ///
    /// # Safety
    /// `backend` is a live backend of the event's device.
    pub unsafe fn record(&self, backend: sys::ggml_backend_t) {
        // SAFETY: the caller's contract.
        unsafe { sys::ggml_backend_event_record(self.raw, backend) };
    }

    /// Make the work queued on `backend` from now on wait for the last [`Event::record`]
    /// (the host does not wait).
    ///
    /// # Safety
    /// `backend` is a live backend of the event's device.
    pub unsafe fn wait(&self, backend: sys::ggml_backend_t) {
        // SAFETY: the caller's contract.
        unsafe { sys::ggml_backend_event_wait(backend, self.raw) };
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: we own the event.
        unsafe { sys::ggml_backend_event_free(self.raw) };
    }
}

/// An owned backend buffer.
pub struct Buffer {
    raw: sys::ggml_backend_buffer_t,
}

// SAFETY: the buffer handle is only freed by its owner.
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

impl Buffer {
    /// Allocate every tensor of `ctx` in one buffer of type `buft`.
    pub fn alloc_context_tensors(ctx: &Context, buft: BufferType) -> Result<Buffer, GgmlError> {
        let buft_ptr = buft.as_ptr();
        // SAFETY: valid context and buffer type; NULL handled.
        let raw = unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx.as_ptr(), buft_ptr) };
        if raw.is_null() {
            let name = buft.name();
            // SAFETY: buft and ctx valid; computes the size the allocation needed.
            let bytes = unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft_size(ctx.as_ptr(), buft_ptr) };
            return Err(GgmlError::Alloc { buffer_type: name, bytes });
        }
        Ok(Buffer { raw })
    }

    pub fn size(&self) -> usize {
        unsafe { sys::ggml_backend_buffer_get_size(self.raw) }
    }

    /// The buffer's base address (on its device: host memory only where `is_host`).
    pub fn base(&self) -> *mut u8 {
        // SAFETY: a live buffer.
        unsafe { sys::ggml_backend_buffer_get_base(self.raw).cast() }
    }

    pub fn is_host(&self) -> bool {
        unsafe { sys::ggml_backend_buffer_is_host(self.raw) }
    }

    /// Set every byte of the buffer to `value`.
    pub fn clear(&self, value: u8) {
        // SAFETY: we own the buffer.
        unsafe { sys::ggml_backend_buffer_clear(self.raw, value) };
    }

    /// Mark as holding weights (lets schedulers prefer computing where weights live).
    pub fn set_weights_usage(&self) {
        unsafe { sys::ggml_backend_buffer_set_usage(self.raw, sys::ggml_backend_buffer_usage::GGML_BACKEND_BUFFER_USAGE_WEIGHTS) };
    }

    pub fn as_ptr(&self) -> sys::ggml_backend_buffer_t {
        self.raw
    }

    /// Place `tensor` (created in a no-alloc context) in this buffer at byte `offset`, and
    /// let the buffer initialize it (CUDA zeroes a quantized tensor's row padding). Tensors
    /// placed at overlapping offsets share their bytes.
    ///
    /// # Safety
    /// `tensor` is a live, unallocated tensor, and `offset` plus the buffer type's
    /// allocation size of it is within the buffer, aligned to the buffer's alignment.
    pub unsafe fn place(&self, tensor: *mut sys::ggml_tensor, offset: usize) -> Result<(), GgmlError> {
        // SAFETY: the caller's contract; the base of a live buffer.
        let status = unsafe {
            let base = sys::ggml_backend_buffer_get_base(self.raw).cast::<u8>();
            sys::ggml_backend_tensor_alloc(self.raw, tensor, base.add(offset).cast())
        };
        if status != sys::ggml_status::GGML_STATUS_SUCCESS {
            return Err(GgmlError::Alloc { buffer_type: "a placed tensor".into(), bytes: offset });
        }
        Ok(())
    }
}

impl BufferType {
    /// Bytes a buffer of this type allocates for `tensor` (its size plus any padding the
    /// device's kernels read, e.g. CUDA's quantized row padding).
    ///
    /// # Safety
    /// `tensor` is a live tensor.
    pub unsafe fn alloc_size(&self, tensor: *const sys::ggml_tensor) -> usize {
        // SAFETY: the caller's contract; a valid buffer type.
        unsafe { sys::ggml_backend_buft_get_alloc_size(self.0, tensor.cast_mut()) }
    }

    /// The alignment of tensors in buffers of this type.
    pub fn alignment(&self) -> usize {
        // SAFETY: a valid buffer type.
        unsafe { sys::ggml_backend_buft_get_alignment(self.0) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        unsafe { sys::ggml_backend_buffer_free(self.raw) };
    }
}

/// Copy host bytes into (part of) a tensor on any backend.
///
/// # Safety
/// `tensor` must be a live tensor allocated in a backend buffer, and
/// `offset + data.len()` must not exceed its size.
pub unsafe fn tensor_set(tensor: *mut sys::ggml_tensor, data: &[u8], offset: usize) {
    unsafe { sys::ggml_backend_tensor_set(tensor, data.as_ptr() as *const c_void, offset, data.len()) };
}

/// Copy (part of) a tensor's bytes out to the host.
///
/// # Safety
/// As for [`tensor_set`].
pub unsafe fn tensor_get(tensor: *const sys::ggml_tensor, out: &mut [u8], offset: usize) {
    unsafe { sys::ggml_backend_tensor_get(tensor, out.as_mut_ptr() as *mut c_void, offset, out.len()) };
}
