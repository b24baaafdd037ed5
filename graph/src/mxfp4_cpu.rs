//! MXFP4 expert products on the CPU for decode's split (`pcie.rs`): ggml's `mul_mat_id` over
//! the plain (not repacked) MXFP4 layout of the pinned host copy, computed here so that each
//! thread asks for its rows ahead of the dot products (the CPU's pass over cold experts ran
//! at about half the host's read rate, BENCHMARKS.md "Seventh run") and, where the CPU has
//! AVX-512 VNNI, multiplies two blocks a 512-bit step.
//!
//! The result is ggml's, bit for bit, so no placement or path changes a logit:
//! - the activation is quantized by ggml's own Q8_0 `from_float`, column by column, as ggml's
//!   `mul_mat_id` does (Q8_0 blocks are quantized independently);
//! - each output is one dot product of a weight row with its column: with VNNI, the integer
//!   sums of ggml's AVX2 MXFP4 kernel in the same lanes (a block's low nibbles, elements
//!   0..15, then its high ones; even blocks in one accumulator, odd ones in the other), each
//!   lane scaled by the same product of the two block scales in one fused multiply-add, and
//!   the two accumulators added and reduced in that kernel's order; without VNNI, or for rows
//!   of an odd number of blocks (ggml finishes those with a scalar block), ggml's `vec_dot`.
//!
//! The unit tests compare it with ggml's `vec_dot` and `mul_mat_id` bit for bit.
use ggml::sys;

const QK: usize = 32;
/// One E8M0 exponent byte, then 16 bytes of nibbles (element j low in byte j, j + 16 high).
const MXFP4_BLOCK: usize = 17;
/// An FP16 scale, then 32 signed bytes.
const Q8_0_BLOCK: usize = 34;
/// How far ahead of the dot product a thread asks for its weight rows (bytes). On the 2-core
/// development VM (Zen 4), 4 KiB ahead took the VNNI product over streamed rows from 6.6 to
/// 11.7 GB/s a thread (`tools/bandwidth/mxfp4_dot.c`).
const PREFETCH: usize = 4096;

/// Columns the VNNI product takes at once (one weight row decoded for all of them).
const COLUMNS: usize = 8;

/// The E2M1 values of the 16 nibbles, doubled to integers (the block's scale is halved).
const FP4_X2: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Half the E8M0 scale 2^(e − 127), that is 2^(e − 128), exactly (subnormal below e = 2).
fn e8m0_half(e: u8) -> f32 {
    if e < 2 {
        f32::from_bits(0x0020_0000 << e)
    } else {
        f32::from_bits(u32::from(e - 1) << 23)
    }
}

/// One quantized activation column as the products read it, `stride(n)` bytes (a multiple
/// of 64) from its start: the Q8_0 bytes each plus 128 (unsigned, for VPDPBUSD), `n` bytes;
/// then the block scales as f32, a pair of blocks to 16 lanes (8 of the first, 8 of the
/// second: the lanes of the VNNI product); then ggml's Q8_0 blocks themselves (for
/// `vec_dot`).
#[derive(Clone, Copy)]
struct Column {
    at: *const u8,
    n: usize,
}

impl Column {
    /// Bytes of the scales: 64 a pair of blocks.
    fn scale_bytes(n: usize) -> usize {
        (n / QK).div_ceil(2) * 64
    }
    fn stride(n: usize) -> usize {
        (n + Self::scale_bytes(n) + Q8_0_BLOCK * (n / QK)).div_ceil(64) * 64
    }
    fn biased(self) -> *const u8 {
        self.at
    }
    /// 16 f32 a pair of blocks.
    fn scales(self) -> *const f32 {
        // SAFETY (of the offset): within the column's `stride` bytes.
        unsafe { self.at.add(self.n).cast() }
    }
    fn q8(self) -> *const u8 {
        // SAFETY (of the offset): within the column's `stride` bytes.
        unsafe { self.at.add(self.n + Self::scale_bytes(self.n)) }
    }

