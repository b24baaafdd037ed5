//! A small safe façade over the ggml graph-building calls the DS4 builder uses.
//!
//! Every tensor handle here belongs to one `Ctx` (a `no_alloc` ggml context that lives as
//! long as the graph). Shapes handed to these calls come from a validated `Ds4Config`, so a
//! shape mismatch here is a bug in the builder, not bad input.
use std::ffi::{CStr, CString};

use ggml::sys;

/// A tensor of the graph being built (or a weight / state tensor it references).
#[derive(Clone, Copy, Debug)]
pub struct T(pub *mut sys::ggml_tensor);

impl T {
    pub fn ne(self, i: usize) -> i64 {
        // SAFETY: the pointer is a live tensor of the current context (see module docs).
        unsafe { (*self.0).ne[i] }
    }
    pub fn nb(self, i: usize) -> usize {
        // SAFETY: as above.
        unsafe { (*self.0).nb[i] }
    }
    pub fn elem_size(self) -> usize {
        // SAFETY: as above.
        unsafe { sys::ggml_element_size(self.0) }
    }
    pub fn n_elements(self) -> usize {
        // SAFETY: as above.
        unsafe { sys::ggml_nelements(self.0) }.max(0) as usize
    }
    pub fn is_contiguous(self) -> bool {
        // SAFETY: as above.
        unsafe { sys::ggml_is_contiguous(self.0) }
    }
    /// The tensor's name (empty when it has none).
    pub fn name(self) -> String {
        // SAFETY: as above; names are NUL-terminated arrays.
        unsafe { CStr::from_ptr((*self.0).name.as_ptr()) }.to_string_lossy().into_owned()
    }
    /// ggml's description of the op that computes the tensor (`MUL_MAT`, `GLU`, `NONE`, …).
    pub fn op_desc(self) -> String {
        // SAFETY: as above; op descriptions are static NUL-terminated strings.
        unsafe { CStr::from_ptr(sys::ggml_op_desc(self.0)) }.to_string_lossy().into_owned()
    }
    /// The `i`-th source of the op (i < 10), if it has one.
    pub fn src(self, i: usize) -> Option<T> {
        // SAFETY: as above.
        let s = unsafe { (*self.0).src[i] };
        (!s.is_null()).then_some(T(s))
    }

    /// Host → tensor: `v` into the first `v.len()` elements of an allocated F32 or I32
    /// tensor (any backend).
    pub fn write_i32(self, v: &[i32]) {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.write_bytes(sys::ggml_type::GGML_TYPE_I32, &bytes);
    }
    pub fn write_f32(self, v: &[f32]) {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.write_bytes(sys::ggml_type::GGML_TYPE_F32, &bytes);
    }
    /// Tensor → host: the first `out.len()` elements of an allocated F32 tensor.
    pub fn read_f32(self, out: &mut [f32]) {
        self.check_access(sys::ggml_type::GGML_TYPE_F32, std::mem::size_of_val(out));
        // SAFETY: any byte pattern is a valid f32; the view covers exactly `out`.
        let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(out)) };
        // SAFETY: an allocated tensor of at least that many bytes (checked); ggml tensors
        // are native-endian.
        unsafe { ggml::backend::tensor_get(self.0, bytes, 0) };
    }
    /// Every element of an allocated I32 tensor.
    pub fn read_i32(self) -> Vec<i32> {
        let n = self.n_elements();
        let mut bytes = vec![0u8; n * 4];
        self.check_access(sys::ggml_type::GGML_TYPE_I32, bytes.len());
        // SAFETY: an allocated tensor of exactly that many bytes (checked).
        unsafe { ggml::backend::tensor_get(self.0, &mut bytes, 0) };
        bytes.chunks_exact(4).map(|v| i32::from_ne_bytes([v[0], v[1], v[2], v[3]])).collect()
    }
    fn write_bytes(self, ty: sys::ggml_type::Type, bytes: &[u8]) {
        self.check_access(ty, bytes.len());
        // SAFETY: an allocated tensor of at least that many bytes (checked).
        unsafe { ggml::backend::tensor_set(self.0, bytes, 0) };
    }
    /// Host access to `bytes` bytes of the tensor: a contiguous allocated tensor of `ty`
    /// with at least that many bytes. A violation is a bug of the caller (the builder
    /// sizes inputs and outputs from the same plan it fills them from), not bad input.
    fn check_access(self, ty: sys::ggml_type::Type, bytes: usize) {
        // SAFETY: a live tensor (module docs).
        let (t, nbytes) = unsafe { (&*self.0, sys::ggml_nbytes(self.0)) };
        assert!(
            t.type_ == ty && !t.buffer.is_null() && self.is_contiguous() && bytes <= nbytes,
            "host access of {bytes} bytes to tensor {:?} (type {}, {nbytes} bytes, allocated: {})",
            self.name(),
            t.type_,
            !t.buffer.is_null()
        );
    }
}

