//! ggml's GGUF reader behind an owner, with its complaints captured as error text.
use std::ffi::{CStr, CString};
use std::path::Path;

use ggml::sys;

use crate::LoadError;

pub struct Gguf {
    raw: *mut sys::gguf_context,
}

// SAFETY: the context is read-only after parsing.
unsafe impl Send for Gguf {}
unsafe impl Sync for Gguf {}

fn params() -> sys::gguf_init_params {
    // no_alloc: only the header is read, tensor data stays in the file.
    sys::gguf_init_params { no_alloc: true, ctx: std::ptr::null_mut() }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf, LoadError> {
        let display = path.display().to_string();
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| LoadError::Gguf { path: display.clone(), reason: "path contains a NUL byte".into() })?;
        // SAFETY: valid C string and params; NULL is handled.
        let (raw, why) = ggml::log::capture_errors(|| unsafe { sys::gguf_init_from_file(c.as_ptr(), params()) });
        Self::wrap(raw, display, why)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Gguf, LoadError> {
        let name = "<memory>".to_string();
        if bytes.is_empty() {
            return Err(LoadError::Gguf { path: name, reason: "empty input".into() });
        }
        // SAFETY: the reader only reads within `bytes` during this call.
        let (raw, why) = ggml::log::capture_errors(|| unsafe {
            sys::gguf_init_from_buffer(bytes.as_ptr().cast(), bytes.len(), params())
        });
        Self::wrap(raw, name, why)
    }

    fn wrap(raw: *mut sys::gguf_context, path: String, why: String) -> Result<Gguf, LoadError> {
        if raw.is_null() {
            let reason = if why.is_empty() { "ggml's GGUF reader rejected it".to_string() } else { why };
            return Err(LoadError::Gguf { path, reason });
        }
        Ok(Gguf { raw })
    }

    pub fn as_ptr(&self) -> *const sys::gguf_context {
        self.raw
    }

    pub fn version(&self) -> u32 {
        unsafe { sys::gguf_get_version(self.raw) }
    }

    pub fn alignment(&self) -> u64 {
        unsafe { sys::gguf_get_alignment(self.raw) as u64 }
    }

    /// Absolute file offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        unsafe { sys::gguf_get_data_offset(self.raw) as u64 }
    }

    pub(crate) fn str_at(p: *const std::ffi::c_char) -> String {
        if p.is_null() {
            return String::new();
        }
        // SAFETY: ggml returns NUL-terminated strings owned by the context.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl Drop for Gguf {
    fn drop(&mut self) {
        unsafe { sys::gguf_free(self.raw) };
    }
}
