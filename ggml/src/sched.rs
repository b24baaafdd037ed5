//! ggml's backend scheduler: one graph over several backends. Nodes run where their weights
//! live (or where they are pinned with [`Scheduler::pin`]); the scheduler splits the graph
//! into runs per backend and copies the tensors that cross between them. The last backend
//! must be the CPU: graph inputs live there, and so do ops only the CPU can run (custom ops).
use std::ffi::c_void;

use ggml_sys as sys;

use crate::{Backend, GgmlError};

/// Called for every node the scheduler computed when `ask` is false (after asking with `ask`
/// true whether the node is wanted); returning false stops the computation.
pub type EvalCallback = unsafe extern "C" fn(t: *mut sys::ggml_tensor, ask: bool, user_data: *mut c_void) -> bool;

/// A scheduler over borrowed backends, holding the allocation of one graph at a time.
pub struct Scheduler {
    raw: sys::ggml_backend_sched_t,
    names: Vec<String>,
    graph_size: usize,
}

// SAFETY: used by one thread at a time (&mut for compute); the backends it points at outlive
// it by the caller's contract (see `new`).
unsafe impl Send for Scheduler {}

impl Scheduler {
    /// A scheduler over `backends` (highest priority first, the CPU last) for graphs of at
    /// most `graph_size` nodes and leafs. With `op_offload`, a product whose weight is in a
    /// host buffer runs on a higher-priority backend that asks for it (ggml's CUDA backend:
    /// batches of 32 or more), the scheduler copying the weight over (for `mul_mat_id`, only
    /// the experts the batch uses).
    ///
    /// # Safety
    /// The backends must outlive the scheduler.
    pub unsafe fn new(backends: &[&Backend], graph_size: usize, op_offload: bool) -> Result<Scheduler, GgmlError> {
        let mut raw_backends: Vec<sys::ggml_backend_t> = backends.iter().map(|b| b.as_ptr()).collect();
        let names: Vec<String> = backends.iter().map(|b| b.name()).collect();
        match backends.last() {
            Some(b) if b.device().kind() == crate::DeviceKind::Cpu => {}
            _ => return Err(GgmlError::Sched(format!("the last backend must be the CPU, got {names:?}"))),
        }
        // SAFETY: valid backends, the last one the CPU (checked: ggml asserts it); default
        // buffer types; no parallel copies.
        let raw = unsafe {
            sys::ggml_backend_sched_new(raw_backends.as_mut_ptr(), std::ptr::null_mut(), raw_backends.len() as i32, graph_size, false, op_offload)
        };
        if raw.is_null() {
            return Err(GgmlError::Sched(format!("ggml could not create a scheduler over {names:?}")));
        }
        Ok(Scheduler { raw, names, graph_size })
    }

    /// The most nodes and leafs a graph may have (`new`'s `graph_size`).
    pub fn capacity(&self) -> usize {
        self.graph_size
    }

    /// Forget the allocated graph and the pins, keeping the compute buffers: the next
    /// `alloc_graph` (of any graph within `capacity`) reuses them, growing them only if it
    /// needs more.
    pub fn reset(&mut self) {
        // SAFETY: valid scheduler; it keeps no reference into the last graph after this.
        unsafe { sys::ggml_backend_sched_reset(self.raw) };
    }

    /// Run `node` on `backend` (one of the scheduler's), whatever the scheduler would choose.
    ///
    /// # Safety
    /// `node` is a node of the graph about to be allocated; `backend` is one of the
    /// scheduler's backends.
    pub unsafe fn pin(&mut self, node: *mut sys::ggml_tensor, backend: &Backend) {
        // SAFETY: the caller's contract.
        unsafe { sys::ggml_backend_sched_set_tensor_backend(self.raw, node, backend.as_ptr()) };
    }

    /// Split `graph` over the backends and allocate its tensors (compute buffers are kept
    /// and reused for as long as this graph is the one allocated).
    ///
    /// # Safety
    /// `graph` is a live graph whose pre-allocated tensors are in buffers of these backends.
    pub unsafe fn alloc_graph(&mut self, graph: *mut sys::ggml_cgraph) -> Result<(), GgmlError> {
        // SAFETY: the caller's contract.
        if unsafe { sys::ggml_backend_sched_alloc_graph(self.raw, graph) } {
            Ok(())
        } else {
            Err(GgmlError::Sched(format!("ggml could not allocate the graph's compute buffers on {:?}", self.names)))
        }
    }

    /// Number of runs the graph was split into (1 when a single backend computes it all).
    pub fn n_splits(&self) -> usize {
        // SAFETY: valid scheduler.
        unsafe { sys::ggml_backend_sched_get_n_splits(self.raw) }.max(0) as usize
    }

    /// Bytes of compute buffer per backend, in the order given to `new`.
    pub fn buffer_sizes(&self, backends: &[&Backend]) -> Vec<usize> {
        // SAFETY: valid scheduler; the backends are its own (caller passes the same list).
        backends.iter().map(|b| unsafe { sys::ggml_backend_sched_get_buffer_size(self.raw, b.as_ptr()) }).collect()
    }

    /// Observe every node as it is computed (debugging); None removes the callback.
    ///
    /// # Safety
    /// `user_data` must be what `callback` expects, valid while graphs are computed.
    pub unsafe fn set_eval_callback(&mut self, callback: Option<EvalCallback>, user_data: *mut c_void) {
        // SAFETY: the caller's contract.
        unsafe { sys::ggml_backend_sched_set_eval_callback(self.raw, callback, user_data) };
    }

    /// Compute the allocated graph and wait for every backend.
    ///
    /// # Safety
    /// `graph` is the graph last passed to `alloc_graph`, still live.
    pub unsafe fn compute(&mut self, graph: *mut sys::ggml_cgraph) -> Result<(), GgmlError> {
        // SAFETY: the caller's contract.
        let status = unsafe { sys::ggml_backend_sched_graph_compute(self.raw, graph) };
        if status != sys::ggml_status::GGML_STATUS_SUCCESS {
            return Err(GgmlError::Compute { backend: self.names.join("+"), status: status as i32 });
        }
        Ok(())
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: we own the scheduler.
        unsafe { sys::ggml_backend_sched_free(self.raw) };
    }
}