/// The host image of a step's input buffer (`steps::InputBuffer`): each input's bytes at
/// its offset in that buffer, so that one copy moves them all to the device.
pub struct InputImage<'a> {
    /// The buffer's base address on its device (inputs' `data` point past it).
    base: usize,
    bytes: &'a mut [u8],
}

impl<'a> InputImage<'a> {
    /// The image `bytes` of a buffer whose base address is `base`.
    pub fn new(base: *const u8, bytes: &'a mut [u8]) -> InputImage<'a> {
        InputImage { base: base as usize, bytes }
    }
    pub fn i32(&mut self, t: T, v: &[i32]) {
        // SAFETY: i32 has no padding and any alignment suits bytes.
        let b = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) };
        self.put(t, sys::ggml_type::GGML_TYPE_I32, b);
    }
    pub fn f32(&mut self, t: T, v: &[f32]) {
        // SAFETY: as above.
        let b = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) };
        self.put(t, sys::ggml_type::GGML_TYPE_F32, b);
    }
    /// `b` at `t`'s place in the image: `t` is one of the buffer's inputs, of type `ty`,
    /// with room for `b` (ggml tensors are native-endian).
    fn put(&mut self, t: T, ty: sys::ggml_type::Type, b: &[u8]) {
        t.check_access(ty, b.len());
        // SAFETY: a live tensor (module docs).
        let data = unsafe { (*t.0).data } as usize;
        let at = data.checked_sub(self.base).filter(|at| at + b.len() <= self.bytes.len());
        let Some(at) = at else { panic!("input {:?} is not in this step's input buffer", t.name()) };
        self.bytes[at..at + b.len()].copy_from_slice(b);
    }
}

/// A graph over the nodes of one [`Ctx`] (it lives in, and as long as, that context).
#[derive(Clone, Copy, Debug)]
pub struct Graph(*mut sys::ggml_cgraph);

impl Graph {
    /// Add `t` and everything it depends on that is not in the graph yet (after what is).
    pub fn expand(self, t: T) {
        // SAFETY: the graph and t belong to the same live context.
        unsafe { sys::ggml_build_forward_expand(self.0, t.0) };
    }

    pub fn as_ptr(self) -> *mut sys::ggml_cgraph {
        self.0
    }

    pub fn nodes(self) -> Vec<T> {
        // SAFETY: a live graph; indices below its node count.
        unsafe {
            let n = sys::ggml_graph_n_nodes(self.0).max(0);
            (0..n).map(|i| T(sys::ggml_graph_node(self.0, i))).collect()
        }
    }

