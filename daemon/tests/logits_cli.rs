//! `dflash logits` end to end: tokens in (text and .npy), float32 .npy out, equal to the
//! transformers reference of the tiny fixture B, through prefill and decode.
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

thread_local! {
    /// This test's directory, removed when the test's thread ends, passed or failed.
    static TEST_DIR: tempfile::TempDir = tempfile::Builder::new().prefix("dflash-logits-cli-").tempdir().expect("tmp dir");
}

/// `name` in this test's own directory.
fn tmp(name: &str) -> PathBuf {
    TEST_DIR.with(|d| d.path().join(name))
}

fn arr<T: npyz::Deserialize>(npz: &mut npyz::npz::NpzArchive<std::io::BufReader<std::fs::File>>, k: &str) -> Vec<T> {
    npz.by_name(k).expect("npz").expect("key").into_vec().expect("dtype")
}

/// `dflash logits -m fixture-B --tokens TOKENS --out OUT EXTRA…`
fn dflash_logits(tokens: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dflash"))
        .args(["logits", "-m"])
        .arg(fixture("ds4-tiny-b.f32.gguf"))
        .arg("--tokens")
        .arg(tokens)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("run dflash")
}

#[test]
fn logits_npy_matches_reference_through_prefill_and_decode() {
    let mut npz = npyz::npz::NpzArchive::open(fixture("ds4-tiny-b.ref.npz")).expect("reference");
    let tokens: Vec<i32> = arr(&mut npz, "tokens");
    let cols: Vec<i32> = arr(&mut npz, "logits_cols");
    let sub: Vec<f32> = arr(&mut npz, "logits_sub");
    let max_abs: Vec<f32> = arr(&mut npz, "logits_max_abs");
    let n = 120;
    let tok_file = tmp("tokens.txt");
    let text: String = tokens[..n].iter().map(|t| format!("{t}\n")).collect();
    std::fs::write(&tok_file, text).expect("write tokens");
    let out = tmp("logits.npy");
    let o = dflash_logits(&tok_file, &out, &["--decode-from", "100", "--ubatch", "37", "--threads", "2", "--timings"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&out).expect("output");
    let npy = npyz::NpyFile::new(&bytes[..]).expect("a .npy");
    let shape = npy.shape().to_vec();
    let logits: Vec<f32> = npy.into_vec().expect("float32");
    let n_vocab = shape[1] as usize;
    assert_eq!(shape[0] as usize, n);
    let k = cols.len();
    for t in 0..n {
        let row = &logits[t * n_vocab..(t + 1) * n_vocab];
        let worst = cols.iter().enumerate().map(|(j, &c)| (row[c as usize] - sub[t * k + j]).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-3 * max_abs[t], "position {t}: max |Δlogit| {worst}");
    }

    // The same ids as a .npy int32 file give the same logits; a negative id is refused.
    let npy_tokens = tmp("tokens.npy");
    let mut header = format!("{{'descr': '<i4', 'fortran_order': False, 'shape': ({n},), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(tokens[..n].iter().flat_map(|t| t.to_le_bytes()));
    std::fs::write(&npy_tokens, bytes).expect("write tokens.npy");
    let out2 = tmp("logits2.npy");
    let o = dflash_logits(&npy_tokens, &out2, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again: Vec<f32> = npyz::NpyFile::new(&std::fs::read(&out2).expect("out")[..]).expect("npy").into_vec().expect("f32");
    let worst = logits.iter().zip(&again).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-3, "prefill-only vs prefill+decode differ by {worst}");

    std::fs::write(&tok_file, "0\n-5\n").expect("write");
    let o = dflash_logits(&tok_file, &out, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("token id -5 (index 1)"), "{err}");
}

/// `--batch-with K` runs K companion sequences beside this one in every step, mixing their
/// prompt chunks with this one's decode: this sequence's logits are its logits alone, to the
/// bit, on the CPU (DS4.md, "Batched steps"); `scripts/device/batch-bound.sh` measures CUDA's.
#[test]
fn logits_beside_companion_sequences_are_the_logits_alone() {
    let mut npz = npyz::npz::NpzArchive::open(fixture("ds4-tiny-b.ref.npz")).expect("reference");
    let tokens: Vec<i32> = arr(&mut npz, "tokens");
    let n = 60;
    let tok_file = tmp("batch-tokens.txt");
    std::fs::write(&tok_file, tokens[..n].iter().map(|t| format!("{t}\n")).collect::<String>()).expect("write tokens");
    let run = |name: &str, extra: &[&str]| -> Vec<u32> {
        let out = tmp(name);
        let o = dflash_logits(&tok_file, &out, &[&["--decode-from", "40", "--ubatch", "16", "--threads", "2"][..], extra].concat());
        assert!(o.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        let v: Vec<f32> = npyz::NpyFile::new(&std::fs::read(&out).expect("output")[..]).expect("npy").into_vec().expect("f32");
        v.into_iter().map(f32::to_bits).collect()
    };
    let alone = run("alone.npy", &[]);
    for k in ["1", "3"] {
        let batched = run(&format!("with-{k}.npy"), &["--batch-with", k]);
        assert_eq!(batched.len(), alone.len(), "--batch-with {k}: another shape");
        let first = batched.iter().zip(&alone).position(|(a, b)| a != b);
        assert!(first.is_none(), "--batch-with {k}: logits differ from alone first at flat index {first:?}");
    }
}
