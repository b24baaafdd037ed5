//! Check a corpus file written by `tools/make_tokenizer_corpus.py` (e.g. a large `--stress` one)
//! against this tokenizer: encode with and without special tokens, decode, stream decode; prints
//! the mismatching documents and the slowest encodes (run with --release):
//! `cargo run --release -p tokenizer --example check_corpus -- CORPUS.jsonl.zst [GGUF]`
use std::time::Instant;

use loader::{Gguf, Metadata};
use tokenizer::Tokenizer;

fn ids(v: &serde_json::Value) -> Option<Vec<u32>> {
    v.as_array()?.iter().map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok())).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let corpus = args.next().ok_or("usage: check_corpus CORPUS.jsonl.zst [GGUF]")?;
    let gguf = args.next().unwrap_or_else(|| "models/tiny-ds4.gguf".into());
    let tok = Tokenizer::from_metadata(&Metadata::read(&Gguf::open(std::path::Path::new(&gguf))?)?)?;
    let raw = String::from_utf8(zstd::decode_all(std::fs::File::open(&corpus)?)?)?;
    let (mut docs, mut bad, mut bytes) = (0usize, 0usize, 0usize);
    let mut times: Vec<(f64, String, usize)> = Vec::new();
    for line in raw.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let name = v["name"].as_str().ok_or("name")?.to_string();
        let text = v["text"].as_str().ok_or("text")?;
        let want = ids(&v["ids"]).ok_or("ids")?;
        let want_plain = if v.get("ids_plain").is_some() { ids(&v["ids_plain"]).ok_or("ids_plain")? } else { want.clone() };
        docs += 1;
        bytes += text.len();
        let t = Instant::now();
        let got = tok.encode(text, true)?;
        times.push((t.elapsed().as_secs_f64(), name.clone(), text.len()));
        let got_plain = tok.encode(text, false)?;
        let mut streamed = String::new();
        let mut dec = tok.stream_decoder(false);
        for &id in &want {
            if let Some(s) = dec.push(id)? {
                streamed.push_str(&s);
            }
        }
        streamed.extend(dec.finish());
        let problems: Vec<&str> = [
            (got != want, "encode(parse_special=true)"),
            (got_plain != want_plain, "encode(parse_special=false)"),
            (tok.decode(&want, false)? != text, "decode"),
            (streamed != text, "stream decode"),
        ]
        .into_iter()
        .filter_map(|(b, what)| b.then_some(what))
        .collect();
        if !problems.is_empty() {
            bad += 1;
            if bad <= 20 {
                println!("MISMATCH {name}: {}", problems.join(", "));
            }
        }
    }
    times.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (t, name, len) in times.iter().take(5) {
        println!("slow: {name} ({len} bytes) encoded in {:.1} ms", t * 1e3);
    }
    println!("{docs} documents, {bytes} bytes: {bad} mismatching");
    if bad > 0 {
        return Err(format!("{bad} of {docs} documents mismatch").into());
    }
    Ok(())
}