    /// Nodes plus distinct leafs (inputs, weights, state) of the graph: the size of a
    /// scheduler's tensor table.
    pub fn tensor_count(self) -> usize {
        let all = self.nodes();
        let nodes: std::collections::HashSet<*mut sys::ggml_tensor> = all.iter().map(|t| t.0).collect();
        let mut leafs = std::collections::HashSet::new();
        for &t in &nodes {
            for src in (0..sys::GGML_MAX_SRC as usize).filter_map(|i| T(t).src(i)) {
                if !nodes.contains(&src.0) {
                    leafs.insert(src.0);
                }
                // SAFETY: sources are live tensors.
                let view_src = unsafe { (*src.0).view_src };
                if !view_src.is_null() && !nodes.contains(&view_src) {
                    leafs.insert(view_src);
                }
            }
        }
        all.len() + leafs.len()
    }

    /// Nodes of the graph, and those of them that compute (not a view, reshape, permute or
    /// transpose): on the CPU each computing node ends with a barrier of all threads.
    pub fn node_counts(self) -> (usize, usize) {
        use sys::ggml_op::{GGML_OP_NONE, GGML_OP_PERMUTE, GGML_OP_RESHAPE, GGML_OP_TRANSPOSE, GGML_OP_VIEW};
        let empty = [GGML_OP_NONE, GGML_OP_RESHAPE, GGML_OP_TRANSPOSE, GGML_OP_VIEW, GGML_OP_PERMUTE];
        let nodes = self.nodes();
        // SAFETY: nodes are live tensors.
        let compute = nodes.iter().filter(|t| !empty.contains(&unsafe { (*t.0).op })).count();
        (nodes.len(), compute)
    }

    /// A builder invariant (checked in debug builds, so by the tests): the float operands
    /// of every matrix product have packed rows or an even row stride. ggml's CUDA kernels
    /// for float products (`mmf`) assert even strides; the CPU accepts anything, so only
    /// this check sees a strided view that would abort on a GPU.
    pub fn check_matmul_layouts(self) {
        use sys::ggml_op::{GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID};
        for t in self.nodes() {
            // SAFETY: a live node whose first two sources are live tensors.
            let node = unsafe { &*t.0 };
            if !matches!(node.op, GGML_OP_MUL_MAT | GGML_OP_MUL_MAT_ID) {
                continue;
            }
            for &src in &node.src[..2] {
                // SAFETY: as above.
                let s = unsafe { &*src };
                // SAFETY: a valid type of a live tensor.
                if unsafe { sys::ggml_is_quantized(s.type_) } || s.ne[1] <= 1 {
                    continue;
                }
                // SAFETY: as above.
                let ts = unsafe { sys::ggml_type_size(s.type_) };
                let packed = s.nb[1] == s.ne[0] as usize * ts;
                assert!(packed || (s.nb[1] / ts).is_multiple_of(2), "matmul {}: operand {:?} has row stride {} elements", t.name(), s.ne, s.nb[1] / ts);
            }
        }
    }
}

/// Graph-building context.
pub struct Ctx {
    pub raw: *mut sys::ggml_context,
}

macro_rules! unary {
    ($($name:ident => $f:ident),* $(,)?) => {
        $(pub fn $name(&self, a: T) -> T {
            // SAFETY: `a` belongs to this context (module docs).
            T(unsafe { sys::$f(self.raw, a.0) })
        })*
    };
}
macro_rules! binary {
    ($($name:ident => $f:ident),* $(,)?) => {
        $(pub fn $name(&self, a: T, b: T) -> T {
            // SAFETY: `a` and `b` belong to this context (module docs).
            T(unsafe { sys::$f(self.raw, a.0, b.0) })
        })*
    };
}

impl Ctx {
    unary! {
        cont => ggml_cont, transpose => ggml_transpose, sigmoid => ggml_sigmoid, silu => ggml_silu,
        relu => ggml_relu, sqrt => ggml_sqrt, softplus => ggml_softplus, sum_rows => ggml_sum_rows,
    }
    binary! {
        out_prod => ggml_out_prod, add => ggml_add, mul => ggml_mul, div => ggml_div, get_rows => ggml_get_rows, cpy => ggml_cpy,
    }

