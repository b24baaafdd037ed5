//! Builds ggml (only ggml: base, CPU backend, the backend registry) as shared libraries from
//! the source tree of the pinned crates.io package `llama-cpp-sys-2`, and generates bindings.
//!
//! Shared libraries, because the CUDA backend is a module loaded at run time
//! (`ggml_backend_load`) that links against `libggml-base.so`: our binaries and that module
//! must share one copy of ggml-base. The libraries are copied next to the binaries
//! (`target/<profile>/`), which find them through the rpath set in `.cargo/config.toml`.
//!
//! Environment:
//! - `DFLASH_GGML_SRC`: use this ggml source directory instead of the pinned package's.
//! - `DFLASH_GGML_NATIVE` (default 1): build the CPU backend for this machine's CPU (0: a
//!   portable x86-64 AVX2/FMA/F16C build, for binaries carried to other machines). On x86-64
//!   the machine's instruction sets are named one by one (`x86_features`), not taken from
//!   `-march=native`.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const LLAMA_SYS_PACKAGE: &str = "llama-cpp-sys-2";

/// The x86-64 instruction sets of this machine that ggml's CPU backend has a CMake switch for.
///
/// Why not `GGML_NATIVE` (`-march=native`): on an AMD EPYC (Zen 4) host, GCC 12 with
/// `-march=native` compiled ggml's CPU backend so that a token's logits depended on how many
/// other tokens shared its step: every `tests/batch.rs` fixture differed, by up to 1.8e-5.
/// The cause is the Zen tuning's `avoid_fma_chains` / `avoid_fma256_chains`, which split some
/// multiply-add chains into a multiply and an add where the same loop's other iterations
/// (vector body or scalar tail, by the batch's size) fuse them (`-mtune=native` alone breaks
/// it; adding `-mtune-ctrl=^avoid_fma_chains,^avoid_fma256_chains` mends it). The same
/// instruction sets named one by one (there AVX-512 with VBMI, VNNI and BF16), with generic
/// tuning, give every token the same bits batched or alone, as `-march=native` did on Intel
/// hosts, at the same speed within noise (medium model, `bench decode`, 1 and 8 sequences).
#[cfg(target_arch = "x86_64")]
fn x86_features() -> Vec<&'static str> {
    use std::arch::is_x86_feature_detected as has;
    let mut f = Vec::new();
    for (name, on) in [
        ("SSE42", has!("sse4.2")),
        ("AVX", has!("avx")),
        ("AVX2", has!("avx2")),
        ("FMA", has!("fma")),
        ("F16C", has!("f16c")),
        ("BMI2", has!("bmi2")),
        ("AVX_VNNI", has!("avxvnni")),
        ("AVX512", has!("avx512f") && has!("avx512cd") && has!("avx512vl") && has!("avx512dq") && has!("avx512bw")),
        ("AVX512_VBMI", has!("avx512vbmi")),
        ("AVX512_VNNI", has!("avx512vnni")),
        ("AVX512_BF16", has!("avx512bf16")),
        // (AMX's detection is not stable in std: the kernel's list, which names only what
        // it enabled)
        ("AMX_TILE", cpuinfo_has("amx_tile")),
        ("AMX_INT8", cpuinfo_has("amx_int8")),
        ("AMX_BF16", cpuinfo_has("amx_bf16")),
    ] {
        if on {
            f.push(name);
        }
    }
    f
}

/// Whether /proc/cpuinfo's first `flags` line names `flag` (false where there is none).
#[cfg(target_arch = "x86_64")]
fn cpuinfo_has(flag: &str) -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("flags")).map(|l| l.split_whitespace().any(|w| w == flag)))
        .unwrap_or(false)
}

/// (Only x86-64 hosts name their instruction sets; elsewhere native builds use `GGML_NATIVE`.)
#[cfg(not(target_arch = "x86_64"))]
fn x86_features() -> Vec<&'static str> {
    Vec::new()
}