    /// Quantizes `x` (`n` f32, `n` a multiple of 32) to Q8_0 with ggml's own `from_float`
    /// (as ggml's `mul_mat_id` quantizes its input; Q8_0 blocks are independent) and writes
    /// the column at `dst`.
    ///
    /// # Safety
    /// `x` points at `n` readable f32; `dst` at `stride(n)` writable bytes.
    unsafe fn quantize(x: *const f32, n: usize, dst: *mut u8) {
        let nb = n / QK;
        let col = Column { at: dst, n };
        // SAFETY: the caller's contract for both pointers; ggml's CPU type traits are static,
        // and Q8_0's `from_float` writes `nb` blocks.
        unsafe {
            let q8 = col.q8().cast_mut();
            let tr = sys::ggml_get_type_traits_cpu(sys::ggml_type::GGML_TYPE_Q8_0);
            let from_float = (*tr).from_float.expect("ggml's CPU backend quantizes to Q8_0");
            from_float(x, q8.cast(), n as i64);
            let blocks = std::slice::from_raw_parts(q8, nb * Q8_0_BLOCK);
            let biased = std::slice::from_raw_parts_mut(dst, n);
            let scales = std::slice::from_raw_parts_mut(col.scales().cast_mut(), Self::scale_bytes(n) / 4);
            scales.fill(0.0);
            for (b, blk) in blocks.chunks_exact(Q8_0_BLOCK).enumerate() {
                let d = sys::ggml_fp16_to_fp32(u16::from_le_bytes([blk[0], blk[1]]));
                scales[b * 8..(b + 1) * 8].fill(d);
                for (j, &q) in blk[2..].iter().enumerate() {
                    biased[b * QK + j] = q ^ 0x80;
                }
            }
        }
    }
}

/// Whether this CPU runs the VNNI product.
fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The dot products of the MXFP4 row at `w` (`n` elements) with each of `cols`, into `out`:
/// ggml's bits.
///
/// # Safety
/// `w` points at `n / 32` MXFP4 blocks, readable; each column was written by
/// [`Column::quantize`] for `n`; `out` holds `cols.len()` writable f32.
unsafe fn dots(n: usize, w: *const u8, cols: &[Column], out: &mut [*mut f32], vnni: bool) {
    #[cfg(target_arch = "x86_64")]
    if vnni && (n / QK).is_multiple_of(2) {
        // SAFETY: the CPU has the features (`has_vnni`); the caller's contract.
        unsafe {
            match cols.len() {
                1 => return dots_vnni::<1>(n, w, cols, out),
                2 => return dots_vnni::<2>(n, w, cols, out),
                3 => return dots_vnni::<3>(n, w, cols, out),
                4 => return dots_vnni::<4>(n, w, cols, out),
                5 => return dots_vnni::<5>(n, w, cols, out),
                6 => return dots_vnni::<6>(n, w, cols, out),
                7 => return dots_vnni::<7>(n, w, cols, out),
                8 => return dots_vnni::<8>(n, w, cols, out),
                _ => {}
            }
        }
    }
    let _ = vnni;
    // SAFETY: ggml's MXFP4 `vec_dot` reads n / 32 blocks of each operand.
    unsafe {
        let tr = sys::ggml_get_type_traits_cpu(sys::ggml_type::GGML_TYPE_MXFP4);
        let vec_dot = (*tr).vec_dot.expect("ggml's CPU backend has an MXFP4 dot product");
        for (col, o) in cols.iter().zip(out.iter()) {
            vec_dot(n as i32, *o, 0, w.cast(), 0, col.q8().cast(), 0, 1);
        }
    }
}