    /// `a` itself when its layout already is contiguous (e.g. a permutation that only moves
    /// a dimension of size 1, or an op's fresh output), else a contiguous copy (`cont`).
    pub fn contiguous(&self, a: T) -> T {
        // SAFETY: a belongs to this context.
        if unsafe { sys::ggml_is_contiguous(a.0) } {
            a
        } else {
            self.cont(a)
        }
    }

    pub fn name(&self, t: T, name: &str) -> T {
        if let Ok(c) = CString::new(name) {
            // SAFETY: ggml copies the name into the tensor (truncating to its buffer).
            unsafe { sys::ggml_set_name(t.0, c.as_ptr()) };
        }
        t
    }

    pub fn new_f32(&self, ne: &[i64]) -> T {
        self.new_tensor(sys::ggml_type::GGML_TYPE_F32, ne)
    }
    pub fn new_i32(&self, ne: &[i64]) -> T {
        self.new_tensor(sys::ggml_type::GGML_TYPE_I32, ne)
    }
    /// `n` bytes (I8): a byte view of a buffer region, for copies, never in a graph.
    pub fn new_bytes(&self, n: i64) -> T {
        self.new_tensor(sys::ggml_type::GGML_TYPE_I8, &[n])
    }
    fn new_tensor(&self, ty: sys::ggml_type::Type, ne: &[i64]) -> T {
        // SAFETY: 1..=4 dimensions, positive sizes (builder invariant).
        T(unsafe {
            match ne.len() {
                1 => sys::ggml_new_tensor_1d(self.raw, ty, ne[0]),
                2 => sys::ggml_new_tensor_2d(self.raw, ty, ne[0], ne[1]),
                3 => sys::ggml_new_tensor_3d(self.raw, ty, ne[0], ne[1], ne[2]),
                _ => sys::ggml_new_tensor_4d(self.raw, ty, ne[0], ne[1], ne[2], ne[3]),
            }
        })
    }
    /// A tensor of any type ggml defines, 1 to 4 dimensions.
    pub fn new_typed(&self, ty: ggml::TensorType, ne: &[i64]) -> T {
        self.new_tensor(ty.raw(), ne)
    }
    /// A graph of at most `size` nodes (the context was made with room for it).
    pub fn new_graph(&self, size: usize) -> Graph {
        // SAFETY: the context has room for a graph of `size` nodes (its creator's contract:
        // `Context::new_no_alloc(_, size)`).
        Graph(unsafe { sys::ggml_new_graph_custom(self.raw, size, false) })
    }
    /// Mark `t` as a graph output (its memory is not reused by later nodes).
    pub fn output(&self, t: T) -> T {
        // SAFETY: t belongs to this context.
        unsafe { sys::ggml_set_output(t.0) };
        t
    }
    /// A graph input: allocated by the graph allocator, filled by the host before compute.
    pub fn input(&self, t: T, name: &str) -> T {
        // SAFETY: t belongs to this context.
        unsafe { sys::ggml_set_input(t.0) };
        self.name(t, name)
    }

