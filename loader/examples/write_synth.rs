//! Write a synthetic deepseek4 GGUF (seeded random weights, quantized by ggml).
//!
//! ```text
//! write_synth [--spec tiny|medium|v4-flash] [--layers N] [--type TYPE] [--expert-type TYPE]
//!             [--vocab N] [--tokenizer-from GGUF] [--seed N] [--router-skew none|v4-flash] OUT.gguf
//! write_synth --extract-tokenizer SRC.gguf OUT.gguf
//! write_synth --requantize-experts SRC.gguf --expert-type TYPE OUT.gguf
//! write_synth OUT.gguf [tiny|medium] [VOCAB]            (older positional form)
//! ```
//!
//! `--type` sets the dense matrices and, unless `--expert-type` is given, the routed experts
//! (f32, f16, bf16, q8_0, mxfp4, ... any ggml type name). `--tokenizer-from` copies every
//! `tokenizer.*` key of another GGUF (e.g. models/tiny-ds4.gguf, the real DeepSeek V4
//! vocabulary) and sizes the vocabulary to it; llama.cpp needs such a real BPE tokenizer.
//! `--extract-tokenizer` writes a tensor-less GGUF holding only those keys (4 MB instead of
//! the 66 MB tiny model) for machines that must write the model themselves.
//! `--requantize-experts` copies SRC (with F32 routed experts) with the experts quantized to
//! `--expert-type` (q8_0, q4_0, mxfp4, f16 or bf16) and every other byte as it is: the Q8_0
//! fixture is `write_synth --requantize-experts tests/fixtures/ds4-tiny-a.f32.gguf
//! --expert-type q8_0 tests/fixtures/ds4-tiny-a.q8_0.gguf`.
//!
//! The CPU benchmark model: `write_synth --spec medium --type q8_0 --tokenizer-from
//! models/tiny-ds4.gguf bench-data/medium-q8_0.gguf`.
//!
//! With `--router-skew v4-flash` (the medium model routes uniformly otherwise) a few experts
//! per layer take most routed slots, as in the real model: the adaptive placement's benchmark.
//!
//! The full-width benchmark models (`scripts/device/fullwidth-vs-llama.sh`): `write_synth
//! --spec v4-flash --layers 8 --tokenizer-from models/tiny-ds4.gguf OUT.gguf` — DeepSeek V4
//! Flash's widths with 8 layers, MXFP4 experts, Q8_0 elsewhere, the real routing skew
//! (`loader::synth::RouterSkew::V4_FLASH`); 3.5 GB per layer.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use ggml::TensorType;
use loader::synth::{tokenizer_keys, SynthModel, SynthSpec};

const USAGE: &str = "usage: write_synth [--spec tiny|medium|v4-flash] [--layers N] [--type TYPE] [--expert-type TYPE] \
[--vocab N] [--tokenizer-from GGUF] [--seed N] [--router-skew none|v4-flash] OUT.gguf\n       write_synth --extract-tokenizer SRC.gguf OUT.gguf\n       \
write_synth --requantize-experts SRC.gguf --expert-type TYPE OUT.gguf";

/// llama.cpp's `general.file_type` (`llama_ftype`) for a file whose experts are `ty`.
fn file_type(ty: TensorType) -> Result<u32, String> {
    Ok(match ty.name() {
        "f16" => 1,
        "q4_0" => 2,
        "q8_0" => 7,
        "bf16" => 32,
        "mxfp4" => 38,
        other => return Err(format!("--requantize-experts: no llama.cpp file type for {other} experts (q8_0, q4_0, mxfp4, f16 or bf16)")),
    })
}

fn tensor_type(name: &str) -> Result<TensorType, String> {
    (0..ggml::sys::ggml_type::GGML_TYPE_COUNT)
        .filter_map(TensorType::from_raw)
        .find(|t| t.name().eq_ignore_ascii_case(name))
        .ok_or_else(|| format!("unknown tensor type '{name}' (expected a ggml type name such as f32, f16, q8_0)"))
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    v.parse().map_err(|e| format!("{flag} '{v}': {e}"))
}

