//! ggml's graph allocator: places the intermediate tensors of a graph in one buffer of a
//! buffer type, reusing memory between nodes, and keeps that buffer for later graphs.
use ggml_sys as sys;

use crate::{BufferType, GgmlError};

pub struct GraphAllocator {
    raw: sys::ggml_gallocr_t,
    buffer_type: String,
}

// SAFETY: the allocator is only touched through &mut by its owner.
unsafe impl Send for GraphAllocator {}

impl GraphAllocator {
    pub fn new(buft: BufferType) -> Result<GraphAllocator, GgmlError> {
        // SAFETY: a valid buffer type; NULL handled.
        let raw = unsafe { sys::ggml_gallocr_new(buft.as_ptr()) };
        if raw.is_null() {
            return Err(GgmlError::Alloc { buffer_type: buft.name(), bytes: 0 });
        }
        Ok(GraphAllocator { raw, buffer_type: buft.name() })
    }

    /// Allocate the graph's tensors that have no memory yet (growing the buffer when the
    /// graph needs more). A graph allocated earlier by this allocator may be overwritten
    /// when the buffer is re-planned: compare [`GraphAllocator::buffer_size`] before/after.
    ///
    /// # Safety
    /// `graph` is a live graph whose tensors belong to live contexts.
    pub unsafe fn alloc_graph(&mut self, graph: *mut sys::ggml_cgraph) -> Result<(), GgmlError> {
        // SAFETY: the caller's contract.
        if unsafe { sys::ggml_gallocr_alloc_graph(self.raw, graph) } {
            Ok(())
        } else {
            Err(GgmlError::Sched(format!("ggml could not allocate a graph's compute buffer on {}", self.buffer_type)))
        }
    }

    /// Bytes of the allocator's buffer.
    pub fn buffer_size(&self) -> usize {
        // SAFETY: a valid allocator; buffer 0 is its only buffer type.
        unsafe { sys::ggml_gallocr_get_buffer_size(self.raw, 0) }
    }
}

impl Drop for GraphAllocator {
    fn drop(&mut self) {
        // SAFETY: we own the allocator.
        unsafe { sys::ggml_gallocr_free(self.raw) };
    }
}