    /// Matrix product with F32 accumulation on every backend: `w` [k, m, ...] × `x` [k, n, ...]
    /// → [m, n, ...].
    pub fn mm(&self, w: T, x: T) -> T {
        // SAFETY: both belong to this context.
        let r = unsafe { sys::ggml_mul_mat(self.raw, w.0, x.0) };
        // SAFETY: r is a mul_mat node.
        unsafe { sys::ggml_prec_set_acc(r, sys::ggml_prec::GGML_PREC_F32) };
        T(r)
    }
    /// Expert matrix product (`ids` select each token's experts), F32 accumulation.
    pub fn mm_id(&self, w: T, x: T, ids: T) -> T {
        // SAFETY: all belong to this context.
        let r = unsafe { sys::ggml_mul_mat_id(self.raw, w.0, x.0, ids.0) };
        // SAFETY: r is a mul_mat_id node.
        unsafe { sys::ggml_prec_set_acc(r, sys::ggml_prec::GGML_PREC_F32) };
        T(r)
    }
    /// silu(gate) · up in one op.
    pub fn swiglu(&self, gate: T, up: T) -> T {
        // SAFETY: both belong to this context and have the same shape (builder invariant).
        T(unsafe { sys::ggml_swiglu_split(self.raw, gate.0, up.0) })
    }
    pub fn rms_norm(&self, a: T, eps: f32) -> T {
        // SAFETY: a belongs to this context.
        T(unsafe { sys::ggml_rms_norm(self.raw, a.0, eps) })
    }
    pub fn scale(&self, a: T, s: f32) -> T {
        // SAFETY: a belongs to this context.
        T(unsafe { sys::ggml_scale(self.raw, a.0, s) })
    }
    pub fn scale_bias(&self, a: T, s: f32, b: f32) -> T {
        // SAFETY: a belongs to this context.
        T(unsafe { sys::ggml_scale_bias(self.raw, a.0, s, b) })
    }
    pub fn clamp(&self, a: T, min: f32, max: f32) -> T {
        // SAFETY: a belongs to this context.
        T(unsafe { sys::ggml_clamp(self.raw, a.0, min, max) })
    }
    /// `a` ++ `b` along `dim`. ggml's CPU concat splits its work over dimension 2 only, so
    /// matrices (two dimensions, contiguous) are concatenated as [ne0, 1, ne1] tensors, over
    /// the rows (dim 1 → 2) or per row (dim 0), which the threads share.
    pub fn concat(&self, a: T, b: T, dim: i32) -> T {
        // SAFETY: t belongs to this context.
        let matrix = |t: T| t.ne(2) == 1 && t.ne(3) == 1 && unsafe { sys::ggml_is_contiguous(t.0) };
        if dim <= 1 && matrix(a) && matrix(b) {
            let (a3, b3) = (self.reshape(a, &[a.ne(0), 1, a.ne(1)]), self.reshape(b, &[b.ne(0), 1, b.ne(1)]));
            let along = if dim == 1 { 2 } else { 0 };
            // SAFETY: both belong to this context.
            let r = T(unsafe { sys::ggml_concat(self.raw, a3.0, b3.0, along) });
            return self.reshape(r, &[r.ne(0), r.ne(2)]);
        }
        // SAFETY: both belong to this context.
        T(unsafe { sys::ggml_concat(self.raw, a.0, b.0, dim) })
    }
    pub fn reshape(&self, a: T, ne: &[i64]) -> T {
        // SAFETY: a is contiguous and the element count matches (builder invariant).
        T(unsafe {
            match ne.len() {
                1 => sys::ggml_reshape_1d(self.raw, a.0, ne[0]),
                2 => sys::ggml_reshape_2d(self.raw, a.0, ne[0], ne[1]),
                3 => sys::ggml_reshape_3d(self.raw, a.0, ne[0], ne[1], ne[2]),
                _ => sys::ggml_reshape_4d(self.raw, a.0, ne[0], ne[1], ne[2], ne[3]),
            }
        })
    }
    pub fn permute(&self, a: T, p: [i32; 4]) -> T {
        // SAFETY: a belongs to this context; p is a permutation.
        T(unsafe { sys::ggml_permute(self.raw, a.0, p[0], p[1], p[2], p[3]) })
    }
    /// `ne0` elements of `a` starting at element `i0`.
    pub fn view_1d(&self, a: T, ne0: i64, i0: i64) -> T {
        // SAFETY: the range lies inside `a` (builder invariant).
        T(unsafe { sys::ggml_view_1d(self.raw, a.0, ne0, i0 as usize * a.elem_size()) })
    }
    /// `ne0 × ne1` elements of `a` (rows of `a`'s stride) starting at row-element `i0`,
    /// row `i1`.
    pub fn view_2d(&self, a: T, ne0: i64, ne1: i64, i0: i64, i1: i64) -> T {
        let off = i0 as usize * a.elem_size() + i1 as usize * a.nb(1);
        // SAFETY: the range lies inside `a` (builder invariant).
        T(unsafe { sys::ggml_view_2d(self.raw, a.0, ne0, ne1, a.nb(1), off) })
    }
    /// A contiguous [ne0, ne1] matrix of `a`'s elements from element `first` on.
    pub fn view_matrix(&self, a: T, ne0: i64, ne1: i64, first: usize) -> T {
        let es = a.elem_size();
        // SAFETY: the range lies inside `a` (builder invariant).
        T(unsafe { sys::ggml_view_2d(self.raw, a.0, ne0, ne1, ne0 as usize * es, first * es) })
    }
    pub fn view_3d(&self, a: T, ne: [i64; 3], nb1: usize, nb2: usize, offset: usize) -> T {
        // SAFETY: the range lies inside `a` (builder invariant).
        T(unsafe { sys::ggml_view_3d(self.raw, a.0, ne[0], ne[1], ne[2], nb1, nb2, offset) })
    }
    pub fn view_4d(&self, a: T, ne: [i64; 4], nb1: usize, nb2: usize, nb3: usize, offset: usize) -> T {
        // SAFETY: the range lies inside `a` (builder invariant).
        T(unsafe { sys::ggml_view_4d(self.raw, a.0, ne[0], ne[1], ne[2], ne[3], nb1, nb2, nb3, offset) })
    }
    pub fn soft_max(&self, a: T) -> T {
        // SAFETY: a belongs to this context.
        T(unsafe { sys::ggml_soft_max(self.raw, a.0) })
    }
    /// softmax(a·scale + mask) with one extra per-head logit `sinks` [a.ne2].
    pub fn soft_max_sinks(&self, a: T, mask: T, scale: f32, sinks: T) -> T {
        // SAFETY: all belong to this context.
        let r = unsafe { sys::ggml_soft_max_ext(self.raw, a.0, mask.0, scale, 0.0) };
        // SAFETY: r is a soft_max node.
        unsafe { sys::ggml_soft_max_add_sinks(r, sinks.0) };
        T(r)
    }
    /// Attention in one op (ggml's flash attention, F32 accumulation): `q` [d, n, h], `kv` the
    /// one K=V head [d, n_kv], `mask` F16 [n_kv, n], per-head `sinks` [h] → [d, h, n].
    pub fn flash_attn_sinks(&self, q: T, kv: T, mask: T, scale: f32, sinks: T) -> T {
        // SAFETY: all belong to this context; K and V are the same tensor.
        let r = unsafe { sys::ggml_flash_attn_ext(self.raw, q.0, kv.0, kv.0, mask.0, scale, 0.0, 0.0) };
        // SAFETY: r is a flash-attention node.
        unsafe {
            sys::ggml_flash_attn_ext_set_prec(r, sys::ggml_prec::GGML_PREC_F32);
            sys::ggml_flash_attn_ext_add_sinks(r, sinks.0);
        }
        T(r)
    }
    /// A tensor of `like`'s shape (and type) with every element `v`.
    pub fn fill(&self, like: T, v: f32) -> T {
        // SAFETY: like belongs to this context.
        T(unsafe { sys::ggml_fill(self.raw, like.0, v) })
    }
    /// `a` converted to F16 (a copy).
    pub fn to_f16(&self, a: T) -> T {
        // SAFETY: a belongs to this context.
        T(unsafe { sys::ggml_cast(self.raw, a.0, sys::ggml_type::GGML_TYPE_F16) })
    }
    pub fn top_k(&self, a: T, k: i64) -> T {
        // SAFETY: a belongs to this context; 0 < k <= a.ne0.
        T(unsafe { sys::ggml_top_k(self.raw, a.0, k as i32) })
    }
    /// `b` [a.ne0, m] written over columns `col` .. `col + m` of the matrix `a`, in place: a
    /// view of the whole of `a` that depends on the write.
    pub fn set_cols(&self, a: T, b: T, col: i64) -> T {
        // SAFETY: both belong to this context; the columns lie inside `a` (builder invariant).
        T(unsafe { sys::ggml_set_2d_inplace(self.raw, a.0, b.0, a.nb(1), col as usize * a.nb(1)) })
    }
    pub fn set_rows(&self, dst: T, src: T, idx: T) -> T {
        // SAFETY: all belong to this context.
        T(unsafe { sys::ggml_set_rows(self.raw, dst.0, src.0, idx.0) })
    }
    /// `a` repeated (tiled) to the shape `ne`.
    pub fn repeat_4d(&self, a: T, ne: [i64; 4]) -> T {
        // SAFETY: a belongs to this context; each of ne is a multiple of a's size there.
        T(unsafe { sys::ggml_repeat_4d(self.raw, a.0, ne[0], ne[1], ne[2], ne[3]) })
    }
    pub fn repeat(&self, a: T, like: T) -> T {
        // SAFETY: both belong to this context.
        T(unsafe { sys::ggml_repeat(self.raw, a.0, like.0) })
    }
    /// RoPE in ggml's normal (consecutive pair) mode on `n_rot` dims starting at dim
    /// `offset` of each row; `a` [d, heads, n], `pos` I32 [n].
    pub fn rope(&self, a: T, pos: T, n_rot: i64, offset: i64, p: &RopeParams) -> T {
        // SAFETY: a and pos belong to this context; rope mode 0 is the normal mode.
        let r = unsafe {
            sys::ggml_rope_ext(
                self.raw, a.0, pos.0, std::ptr::null_mut(), n_rot as i32, 0, p.n_ctx_orig,
                p.freq_base, p.freq_scale, p.ext_factor, p.attn_factor, p.beta_fast, p.beta_slow,
            )
        };
        // SAFETY: r is a rope node.
        T(unsafe { sys::ggml_rope_set_offset(r, offset as i32) })
    }
    pub fn hc_comb(&self, mixes: T, scale: T, base: T, eps: f32, iters: i32) -> T {
        // SAFETY: all belong to this context.
        T(unsafe { sys::ggml_dsv4_hc_comb(self.raw, mixes.0, scale.0, base.0, eps, iters) })
    }
    pub fn hc_pre(&self, x: T, w: T) -> T {
        // SAFETY: both belong to this context.
        T(unsafe { sys::ggml_dsv4_hc_pre(self.raw, x.0, w.0) })
    }
    pub fn hc_post(&self, x: T, residual: T, post: T, comb: T) -> T {
        // SAFETY: all belong to this context.
        T(unsafe { sys::ggml_dsv4_hc_post(self.raw, x.0, residual.0, post.0, comb.0) })
    }
}

