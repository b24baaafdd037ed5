//! `dflash bench` on the CPU: the micro-batch it reports is the one the model ran, `-u` when
//! given, else the CPU's default (512; a GPU's is 2048, see `--ubatch`).
use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn bench_prefill(extra: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_dflash"))
        .args(["bench", "prefill", "-m"])
        .arg(fixture("ds4-tiny-a.f32.gguf"))
        .args(["-n", "40", "-r", "1", "-t", "1"])
        .args(extra)
        .output()
        .expect("run dflash");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    out
}

#[test]
fn bench_reports_the_micro_batch_the_model_ran() {
    let default = bench_prefill(&[]);
    assert!(default.contains("| CPU |") && default.contains("| ubatch 512 |") && default.contains("pp40"), "{default}");
    let small = bench_prefill(&["-u", "16"]);
    assert!(small.contains("| ubatch 16 |"), "{small}");
}