fn spec_named(name: &str) -> Result<SynthSpec, String> {
    match name {
        "tiny" => Ok(SynthSpec::tiny()),
        "medium" => Ok(SynthSpec::medium()),
        "v4-flash" => Ok(SynthSpec::v4_flash(8)),
        other => Err(format!("unknown spec '{other}' (expected tiny, medium or v4-flash)")),
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut spec = SynthSpec::tiny();
    let (mut matrix, mut expert, mut vocab, mut tokenizer, mut seed, mut extract, mut skew) = (None, None, None, None, None, None, None);
    let mut requantize: Option<PathBuf> = None;
    let mut layers = None;
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--spec" => spec = spec_named(value()?)?,
            "--type" => matrix = Some(tensor_type(value()?)?),
            "--expert-type" => expert = Some(tensor_type(value()?)?),
            "--vocab" => vocab = Some(number::<usize>(a, value()?)?),
            "--layers" => layers = Some(number::<usize>(a, value()?)?),
            "--tokenizer-from" => tokenizer = Some(PathBuf::from(value()?)),
            "--seed" => seed = Some(number::<u64>(a, value()?)?),
            "--extract-tokenizer" => extract = Some(PathBuf::from(value()?)),
            "--requantize-experts" => requantize = Some(PathBuf::from(value()?)),
            "--router-skew" => {
                skew = Some(match value()?.as_str() {
                    "none" => None,
                    "v4-flash" => Some(loader::synth::RouterSkew::V4_FLASH),
                    other => return Err(format!("--router-skew '{other}': expected none or v4-flash")),
                })
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}\n{USAGE}")),
            _ => positional.push(a.clone()),
        }
    }
    let Some(out) = positional.first().map(PathBuf::from) else {
        return Err(USAGE.to_string());
    };
    // Older positional form: OUT [tiny|medium] [VOCAB].
    if let Some(name) = positional.get(1) {
        spec = spec_named(name)?;
    }
    if let Some(v) = positional.get(2) {
        vocab = Some(number::<usize>("VOCAB", v)?);
    }
    if let Some(src) = extract {
        let keys = tokenizer_keys(&src).map_err(|e| e.to_string())?;
        let n = keys.len();
        SynthModel { metadata: keys, tensors: Vec::new(), seed: 0, router_skew: None }.write(&out, false).map_err(|e| format!("{}: {e}", out.display()))?;
        println!("wrote {} ({n} tokenizer keys from {})", out.display(), src.display());
        return Ok(());
    }
    if let Some(src) = requantize {
        let ty = expert.ok_or("--requantize-experts needs --expert-type")?;
        let from = loader::ModelFile::open(&src).map_err(|e| format!("{}: {e}", src.display()))?;
        let name = from.metadata.str("general.name").unwrap_or("model");
        let name = format!("{} {}", name.strip_suffix(" F32").unwrap_or(name), ty.name().to_uppercase());
        loader::synth::requantize_experts(&src, &out, ty, file_type(ty)?, &name).map_err(|e| e.to_string())?;
        let m = loader::ModelFile::open(&out).map_err(|e| format!("{}: written but does not validate: {e}", out.display()))?;
        println!("wrote {} ({name}: {} tensors, experts {ty}, from {})", out.display(), m.tensors.iter().count(), src.display());
        return Ok(());
    }
    if let Some(s) = skew {
        spec.router_skew = s;
    }
    if let Some(t) = matrix {
        spec.matrix_type = t;
        spec.expert_type = t;
    }
    if let Some(t) = expert {
        spec.expert_type = t;
    }
    if let Some(v) = vocab {
        spec.n_vocab = v;
    }
    if let Some(n) = layers {
        spec = spec.with_layers(n).map_err(|e| format!("--layers {n}: {e}"))?;
    }
    let mut model = match &tokenizer {
        Some(path) => {
            let keys = tokenizer_keys(path).map_err(|e| e.to_string())?;
            SynthModel::with_tokenizer(&spec, &keys).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => SynthModel::new(&spec),
    };
    if let Some(s) = seed {
        model.seed = s;
    }
    let t0 = Instant::now();
    model.write(&out, true).map_err(|e| format!("{}: {e}", out.display()))?;
    let bytes = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!("wrote {} ({:.3} GB, {} tensors, matrices {}, experts {}) in {:.1} s", out.display(), bytes as f64 / 1e9, model.tensors.len(), spec.matrix_type, spec.expert_type, t0.elapsed().as_secs_f64());
    match loader::ModelFile::open(&out) {
        Ok(m) => println!("validated: {} layers, n_embd {}, n_vocab {}, {} experts (top {})", m.config.n_layer, m.config.n_embd, m.config.n_vocab, m.config.n_expert, m.config.n_expert_used),
        Err(e) => return Err(format!("{}: written but does not validate: {e}", out.display())),
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("write_synth: {e}");
            ExitCode::FAILURE
        }
    }
}