/// See the module's notes; `n / 32` even. The row's nibbles are decoded once for the `C`
/// columns, and so is the correction for the unsigned inputs (Σ q of each lane); each
/// column then gets its own integer sums, scales and accumulator, as alone.
///
/// # Safety
/// The CPU has AVX-512 F, BW, DQ, VL and VNNI; as [`dots`], with `C` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn dots_vnni<const C: usize>(n: usize, w: *const u8, cols: &[Column], out: &mut [*mut f32]) {
    use std::arch::x86_64::*;
    // SAFETY: loads within the caller's `n / 32` blocks and each column's `n` bytes and
    // scales; the prefetch is a hint, valid for any address.
    unsafe {
        let lut = _mm512_broadcast_i32x4(_mm_loadu_si128(FP4_X2.as_ptr().cast()));
        let low4 = _mm512_set1_epi8(0x0f);
        let ones = _mm512_set1_epi8(1);
        // the 128-bit lanes: block 0's low nibbles, its high nibbles, then block 1's
        let shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
        let mut acc = [_mm512_setzero_ps(); C];
        let (biased, scales): ([*const u8; C], [*const f32; C]) = (std::array::from_fn(|c| cols[c].biased()), std::array::from_fn(|c| cols[c].scales()));
        let mut b = 0;
        while b + 1 < n / QK {
            let x0 = w.add(b * MXFP4_BLOCK);
            let x1 = x0.add(MXFP4_BLOCK);
            _mm_prefetch::<_MM_HINT_T0>(x0.add(PREFETCH).cast());
            let mut v = _mm512_broadcast_i32x4(_mm_loadu_si128(x0.add(1).cast()));
            v = _mm512_mask_broadcast_i32x4(v, 0xff00, _mm_loadu_si128(x1.add(1).cast()));
            let nib = _mm512_and_si512(_mm512_srlv_epi64(v, shift), low4);
            let q = _mm512_shuffle_epi8(lut, nib);
            // −128·Σ q + Σ (a + 128)·q = Σ a·q, exactly, in each 32-bit lane: the first term
            // is the second's starting value
            let t = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32::<7>(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, q)));
            // each lane's weight scale; times the column's, as ggml's product of the two
            let h = _mm512_mask_mov_ps(_mm512_set1_ps(e8m0_half(*x0)), 0xff00, _mm512_set1_ps(e8m0_half(*x1)));
            for c in 0..C {
                let u = _mm512_loadu_si512(biased[c].add(b * QK).cast());
                let s = _mm512_dpbusd_epi32(t, u, q);
                let d = _mm512_mul_ps(_mm512_loadu_ps(scales[c].add(b * 8)), h);
                acc[c] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), acc[c]);
            }
            b += 2;
        }
        for c in 0..C {
            // even blocks' accumulator + odd blocks', then 8 lanes to one in ggml's order
            let x = _mm256_add_ps(_mm512_castps512_ps256(acc[c]), _mm512_extractf32x8_ps::<1>(acc[c]));
            let r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
            let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
            let r = _mm_add_ss(r, _mm_movehdup_ps(r));
            *out[c] = _mm_cvtss_f32(r);
        }
    }
}

/// The quantizing op: F32 `x` [n_in, c, n] (rows contiguous) → I8 [stride, c, n], each
/// column as [`Column`] lays it out. The threads take the columns in turn.
///
/// # Safety
/// Called by ggml's CPU backend for a node built by [`quantize`].
unsafe extern "C" fn quantize_op(dst: *mut sys::ggml_tensor, ith: i32, nth: i32, _: *mut std::ffi::c_void) {
    // SAFETY: the node's source is the F32 tensor `quantize` checked, computed; `dst` has
    // room for every column.
    unsafe {
        let x = (*dst).src[0];
        let (n_in, xc, n) = ((*x).ne[0] as usize, (*x).ne[1] as usize, (*x).ne[2] as usize);
        for c in (ith as usize..xc * n).step_by(nth as usize) {
            let (j, t) = (c % xc, c / xc);
            let src = (*x).data.cast::<u8>().add(j * (*x).nb[1] + t * (*x).nb[2]).cast::<f32>();
            Column::quantize(src, n_in, (*dst).data.cast::<u8>().add(j * (*dst).nb[1] + t * (*dst).nb[2]));
        }
    }
}

/// An id of [`mul_mat_id`]'s `ids` that names no expert: the slot's output is zeros.
pub(crate) const EMPTY_SLOT: i32 = -1;

