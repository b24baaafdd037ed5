//! `dflash devices`: what ggml sees, and a matmul check of each device against the CPU.
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use ggml::{sys, Backend, Buffer, Context, Device};
use rand::{Rng as _, SeedableRng as _};
use rand_xoshiro::Xoshiro256StarStar;

#[derive(clap::Args)]
pub struct Args {
    /// Multiply two N×N matrices (F16 weights × F32 activations) on every device and compare
    /// each result with the CPU backend's (relative L2 error).
    #[arg(long, value_name = "N")]
    check_matmul: Option<usize>,
    /// CPU threads for the reference.
    #[arg(short = 't', long, default_value_t = default_threads())]
    threads: usize,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub fn run(args: Args) -> Result<()> {
    for d in Device::all() {
        let (free, total) = d.memory();
        println!(
            "{:<8} {:<14} {:?}  memory {:.1}/{:.1} GiB free",
            d.name(),
            format!("{:?}", d.kind()),
            d.description(),
            free as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64
        );
    }
    if let Some(n) = args.check_matmul {
        let (a, b) = inputs(n);
        let cpu = Device::cpu()?;
        let (reference, secs) = matmul(cpu, n, &a, &b, args.threads, true)?;
        println!("matmul {n}x{n} F16 x F32 on {}: {:.3} ms", cpu.name(), secs * 1e3);
        let mut worst: f64 = 0.0;
        for d in Device::all().into_iter().filter(|d| d.kind() != ggml::DeviceKind::Cpu) {
            // ggml's default precision lets a GPU accumulate in F16; dflash's graphs ask for
            // F32 accumulation (GGML_PREC_F32), which is what must match the CPU.
            for f32_acc in [false, true] {
                let (out, secs) = matmul(d, n, &a, &b, args.threads, f32_acc)?;
                let err = rel_l2(&out, &reference);
                let prec = if f32_acc { "F32 accumulation" } else { "default precision" };
                println!("matmul {n}x{n} F16 x F32 on {} ({prec}): {:.3} ms, relative L2 error vs CPU {err:.3e}", d.name(), secs * 1e3);
                if f32_acc {
                    worst = worst.max(err);
                }
            }
        }
        if worst > 1e-3 {
            bail!("a device's matmul differs from the CPU's by {worst:.3e} (limit 1e-3)");
        }
    }
    Ok(())
}

/// Seeded uniform values in [-1, 1): A as F16, B as F32.
fn inputs(n: usize) -> (Vec<u16>, Vec<f32>) {
    let mut rng = Xoshiro256StarStar::seed_from_u64(1);
    let mut next = move || rng.random_range(-1.0f32..1.0);
    let a32: Vec<f32> = (0..n * n).map(|_| next()).collect();
    let mut a = vec![0u16; n * n];
    // SAFETY: both slices hold n*n elements.
    unsafe { sys::ggml_fp32_to_fp16_row(a32.as_ptr(), a.as_mut_ptr().cast(), (n * n) as i64) };
    let b = (0..n * n).map(|_| next()).collect();
    (a, b)
}

/// C = A · B on `device`; returns C and the compute time of the second of two runs.
fn matmul(device: Device, n: usize, a: &[u16], b: &[f32], threads: usize, f32_acc: bool) -> Result<(Vec<f32>, f64)> {
    let mut backend = Backend::new(device)?;
    backend.set_threads(threads);
    let ctx = Context::new_no_alloc(3, 8)?;
    // SAFETY: tensors are created in a live context; data sizes match the tensor sizes.
    unsafe {
        let ta = sys::ggml_new_tensor_2d(ctx.as_ptr(), sys::ggml_type::GGML_TYPE_F16, n as i64, n as i64);
        let tb = sys::ggml_new_tensor_2d(ctx.as_ptr(), sys::ggml_type::GGML_TYPE_F32, n as i64, n as i64);
        let tc = sys::ggml_mul_mat(ctx.as_ptr(), ta, tb);
        if f32_acc {
            sys::ggml_mul_mat_set_prec(tc, sys::ggml_prec::GGML_PREC_F32);
        }
        let gf = sys::ggml_new_graph_custom(ctx.as_ptr(), 8, false);
        sys::ggml_build_forward_expand(gf, tc);
        let _buffer = Buffer::alloc_context_tensors(&ctx, device.buffer_type()).context("allocating the matmul check")?;
        ggml::backend::tensor_set(ta, std::slice::from_raw_parts(a.as_ptr().cast(), a.len() * 2), 0);
        ggml::backend::tensor_set(tb, std::slice::from_raw_parts(b.as_ptr().cast(), b.len() * 4), 0);
        backend.compute(gf)?;
        let t0 = Instant::now();
        backend.compute(gf)?;
        let secs = t0.elapsed().as_secs_f64();
        let mut out = vec![0f32; n * n];
        ggml::backend::tensor_get(tc, std::slice::from_raw_parts_mut(out.as_mut_ptr().cast(), out.len() * 4), 0);
        Ok((out, secs))
    }
}

fn rel_l2(x: &[f32], r: &[f32]) -> f64 {
    let num: f64 = x.iter().zip(r).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = r.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}
