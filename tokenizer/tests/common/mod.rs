//! Shared fixtures: the real DeepSeek V4 tokenizer metadata from `models/tiny-ds4.gguf` and the
//! corpus with HF reference ids from `tools/make_tokenizer_corpus.py`.
#![allow(dead_code)]
use std::path::PathBuf;
use std::sync::OnceLock;

use loader::{Gguf, Metadata};
use tokenizer::Tokenizer;

pub struct Doc {
    pub name: String,
    pub text: String,
    /// HF ids, added tokens matched (parse_special = true)
    pub ids: Vec<u32>,
    /// HF ids with CONTROL strings as plain text (parse_special = false)
    pub ids_plain: Vec<u32>,
    /// HF decode(ids, skip_special_tokens = True), for documents with CONTROL ids
    pub decoded_skip: Option<String>,
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn metadata() -> &'static Metadata {
    static META: OnceLock<Metadata> = OnceLock::new();
    META.get_or_init(|| {
        let path = root().join("models/tiny-ds4.gguf");
        assert!(path.exists(), "{} is missing: run ./scripts/setup.sh", path.display());
        let gguf = Gguf::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Metadata::read(&gguf).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

pub fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_metadata(metadata()).unwrap_or_else(|e| panic!("from_metadata: {e}")))
}

fn ids(v: &serde_json::Value, name: &str, key: &str) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("{name}: {key} is not an array"))
        .iter()
        .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()).unwrap_or_else(|| panic!("{name}: bad id {x} in {key}")))
        .collect()
}

pub fn corpus() -> &'static [Doc] {
    static DOCS: OnceLock<Vec<Doc>> = OnceLock::new();
    DOCS.get_or_init(|| {
        let path = root().join("tokenizer/tests/data/corpus.jsonl.zst");
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let raw = zstd::decode_all(file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let text = String::from_utf8(raw).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        text.lines()
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let name = v["name"].as_str().expect("name").to_string();
                let ids_v = ids(&v["ids"], &name, "ids");
                let ids_plain = if v.get("ids_plain").is_some() { ids(&v["ids_plain"], &name, "ids_plain") } else { ids_v.clone() };
                Doc {
                    text: v["text"].as_str().unwrap_or_else(|| panic!("{name}: text")).to_string(),
                    ids: ids_v,
                    ids_plain,
                    decoded_skip: v.get("decoded_skip").and_then(|s| s.as_str()).map(str::to_string),
                    name,
                }
            })
            .collect()
    })
}

/// A readable description of where two id sequences first differ.
pub fn first_difference(tok: &Tokenizer, got: &[u32], want: &[u32]) -> String {
    let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
    let show = |v: &[u32]| -> String {
        v[i.saturating_sub(3)..(i + 4).min(v.len())]
            .iter()
            .map(|&id| format!("{id}:{:?}", tok.token_text(id).unwrap_or("?")))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!("lengths {} vs {} (expected); first difference at index {i}: got [{}] expected [{}]", got.len(), want.len(), show(got), show(want))
}