/// The product op: `mul_mat_id(w, x, ids)` for MXFP4 `w` [n_in, rows, n_expert]
/// (contiguous), `x` quantized by [`quantize_op`] [stride, 1 or k, n] and I32 `ids` [k, n] →
/// F32 [rows, k, n], as ggml computes it (`x`'s column for slot j of token t is j when it has
/// k of them, else 0); a slot whose id is [`EMPTY_SLOT`] gets zeros. Each thread takes its
/// share of every routed expert's rows, and runs each of those rows against every column
/// routed to that expert, up to [`COLUMNS`] at once, so an expert's rows are read from memory
/// once whatever number of tokens it has.
///
/// # Safety
/// Called by ggml's CPU backend for a node built by [`mul_mat_id`].
unsafe extern "C" fn mul_mat_id_op(dst: *mut sys::ggml_tensor, ith: i32, nth: i32, _: *mut std::ffi::c_void) {
    // SAFETY: the node's sources are the three tensors `mul_mat_id` checked, computed.
    unsafe {
        let (w, xq, ids) = ((*dst).src[0], (*dst).src[1], (*dst).src[2]);
        let (n_in, rows, n_expert) = ((*w).ne[0] as usize, (*w).ne[1] as usize, (*w).ne[2]);
        let (k, n) = ((*ids).ne[0] as usize, (*ids).ne[1] as usize);
        let xc = (*xq).ne[1] as usize;
        let (r0, r1) = (rows * ith as usize / nth as usize, rows * (ith as usize + 1) / nth as usize);
        if r0 == r1 {
            return;
        }
        let vnni = has_vnni();
        // The (expert, token, slot) of every pair, grouped by expert (ascending), in pair
        // order within an expert.
        let mut pairs: Vec<(usize, usize, usize)> = Vec::with_capacity(k * n);
        for t in 0..n {
            for j in 0..k {
                let e = *(*ids).data.cast::<u8>().add(j * (*ids).nb[0] + t * (*ids).nb[1]).cast::<i32>();
                if e == EMPTY_SLOT {
                    let out = (*dst).data.cast::<u8>().add(j * (*dst).nb[1] + t * (*dst).nb[2]).cast::<f32>();
                    std::slice::from_raw_parts_mut(out.add(r0), r1 - r0).fill(0.0);
                    continue;
                }
                // ggml's own bound: a router id outside the tensor is a bug upstream
                assert!(e >= 0 && i64::from(e) < n_expert, "expert id {e} outside 0..{n_expert}");
                pairs.push((e as usize, t, j));
            }
        }
        pairs.sort_by_key(|&(e, _, _)| e);
        let mut cols = [Column { at: std::ptr::null(), n: n_in }; COLUMNS];
        let (mut outs, mut at) = ([std::ptr::null_mut::<f32>(); COLUMNS], [std::ptr::null_mut::<f32>(); COLUMNS]);
        for group in pairs.chunk_by(|a, b| a.0 == b.0) {
            let base = (*w).data.cast::<u8>().add(group[0].0 * (*w).nb[2]);
            for chunk in group.chunks(COLUMNS) {
                let c = chunk.len();
                for (i, &(_, t, j)) in chunk.iter().enumerate() {
                    cols[i].at = (*xq).data.cast::<u8>().add(if xc == 1 { 0 } else { j } * (*xq).nb[1] + t * (*xq).nb[2]);
                    outs[i] = (*dst).data.cast::<u8>().add(j * (*dst).nb[1] + t * (*dst).nb[2]).cast::<f32>();
                }
                for r in r0..r1 {
                    for i in 0..c {
                        at[i] = outs[i].add(r);
                    }
                    dots(n_in, base.add(r * (*w).nb[1]), &cols[..c], &mut at[..c], vnni);
                }
            }
        }
    }
}

/// Whether [`mul_mat_id`] computes products of weight `w` (MXFP4, rows a multiple of 32
/// wide, contiguous, in the plain layout: not in ggml's repacked CPU buffer, whose tensors
/// carry its layout in `extra`) with F32 inputs of its width.
pub(crate) fn takes_weight(w: crate::ops::T) -> bool {
    // SAFETY: a live tensor.
    unsafe { (*w.0).type_ == sys::ggml_type::GGML_TYPE_MXFP4 && ((*w.0).ne[0] as usize).is_multiple_of(QK) && sys::ggml_is_contiguous(w.0) && (*w.0).extra.is_null() }
}

/// Whether a CPU's MXFP4 routed experts stay in the plain layout (not repacked): where this
/// CPU runs [`mul_mat_id`]'s VNNI product, which reads them faster than ggml's repacked one.
pub(crate) fn keeps_experts_plain() -> bool {
    has_vnni()
}

/// Whether [`mul_mat_id`] computes a product of weight `w` with input `x`: `w` as
/// [`takes_weight`] asks, and F32 `x` of its width whose rows are contiguous.
pub(crate) fn takes(w: crate::ops::T, x: crate::ops::T) -> bool {
    // SAFETY: live tensors of the step's context.
    takes_weight(w)
        && unsafe {
            (*x.0).type_ == sys::ggml_type::GGML_TYPE_F32
            && (*x.0).nb[0] == std::mem::size_of::<f32>()
            && (*x.0).ne[0] == (*w.0).ne[0]
    }
}