impl Ctx {
    /// A custom op computed on the CPU backend by `fun` (one task: thread 0 calls it),
    /// reading `args`, with an output of type `ty` and shape `ne`.
    ///
    /// # Safety
    /// `userdata` must stay valid, and be what `fun` expects, for as long as the graph runs.
    pub unsafe fn custom(&self, ty: ggml::TensorType, ne: [i64; 3], args: &[T], fun: CustomOp, userdata: *mut std::ffi::c_void) -> T {
        // SAFETY: the caller's contract.
        unsafe { self.custom_tasks(ty, ne, args, fun, userdata, 1) }
    }

    /// [`custom`](Self::custom) called by every thread of the CPU backend's team at once
    /// (`fun` gets each one's `ith` of `nth`).
    ///
    /// # Safety
    /// As [`custom`](Self::custom); `fun` must be safe to run on several threads at once.
    pub unsafe fn custom_all_threads(&self, ty: ggml::TensorType, ne: [i64; 3], args: &[T], fun: CustomOp, userdata: *mut std::ffi::c_void) -> T {
        // SAFETY: the caller's contract.
        unsafe { self.custom_tasks(ty, ne, args, fun, userdata, sys::GGML_N_TASKS_MAX) }
    }

    unsafe fn custom_tasks(&self, ty: ggml::TensorType, ne: [i64; 3], args: &[T], fun: CustomOp, userdata: *mut std::ffi::c_void, n_tasks: i32) -> T {
        let mut a: Vec<*mut sys::ggml_tensor> = args.iter().map(|t| t.0).collect();
        // SAFETY: args belong to this context; userdata: the caller's contract.
        T(unsafe { sys::ggml_custom_4d(self.raw, ty.raw(), ne[0], ne[1], ne[2], 1, a.as_mut_ptr(), a.len() as i32, Some(fun), n_tasks, userdata) })
    }
}

