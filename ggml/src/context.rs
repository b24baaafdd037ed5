//! An owned ggml context. dflash only uses `no_alloc` contexts: tensor data lives in
//! backend buffers, the context holds tensor and graph metadata.
use ggml_sys as sys;

use crate::GgmlError;

pub struct Context {
    raw: *mut sys::ggml_context,
}

// SAFETY: a context is only touched through &mut or by one thread at a time; ggml keeps no
// thread affinity for contexts.
unsafe impl Send for Context {}

impl Context {
    /// A metadata-only context with room for `n_tensors` tensors and a graph of
    /// `graph_nodes` nodes (0 for none).
    pub fn new_no_alloc(n_tensors: usize, graph_nodes: usize) -> Result<Context, GgmlError> {
        // SAFETY: plain size computations.
        let mut bytes = n_tensors.saturating_mul(unsafe { sys::ggml_tensor_overhead() });
        if graph_nodes > 0 {
            bytes = bytes.saturating_add(unsafe { sys::ggml_graph_overhead_custom(graph_nodes, false) });
        }
        let params = sys::ggml_init_params { mem_size: bytes, mem_buffer: std::ptr::null_mut(), no_alloc: true };
        // SAFETY: params are valid; a NULL return is handled.
        let raw = unsafe { sys::ggml_init(params) };
        if raw.is_null() {
            return Err(GgmlError::ContextInit(bytes));
        }
        Ok(Context { raw })
    }

    pub fn as_ptr(&self) -> *mut sys::ggml_context {
        self.raw
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: we own the context.
        unsafe { sys::ggml_free(self.raw) };
    }
}
