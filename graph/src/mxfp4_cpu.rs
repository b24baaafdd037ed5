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

/// One activation column quantized to Q8_0 by ggml, and the same bytes as the VNNI product
/// reads them: each plus 128 (unsigned), and each block's scale as f32.
struct Column {
    q8: Vec<u8>,
    biased: Vec<u8>,
    scale: Vec<f32>,
}

impl Column {
    /// # Safety
    /// `x` points at `n` readable f32 (`n` a multiple of 32).
    unsafe fn quantize(x: *const f32, n: usize) -> Column {
        let nb = n / QK;
        let mut q8 = vec![0u8; nb * Q8_0_BLOCK];
        // SAFETY: ggml's CPU type traits are static; Q8_0's `from_float` writes `nb` blocks.
        unsafe {
            let tr = sys::ggml_get_type_traits_cpu(sys::ggml_type::GGML_TYPE_Q8_0);
            let from_float = (*tr).from_float.expect("ggml's CPU backend quantizes to Q8_0");
            from_float(x, q8.as_mut_ptr().cast(), n as i64);
        }
        let mut biased = vec![0u8; n];
        let mut scale = vec![0f32; nb];
        for (b, blk) in q8.chunks_exact(Q8_0_BLOCK).enumerate() {
            // SAFETY: a pure conversion.
            scale[b] = unsafe { sys::ggml_fp16_to_fp32(u16::from_le_bytes([blk[0], blk[1]])) };
            for (j, &q) in blk[2..].iter().enumerate() {
                biased[b * QK + j] = (q as i8 as i16 + 128) as u8;
            }
        }
        Column { q8, biased, scale }
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

/// The dot product of the MXFP4 row at `w` (`n` elements) with `col`: ggml's bits.
///
/// # Safety
/// `w` points at `n / 32` MXFP4 blocks, readable.
unsafe fn dot(n: usize, w: *const u8, col: &Column, vnni: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if vnni && (n / QK).is_multiple_of(2) {
        // SAFETY: the CPU has the features (`has_vnni`); the caller's contract for `w`.
        return unsafe { dot_vnni(n, w, col) };
    }
    let _ = vnni;
    let mut s = 0f32;
    // SAFETY: ggml's MXFP4 `vec_dot` reads n / 32 blocks of each operand.
    unsafe {
        let tr = sys::ggml_get_type_traits_cpu(sys::ggml_type::GGML_TYPE_MXFP4);
        let vec_dot = (*tr).vec_dot.expect("ggml's CPU backend has an MXFP4 dot product");
        vec_dot(n as i32, &mut s, 0, w.cast(), 0, col.q8.as_ptr().cast(), 0, 1);
    }
    s
}

/// See the module's notes; `n / 32` even.
///
/// # Safety
/// The CPU has AVX-512 F, BW, DQ, VL and VNNI; `w` points at `n / 32` MXFP4 blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
unsafe fn dot_vnni(n: usize, w: *const u8, col: &Column) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: loads within the caller's `n / 32` blocks and `col`'s `n` bytes and scales; the
    // prefetch is a hint, valid for any address.
    unsafe {
        let lut = _mm512_broadcast_i32x4(_mm_loadu_si128(FP4_X2.as_ptr().cast()));
        let low4 = _mm512_set1_epi8(0x0f);
        let ones = _mm512_set1_epi8(1);
        // the 128-bit lanes: block 0's low nibbles, its high nibbles, then block 1's
        let shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
        let mut acc = _mm512_setzero_ps();
        let mut b = 0;
        while b + 1 < n / QK {
            let x0 = w.add(b * MXFP4_BLOCK);
            let x1 = x0.add(MXFP4_BLOCK);
            _mm_prefetch::<_MM_HINT_T0>(x0.add(PREFETCH).cast());
            let mut v = _mm512_broadcast_i32x4(_mm_loadu_si128(x0.add(1).cast()));
            v = _mm512_mask_broadcast_i32x4(v, 0xff00, _mm_loadu_si128(x1.add(1).cast()));
            let nib = _mm512_and_si512(_mm512_srlv_epi64(v, shift), low4);
            let q = _mm512_shuffle_epi8(lut, nib);
            let u = _mm512_loadu_si512(col.biased.as_ptr().add(b * QK).cast());
            // Σ (a + 128)·q − 128·Σ q = Σ a·q, exactly, in each 32-bit lane
            let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, q);
            let t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, q);
            let s = _mm512_sub_epi32(s, _mm512_slli_epi32::<7>(t));
            let d0 = col.scale[b] * e8m0_half(*x0);
            let d1 = col.scale[b + 1] * e8m0_half(*x1);
            let d = _mm512_mask_mov_ps(_mm512_set1_ps(d0), 0xff00, _mm512_set1_ps(d1));
            acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), acc);
            b += 2;
        }
        // even blocks' accumulator + odd blocks', then 8 lanes to one in ggml's order
        let x = _mm256_add_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps::<1>(acc));
        let r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }
}