/// Whether `device` computes a matrix product (`mul_mat_id` when `id`, else `mul_mat`) with
/// a weight of type `ty` and shape `ne` held in a buffer of type `buft`: asked through a
/// probe op on a zero-size buffer of that type, as llama.cpp does.
pub fn supports_matmul_weight(device: ggml::Device, buft: ggml::BufferType, ty: ggml::TensorType, ne: &[i64], id: bool) -> bool {
    if ne.len() != if id { 3 } else { 2 } {
        return false;
    }
    let Ok(ctx) = ggml::Context::new_no_alloc(4, 0) else { return false };
    let Ok(buf) = buft.alloc_buffer(0) else { return false };
    let g = Ctx { raw: ctx.as_ptr() };
    let w = g.new_typed(ty, ne);
    let op = if id {
        let x = g.new_f32(&[ne[0], 2, 1]);
        let ids = g.new_i32(&[2, 1]);
        g.mm_id(w, x, ids)
    } else {
        g.mm(w, g.new_f32(&[ne[0], 1]))
    };
    // SAFETY: w is a metadata-only probe tensor; it points at the zero-size buffer only for
    // the question (ggml reads the buffer's type) and is detached before the buffer is freed.
    unsafe {
        (*w.0).buffer = buf.as_ptr();
        let ok = device.supports_op(op.0);
        (*w.0).buffer = std::ptr::null_mut();
        ok
    }
}