/// `x` F32 [n_in, c, n] (rows contiguous, `n_in` a multiple of 32) quantized for
/// [`mul_mat_id`], on every thread of the CPU backend (its own node: the graph's barrier
/// after it lets every thread of the product read every column).
pub(crate) fn quantize(g: &crate::ops::Ctx, x: crate::ops::T) -> crate::ops::T {
    let ne = [Column::stride(x.ne(0) as usize) as i64, x.ne(1), x.ne(2)];
    // SAFETY: the op reads its source only; no user data.
    unsafe { g.custom_all_threads(ggml::TensorType::I8, ne, &[x], quantize_op, std::ptr::null_mut()) }
}

/// `mul_mat_id(w, x, ids)` as the custom op above ([`takes`] `w` and `x`, `xq` =
/// [`quantize`]`(x)`), on every thread of the CPU backend.
pub(crate) fn mul_mat_id(g: &crate::ops::Ctx, w: crate::ops::T, xq: crate::ops::T, ids: crate::ops::T) -> crate::ops::T {
    let ne = [w.ne(1), ids.ne(0), ids.ne(1)];
    // SAFETY: the op reads its sources only; no user data.
    unsafe { g.custom_all_threads(ggml::TensorType::F32, ne, &[w, xq, ids], mul_mat_id_op, std::ptr::null_mut()) }
}

/// One timing of [`time_products`]: seconds per product of dflash's op (quantizing
/// included) and of ggml's `mul_mat_id` over the same weights and routing.
#[derive(Clone, Copy, Debug)]
pub struct ProductTimes {
    pub ours_s: f64,
    pub ggml_s: f64,
    /// Weight bytes of the routed experts, read once per product.
    pub weight_bytes: u64,
    /// (token, expert) pairs of a product.
    pub pairs: usize,
}