/// The custom op: `mul_mat_id(w, x, ids)` for MXFP4 `w` [n_in, rows, n_expert] (contiguous),
/// F32 `x` [n_in, 1 or k, n] and I32 `ids` [k, n] → F32 [rows, k, n], as ggml computes it
/// (`x`'s column for slot j of token t is j when it has k of them, else 0). Each thread takes
/// its share of every pair's rows, and quantizes every column itself (a custom op has no
/// barrier to share them at; at decode's sizes, up to 8 tokens of the split, a few hundred KB
/// of floats at most, against the megabytes of weights each thread reads).
///
/// # Safety
/// Called by ggml's CPU backend for a node built by [`mul_mat_id`].
unsafe extern "C" fn mul_mat_id_op(dst: *mut sys::ggml_tensor, ith: i32, nth: i32, _: *mut std::ffi::c_void) {
    // SAFETY: the node's sources are the three tensors `mul_mat_id` checked, computed.
    unsafe {
        let (w, x, ids) = ((*dst).src[0], (*dst).src[1], (*dst).src[2]);
        let (n_in, rows, n_expert) = ((*w).ne[0] as usize, (*w).ne[1] as usize, (*w).ne[2]);
        let (k, n) = ((*ids).ne[0] as usize, (*ids).ne[1] as usize);
        let x_cols = (*x).ne[1] as usize;
        let (r0, r1) = (rows * ith as usize / nth as usize, rows * (ith as usize + 1) / nth as usize);
        if r0 == r1 {
            return;
        }
        let vnni = has_vnni();
        let cols: Vec<Column> = (0..x_cols * n)
            .map(|c| {
                let (j, t) = (c % x_cols, c / x_cols);
                Column::quantize((*x).data.cast::<u8>().add(j * (*x).nb[1] + t * (*x).nb[2]).cast(), n_in)
            })
            .collect();
        for t in 0..n {
            for j in 0..k {
                let e = *(*ids).data.cast::<u8>().add(j * (*ids).nb[0] + t * (*ids).nb[1]).cast::<i32>();
                // ggml's own bound: a router id outside the tensor is a bug upstream
                assert!(e >= 0 && i64::from(e) < n_expert, "expert id {e} outside 0..{n_expert}");
                let col = &cols[t * x_cols + if x_cols == 1 { 0 } else { j }];
                let base = (*w).data.cast::<u8>().add(e as usize * (*w).nb[2]);
                let out = (*dst).data.cast::<u8>().add(j * (*dst).nb[1] + t * (*dst).nb[2]).cast::<f32>();
                for r in r0..r1 {
                    *out.add(r) = dot(n_in, base.add(r * (*w).nb[1]), col, vnni);
                }
            }
        }
    }
}

/// Whether [`mul_mat_id`] computes a product of weight `w` with input `x`: MXFP4 `w`,
/// contiguous, and F32 `x` whose rows are contiguous.
pub(crate) fn takes(w: crate::ops::T, x: crate::ops::T) -> bool {
    // SAFETY: live tensors of the step's context.
    unsafe {
        (*w.0).type_ == sys::ggml_type::GGML_TYPE_MXFP4
            && ((*w.0).ne[0] as usize).is_multiple_of(QK)
            && sys::ggml_is_contiguous(w.0)
            && (*x.0).type_ == sys::ggml_type::GGML_TYPE_F32
            && (*x.0).nb[0] == std::mem::size_of::<f32>()
            && (*x.0).ne[0] == (*w.0).ne[0]
    }
}

/// `mul_mat_id(w, x, ids)` as the custom op above ([`takes`] `w`), on every thread of the
/// CPU backend.
pub(crate) fn mul_mat_id(g: &crate::ops::Ctx, w: crate::ops::T, x: crate::ops::T, ids: crate::ops::T) -> crate::ops::T {
    let ne = [w.ne(1), ids.ne(0), ids.ne(1)];
    // SAFETY: the op reads its sources only; no user data.
    unsafe { g.custom_all_threads(ggml::TensorType::F32, ne, &[w, x, ids], mul_mat_id_op, std::ptr::null_mut()) }
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
    fn the_dot_product_gives_ggmls_bits() {
        // SAFETY: initialises ggml's CPU tables (FP16 conversion), idempotent.
        unsafe { sys::ggml_cpu_init() };
        for n in [4096usize, 2048, 64, 96] {
            let w = rows(n, 64, n as u64);
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
            // SAFETY: `x` holds n floats; `w` 64 rows of n / 32 blocks.
            let col = unsafe { Column::quantize(x.as_ptr(), n) };
            let row = n / QK * MXFP4_BLOCK;
            for r in 0..64 {
                let got = unsafe { dot(n, w.as_ptr().add(r * row), &col, has_vnni()) };
                let want = unsafe { dot(n, w.as_ptr().add(r * row), &col, false) };
                assert_eq!(got.to_bits(), want.to_bits(), "n {n} row {r}: {got} against ggml's {want} (VNNI: {})", has_vnni());
            }
        }
        // CI's machines have VNNI: the test checks the VNNI product there, not ggml against itself
        eprintln!("AVX-512 VNNI: {}", has_vnni());
    }

    #[test]
    fn the_expert_product_gives_ggmls_mul_mat_id_bits() {
        use crate::ops::Ctx;
        // SAFETY: idempotent.
        unsafe { sys::ggml_cpu_init() };
        let (n_in, n_rows, n_expert, k, n) = (2048usize, 48usize, 5usize, 3usize, 4usize);
        for x_cols in [1usize, k] {
            let ctx = ggml::Context::new_no_alloc(16, 16).expect("context");
            let g = Ctx { raw: ctx.as_ptr() };
            let w = g.new_typed(ggml::TensorType::MXFP4, &[n_in as i64, n_rows as i64, n_expert as i64]);
            let x = g.new_typed(ggml::TensorType::F32, &[n_in as i64, x_cols as i64, n as i64]);
            let ids = g.new_typed(ggml::TensorType::I32, &[k as i64, n as i64]);
            assert!(takes(w, x));
            let ours = mul_mat_id(&g, w, x, ids);
            let theirs = g.mm_id(w, x, ids);
            let cpu = ggml::Device::cpu().expect("CPU device");
            let (_buf, _) = crate::steps::place_packed(cpu.buffer_type(), &[w, x, ids, ours, theirs], None).expect("buffer");
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
        }
    }
}