/// The body of a custom op: `(dst, thread index, thread count, userdata)`.
pub type CustomOp = unsafe extern "C" fn(*mut sys::ggml_tensor, i32, i32, *mut std::ffi::c_void);

/// RoPE parameters of one layer kind, in ggml's terms.
#[derive(Clone, Copy, Debug)]
pub struct RopeParams {
    pub n_ctx_orig: i32,
    pub freq_base: f32,
    pub freq_scale: f32,
    pub ext_factor: f32,
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

impl RopeParams {
    pub fn plain(base: f32) -> RopeParams {
        RopeParams { n_ctx_orig: 0, freq_base: base, freq_scale: 1.0, ext_factor: 0.0, attn_factor: 1.0, beta_fast: 0.0, beta_slow: 0.0 }
    }
    /// YaRN frequencies without YaRN's magnitude scaling: ggml multiplies cos/sin by
    /// `1 + 0.1·ln(factor)` whenever ext_factor ≠ 0, so attn_factor cancels it.
    pub fn yarn(base: f32, y: &loader::RopeYarn) -> RopeParams {
        let freq_scale = 1.0 / y.factor;
        RopeParams {
            n_ctx_orig: y.original_context.min(i32::MAX as u64) as i32,
            freq_base: base,
            freq_scale,
            ext_factor: 1.0,
            attn_factor: 1.0 / (1.0 + 0.1 * (1.0 / freq_scale).ln()),
            beta_fast: y.beta_fast,
            beta_slow: y.beta_slow,
        }
    }
}