fn ggml_source_dir() -> PathBuf {
    println!("cargo:rerun-if-env-changed=DFLASH_GGML_SRC");
    if let Ok(dir) = env::var("DFLASH_GGML_SRC") {
        return PathBuf::from(dir);
    }
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(manifest_dir.join("Cargo.toml"))
        .output()
        .expect("failed to run `cargo metadata` to locate the llama-cpp-sys-2 source");
    if !out.status.success() {
        panic!(
            "`cargo metadata` failed while locating the ggml source:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("`cargo metadata` printed invalid JSON");
    let packages = meta["packages"].as_array().expect("`cargo metadata` has no packages");
    let pkg = packages
        .iter()
        .find(|p| p["name"] == LLAMA_SYS_PACKAGE)
        .unwrap_or_else(|| panic!("package {LLAMA_SYS_PACKAGE} not found in `cargo metadata`"));
    let manifest = pkg["manifest_path"].as_str().expect("manifest_path");
    Path::new(manifest)
        .parent()
        .expect("manifest has a parent")
        .join("llama.cpp")
        .join("ggml")
}

/// `target/<profile>` for this build: OUT_DIR is `target/<profile>/build/<pkg>-<hash>/out`.
fn profile_dir() -> PathBuf {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    out.ancestors().nth(3).expect("OUT_DIR is three levels below the profile dir").to_path_buf()
}

fn main() {
    let ggml_src = ggml_source_dir();
    let include = ggml_src.join("include");
    assert!(
        include.join("ggml.h").exists(),
        "no ggml.h under {} (set DFLASH_GGML_SRC to a ggml source tree)",
        include.display()
    );
    println!("cargo:rerun-if-env-changed=DFLASH_GGML_NATIVE");
    // llamafile's tinyBLAS kernels for ggml's CPU matrix products (F32, F16, BF16, Q8_0, Q4_0,
    // ... on x86 and Arm), on in llama.cpp's own build, are off here unless
    // DFLASH_GGML_LLAMAFILE=1: with them a column's product depends on how many columns the
    // product has, so a sequence batched with others no longer gets its logits alone bit for
    // bit (tests/batch.rs fails). Measured with them on the 2-core VM: prefill +27%, 8-sequence
    // decode +17%, single decode unchanged (BENCHMARKS.md, "Batched decode (CPU)").
    println!("cargo:rerun-if-env-changed=DFLASH_GGML_LLAMAFILE");
    let llamafile = env::var("DFLASH_GGML_LLAMAFILE").is_ok_and(|v| v == "1");
    let native = env::var("DFLASH_GGML_NATIVE").map(|v| v != "0").unwrap_or(true);
    let glue = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("../vendor/ggml");
    println!("cargo:rerun-if-changed={}", glue.join("CMakeLists.txt").display());

    let mut cfg = cmake::Config::new(&glue);
    cfg.define("GGML_SRC_DIR", &ggml_src)
        .define("BUILD_SHARED_LIBS", "ON")
        .define("GGML_BACKEND_DL", "OFF")
        .define("GGML_CPU", "ON")
        .define("GGML_BUILD_TESTS", "OFF")
        .define("GGML_BUILD_EXAMPLES", "OFF")
        .define("GGML_OPENMP", "ON")
        .define("GGML_CCACHE", "OFF")
        .define("GGML_LLAMAFILE", if llamafile { "ON" } else { "OFF" })
        .define("CMAKE_BUILD_TYPE", "Release")
        // libggml.so finds libggml-cpu.so beside itself.
        .define("CMAKE_INSTALL_RPATH", "$ORIGIN")
        .profile("Release");
    let host_x86 = env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "x86_64") && env::var("TARGET").ok() == env::var("HOST").ok();
    if native && host_x86 {
        cfg.define("GGML_NATIVE", "OFF");
        for f in x86_features() {
            cfg.define(format!("GGML_{f}"), "ON");
        }
    } else if native {
        cfg.define("GGML_NATIVE", "ON");
    } else {
        cfg.define("GGML_NATIVE", "OFF")
            .define("GGML_AVX", "ON")
            .define("GGML_AVX2", "ON")
            .define("GGML_FMA", "ON")
            .define("GGML_F16C", "ON")
            .define("GGML_BMI2", "ON");
    }
    let dst = cfg.build();
    let libdir = dst.join("lib");

    // Copy the shared libraries next to the binaries so that `$ORIGIN` rpaths find them.
    let profile = profile_dir();
    for entry in std::fs::read_dir(&libdir).expect("ggml lib dir") {
        let path = entry.expect("lib dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.contains(".so") {
            let target = profile.join(&name);
            let _ = std::fs::remove_file(&target);
            if path.is_symlink() {
                let link = std::fs::read_link(&path).expect("read_link");
                std::os::unix::fs::symlink(link, &target).expect("symlink ggml lib");
            } else {
                std::fs::copy(&path, &target).expect("copy ggml lib");
            }
        }
    }

    println!("cargo:rustc-link-search=native={}", libdir.display());
    println!("cargo:rustc-link-lib=dylib=ggml");
    println!("cargo:rustc-link-lib=dylib=ggml-base");
    println!("cargo:rustc-link-lib=dylib=ggml-cpu");
    println!("cargo:lib_dir={}", libdir.display());
    println!("cargo:src_dir={}", ggml_src.display());
    println!("cargo:rerun-if-changed=wrapper.h");

    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_function("ggml_.*")
        .allowlist_function("gguf_.*")
        .allowlist_type("ggml_.*")
        .allowlist_type("gguf_.*")
        .allowlist_var("GGML_.*")
        .allowlist_var("GGUF_.*")
        .default_enum_style(bindgen::EnumVariation::ModuleConsts)
        .derive_default(true)
        .layout_tests(false)
        .generate()
        .expect("bindgen failed on the ggml headers");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindings.write_to_file(out).expect("write bindings");
}
