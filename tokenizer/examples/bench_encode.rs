//! Encode/decode throughput over the test corpus (run with --release):
//! `cargo run --release -p tokenizer --example bench_encode -- [GGUF[.zst]] [CORPUS] [ROUNDS]`
use std::time::Instant;

use loader::{Gguf, Metadata};
use tokenizer::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let gguf = args.next().unwrap_or_else(|| "models/tiny-ds4.gguf".into());
    let corpus = args.next().unwrap_or_else(|| "tokenizer/tests/data/corpus.jsonl.zst".into());
    let rounds: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);

    let t0 = Instant::now();
    let meta = if gguf.ends_with(".zst") {
        Metadata::read(&Gguf::from_bytes(&zstd::decode_all(std::fs::File::open(&gguf)?)?)?)?
    } else {
        Metadata::read(&Gguf::open(std::path::Path::new(&gguf))?)?
    };
    let t1 = Instant::now();
    let tok = Tokenizer::from_metadata(&meta)?;
    let t2 = Instant::now();
    println!("metadata read {:.0} ms, tokenizer built {:.0} ms", (t1 - t0).as_secs_f64() * 1e3, (t2 - t1).as_secs_f64() * 1e3);
    // resident memory: GGUF metadata (the 129280 tokens and 127741 merges) + the tokenizer
    let rss = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| s.lines().find(|l| l.starts_with("VmRSS")).map(str::to_string));
    println!("after building: {}", rss.unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" "));
    drop(meta);

    // the corpus is JSON lines; only the "text" fields are needed
    let raw = String::from_utf8(zstd::decode_all(std::fs::File::open(&corpus)?)?)?;
    let mut docs = Vec::new();
    for line in raw.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        docs.push(v["text"].as_str().ok_or("document without text")?.to_string());
    }
    let bytes: usize = docs.iter().map(String::len).sum();
    for parse_special in [true, false] {
        let mut best = f64::MAX;
        let mut n_tokens = 0;
        for _ in 0..rounds {
            let t = Instant::now();
            n_tokens = 0;
            for d in &docs {
                n_tokens += tok.encode(d, parse_special)?.len();
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "encode parse_special={parse_special}: {} docs, {bytes} bytes, {n_tokens} tokens in {:.3} s: {:.0} tokens/s, {:.1} MB/s",
            docs.len(),
            best,
            n_tokens as f64 / best,
            bytes as f64 / best / 1e6
        );
    }
    let all: Vec<Vec<u32>> = docs.iter().map(|d| tok.encode(d, true)).collect::<Result<_, _>>()?;
    let n: usize = all.iter().map(Vec::len).sum();
    let t = Instant::now();
    for ids in &all {
        let mut dec = tok.stream_decoder(false);
        for &id in ids {
            std::hint::black_box(dec.push(id)?);
        }
        std::hint::black_box(dec.finish());
    }
    println!("stream decode: {n} tokens in {:.3} s: {:.0} tokens/s", t.elapsed().as_secs_f64(), n as f64 / t.elapsed().as_secs_f64());
    Ok(())
}