/// Times the expert product the CPU computes for cold experts: MXFP4 weights [n_in, rows,
/// n_expert] (random blocks, in a plain CPU buffer), `experts` of them routed, each by
/// `tokens` tokens (one slot a token), through dflash's op and ggml's `mul_mat_id`,
/// alternated, `reps` times each after one warm-up on `threads` threads. Best of the reps.
pub fn time_products(n_in: usize, rows: usize, n_expert: usize, experts: usize, tokens: usize, threads: usize, reps: usize) -> Result<ProductTimes, crate::GraphError> {
    use crate::ops::Ctx;
    let opt = |what: &str| crate::GraphError::Option(what.to_string());
    if n_in == 0 || !n_in.is_multiple_of(QK) || rows == 0 || experts == 0 || experts > n_expert || tokens == 0 || threads == 0 || reps == 0 {
        return Err(opt("time_products: n_in a multiple of 32; rows, tokens, threads and repetitions at least 1; 1 ≤ experts ≤ n_expert"));
    }
    // SAFETY: idempotent.
    unsafe { sys::ggml_cpu_init() };
    let n = experts * tokens;
    let ctx = ggml::Context::new_no_alloc(16, 32)?;
    let g = Ctx { raw: ctx.as_ptr() };
    let w = g.new_typed(ggml::TensorType::MXFP4, &[n_in as i64, rows as i64, n_expert as i64]);
    let x = g.new_typed(ggml::TensorType::F32, &[n_in as i64, 1, n as i64]);
    let ids = g.new_typed(ggml::TensorType::I32, &[1, n as i64]);
    let xq = quantize(&g, x);
    let ours = mul_mat_id(&g, w, xq, ids);
    let theirs = g.mm_id(w, x, ids);
    let cpu = ggml::Device::cpu()?;
    let (_buf, _) = crate::steps::place_packed(cpu.buffer_type(), &[w, x, ids, xq, ours, theirs], None)?;
    let row_bytes = n_in / QK * MXFP4_BLOCK;
    // SAFETY: each tensor is allocated with the sizes written here.
    unsafe {
        let wb = std::slice::from_raw_parts_mut((*w.0).data.cast::<u8>(), rows * n_expert * row_bytes);
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for blk in wb.chunks_exact_mut(MXFP4_BLOCK) {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            blk[0] = 120 + (s >> 59) as u8 % 12;
            for (i, b) in blk[1..].iter_mut().enumerate() {
                *b = (s >> (i % 8 * 8)) as u8 ^ i as u8;
            }
        }
        let xs = std::slice::from_raw_parts_mut((*x.0).data.cast::<f32>(), n_in * n);
        for (i, v) in xs.iter_mut().enumerate() {
            *v = ((i * 7919 % 1009) as f32 - 504.0) * 0.002;
        }
        // token t routes to the t mod experts-th of `experts` ids spread over the tensor
        let is = std::slice::from_raw_parts_mut((*ids.0).data.cast::<i32>(), n);
        for (t, v) in is.iter_mut().enumerate() {
            *v = ((t % experts) * n_expert / experts) as i32;
        }
    }
    let mut backend = ggml::Backend::cpu(threads)?;
    let (g_ours, g_theirs) = (g.new_graph(8), g.new_graph(8));
    g_ours.expand(ours);
    g_theirs.expand(theirs);
    let one = |graph: &crate::ops::Graph, backend: &mut ggml::Backend| -> Result<f64, crate::GraphError> {
        let t0 = std::time::Instant::now();
        // SAFETY: the graph's tensors are allocated in a CPU buffer.
        unsafe { backend.compute(graph.as_ptr()) }?;
        Ok(t0.elapsed().as_secs_f64())
    };
    let (mut ours_s, mut ggml_s) = (f64::MAX, f64::MAX);
    for rep in 0..=reps {
        let (a, b) = (one(&g_ours, &mut backend)?, one(&g_theirs, &mut backend)?);
        if rep > 0 {
            ours_s = ours_s.min(a);
            ggml_s = ggml_s.min(b);
        }
    }
    Ok(ProductTimes { ours_s, ggml_s, weight_bytes: (experts * rows * row_bytes) as u64, pairs: n })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random MXFP4 rows of `n` elements (exponents near 1, so products stay normal).
    fn rows(n: usize, count: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as u8
        };
        let mut w = vec![0u8; count * n / QK * MXFP4_BLOCK];
        for blk in w.chunks_exact_mut(MXFP4_BLOCK) {
            blk[0] = 120 + next() % 12;
            for b in &mut blk[1..] {
                *b = next();
            }
        }
        w
    }

    #[test]
    fn the_dot_products_give_ggmls_bits() {
        // SAFETY: initialises ggml's CPU tables (FP16 conversion), idempotent.
        unsafe { sys::ggml_cpu_init() };
        for n in [4096usize, 2048, 64, 96] {
            let w = rows(n, 64, n as u64);
            // nine columns: the VNNI product takes one to eight at once
            let stride = Column::stride(n);
            let mut q = vec![0u8; 9 * stride];
            for c in 0..9 {
                let x: Vec<f32> = (0..n).map(|i| ((i * 37 + c * 11) % 101) as f32 * 0.013 - 0.65).collect();
                // SAFETY: `x` holds n floats, `q` a column's stride at c · stride.
                unsafe { Column::quantize(x.as_ptr(), n, q.as_mut_ptr().add(c * stride)) };
            }
            let cols: Vec<Column> = (0..9).map(|c| Column { at: q[c * stride..].as_ptr(), n }).collect();
            let row = n / QK * MXFP4_BLOCK;
            for r in 0..64 {
                let wr = w[r * row..].as_ptr();
                let mut want = [0f32; 9];
                let mut at: Vec<*mut f32> = want.iter_mut().map(|v| v as *mut f32).collect();
                // SAFETY: `w` holds 64 rows of n / 32 blocks; nine columns, nine outputs.
                unsafe { dots(n, wr, &cols, &mut at, false) };
                for c in 1..=COLUMNS {
                    let mut got = [0f32; COLUMNS];
                    let mut at: Vec<*mut f32> = got.iter_mut().take(c).map(|v| v as *mut f32).collect();
                    // SAFETY: as above, c columns and outputs.
                    unsafe { dots(n, wr, &cols[9 - c..], &mut at, has_vnni()) };
                    for i in 0..c {
                        let (g, w) = (got[i], want[9 - c + i]);
                        assert_eq!(g.to_bits(), w.to_bits(), "n {n} row {r}, {c} column(s) at once, column {}: {g} against ggml's {w} (VNNI: {})", 9 - c + i, has_vnni());
                    }
                }
            }
        }
        // CI's machines have VNNI: the test checks the VNNI product there, not ggml against itself
        eprintln!("AVX-512 VNNI: {}", has_vnni());
    }

    #[test]
    fn the_expert_product_gives_ggmls_mul_mat_id_bits_and_zeros_for_empty_slots() {
        use crate::ops::Ctx;
        // SAFETY: idempotent.
        unsafe { sys::ggml_cpu_init() };
        // 16 tokens of 3 slots over 5 experts: about 10 columns an expert (two sets)
        let (n_in, n_rows, n_expert, k, n) = (2048usize, 48usize, 5usize, 3usize, 16usize);
        for x_cols in [1usize, k] {
            let ctx = ggml::Context::new_no_alloc(16, 64).expect("context");
            let g = Ctx { raw: ctx.as_ptr() };
            let w = g.new_typed(ggml::TensorType::MXFP4, &[n_in as i64, n_rows as i64, n_expert as i64]);
            let x = g.new_typed(ggml::TensorType::F32, &[n_in as i64, x_cols as i64, n as i64]);
            let ids = g.new_typed(ggml::TensorType::I32, &[k as i64, n as i64]);
            assert!(takes(w, x));
            let xq = quantize(&g, x);
            let ours = mul_mat_id(&g, w, xq, ids);
            let theirs = g.mm_id(w, x, ids);
            let cpu = ggml::Device::cpu().expect("CPU device");
            let (_buf, _) = crate::steps::place_packed(cpu.buffer_type(), &[w, x, ids, xq, ours, theirs], None).expect("buffer");
            let bytes = rows(n_in, n_rows * n_expert, 7);
            // SAFETY: each tensor is allocated with the sizes written here.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), (*w.0).data.cast::<u8>(), bytes.len());
                let xs = std::slice::from_raw_parts_mut((*x.0).data.cast::<f32>(), n_in * x_cols * n);
                for (i, v) in xs.iter_mut().enumerate() {
                    *v = ((i * 7919 % 1009) as f32 - 504.0) * 0.002;
                }
                let is = std::slice::from_raw_parts_mut((*ids.0).data.cast::<i32>(), k * n);
                for (i, v) in is.iter_mut().enumerate() {
                    *v = ((i * 3 + i / k) % n_expert) as i32;
                }
            }
            let graph = g.new_graph(16);
            graph.expand(ours);
            graph.expand(theirs);
            for threads in [1, 3] {
                let mut backend = ggml::Backend::cpu(threads).expect("CPU backend");
                // SAFETY: the graph's tensors are allocated in a CPU buffer.
                unsafe { backend.compute(graph.as_ptr()) }.expect("compute");
                // SAFETY: both are F32 [n_rows, k, n], computed.
                let (a, b) = unsafe {
                    (
                        std::slice::from_raw_parts((*ours.0).data.cast::<u32>(), n_rows * k * n),
                        std::slice::from_raw_parts((*theirs.0).data.cast::<u32>(), n_rows * k * n),
                    )
                };
                assert_eq!(a, b, "x with {x_cols} column(s) a token, {threads} thread(s)");
                assert!(a.iter().any(|&v| v != 0), "the products are not all zero");
            }
            // every fourth slot empty: zeros there, the same products elsewhere
            let row = n_rows;
            // SAFETY: F32 [n_rows, k, n] and I32 [k, n], allocated and computed.
            let want: Vec<u32> = unsafe { std::slice::from_raw_parts((*theirs.0).data.cast::<u32>(), n_rows * k * n).to_vec() };
            // SAFETY: as above; `ours` is overwritten with a pattern no product gives.
            unsafe {
                let is = std::slice::from_raw_parts_mut((*ids.0).data.cast::<i32>(), k * n);
                for v in is.iter_mut().skip(1).step_by(4) {
                    *v = EMPTY_SLOT;
                }
                std::slice::from_raw_parts_mut((*ours.0).data.cast::<u32>(), n_rows * k * n).fill(u32::MAX);
            }
            let only_ours = g.new_graph(16);
            only_ours.expand(ours);
            let mut backend = ggml::Backend::cpu(3).expect("CPU backend");
            // SAFETY: as above.
            unsafe { backend.compute(only_ours.as_ptr()) }.expect("compute");
            // SAFETY: F32 [n_rows, k, n], computed.
            let got = unsafe { std::slice::from_raw_parts((*ours.0).data.cast::<u32>(), n_rows * k * n) };
            for slot in 0..k * n {
                let (g, w) = (&got[slot * row..(slot + 1) * row], &want[slot * row..(slot + 1) * row]);
                if slot % 4 == 1 {
                    assert!(g.iter().all(|&v| v == 0), "slot {slot}: an empty slot gives zeros");
                } else {
                    assert_eq!(g, w, "slot {slot}: the other slots keep their products");
                }
            }
        }
    }
}
