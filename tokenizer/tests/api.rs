//! Accessors, special tokens in user text, errors and the stream decoder's byte handling, on the
//! real DeepSeek V4 metadata and on a small hand-made vocabulary.
mod common;

use std::collections::BTreeMap;

use common::{corpus, metadata, tokenizer, Doc};
use loader::{Metadata, Value};
use tokenizer::{TokenType, Tokenizer, TokenizerError};

fn case(i: usize) -> &'static Doc {
    let name = format!("case-{i:03}");
    corpus().iter().find(|d| d.name == name).unwrap_or_else(|| panic!("{name} missing from the corpus"))
}

#[test]
fn special_ids_and_lookups_from_the_gguf() {
    let tok = tokenizer();
    assert_eq!(tok.n_vocab(), 129280);
    assert_eq!(tok.bos_id(), 0);
    assert_eq!(tok.eos_id(), 1);
    assert_eq!(tok.pad_id(), Some(1));
    assert_eq!(tok.eot_id(), None, "the DS4 GGUF names no eot_token_id");
    assert_eq!(tok.eog_ids(), &[1]);
    assert!(tok.is_eog(1) && !tok.is_eog(0));
    assert!(!tok.add_bos() && !tok.add_eos());
    assert_eq!(tok.token_id("<｜begin▁of▁sentence｜>"), Some(0));
    assert_eq!(tok.token_id("<｜end▁of▁sentence｜>"), Some(1));
    assert_eq!(tok.token_id("<｜User｜>"), Some(128803));
    assert_eq!(tok.token_id("<｜Assistant｜>"), Some(128804));
    assert_eq!(tok.token_id("<think>"), Some(128821));
    assert_eq!(tok.token_id("no such token"), None);
    assert_eq!(tok.token_text(128803), Some("<｜User｜>"));
    assert_eq!(tok.token_text(129280), None);
    assert_eq!(tok.token_type(128803), Some(TokenType::Control));
    assert_eq!(tok.token_type(128821), Some(TokenType::UserDefined));
    // the DSML marker of tool calls is user-defined: generated, it decodes as text even when
    // control tokens are skipped (as the server decodes)
    assert_eq!(tok.token_id("｜DSML｜"), Some(128825));
    assert_eq!(tok.token_type(128825), Some(TokenType::UserDefined));
    let block = "<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">";
    let ids = tok.encode(block, true).expect("encode");
    assert_eq!(ids.iter().filter(|&&id| id == 128825).count(), 2);
    assert_eq!(tok.decode(&ids, true).expect("decode"), block);
    // a normal token is stored in the byte-level alphabet and decodes to plain bytes
    let the = tok.token_id("Ġthe").expect("Ġthe is in the vocabulary");
    assert_eq!(tok.token_type(the), Some(TokenType::Normal));
    assert_eq!(tok.token_bytes(the).expect("in range"), b" the");
    assert_eq!(tok.token_bytes(128803).expect("in range"), "<｜User｜>".as_bytes());
}

#[test]
fn special_token_text_in_user_content_is_plain_text_without_parse_special() {
    let tok = tokenizer();
    // case-000: "Hello <｜User｜>world<｜end▁of▁sentence｜> <think>x</think>"
    let d = case(0);
    assert!(d.text.contains("<｜User｜>"));
    assert!(d.ids.contains(&128803) && d.ids.contains(&1), "HF matches the control tokens: {:?}", d.ids);
    let plain = tok.encode(&d.text, false).expect("encode");
    assert_eq!(plain, d.ids_plain, "HF with split_special_tokens");
    assert!(!plain.iter().any(|&id| tok.is_control(id)), "control id in {plain:?}");
    // USER_DEFINED tokens are still matched, as in llama.cpp and HF
    assert!(plain.contains(&128821) && plain.contains(&128822));
    assert_eq!(tok.encode(&d.text, true).expect("encode"), d.ids);
    assert_eq!(tok.decode(&plain, false).expect("decode"), d.text);

    for i in [1, 8, 9] {
        let d = case(i);
        assert_ne!(d.ids, d.ids_plain, "{}", d.name);
        assert_eq!(tok.encode(&d.text, false).expect("encode"), d.ids_plain, "{}", d.name);
        assert_eq!(tok.encode(&d.text, true).expect("encode"), d.ids, "{}", d.name);
    }
}

#[test]
fn small_cases_match_hf() {
    let tok = tokenizer();
    for i in 2..8 {
        let d = case(i);
        assert_eq!(tok.encode(&d.text, true).expect("encode"), d.ids, "{} {:?}", d.name, d.text);
    }
    assert!(case(2).ids.is_empty(), "empty text has no tokens");
    assert_eq!(tok.decode(&[], false).expect("decode"), "");
}

#[test]
fn out_of_range_ids_are_errors_naming_id_and_vocab_size() {
    let tok = tokenizer();
    let err = tok.decode(&[5, 200_000, 6], false).expect_err("id 200000 is out of range");
    assert!(matches!(err, TokenizerError::IdOutOfRange { id: 200_000, n_vocab: 129_280 }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("200000") && msg.contains("129280"), "{msg}");
    assert!(tok.decode(&[129_280], true).is_err());
    assert!(tok.token_bytes(u32::MAX).is_err());

    let mut dec = tok.stream_decoder(false);
    assert!(matches!(dec.push(129_280), Err(TokenizerError::IdOutOfRange { id: 129_280, .. })));
    // the decoder is still usable after the error
    let ids = tok.encode("ok", true).expect("encode");
    let text: String = ids.iter().filter_map(|&id| dec.push(id).expect("push")).collect();
    assert_eq!(text, "ok");
}

/// A small vocabulary: the 256 byte-level characters, a few merges, one CONTROL and one
/// USER_DEFINED token.
fn small_metadata() -> BTreeMap<String, Value> {
    let full = metadata();
    let Ok(all) = full.str_array("tokenizer.ggml.tokens") else { panic!("tokens") };
    // the 256 single-byte tokens of the real vocabulary, in byte order
    let tok = tokenizer();
    let mut by_byte: Vec<Option<String>> = vec![None; 256];
    for id in 0..tok.n_vocab() as u32 {
        if let Ok(&[b]) = tok.token_bytes(id) {
            if tok.token_type(id) == Some(TokenType::Normal) {
                by_byte[b as usize] = Some(all[id as usize].clone());
            }
        }
    }
    let mut tokens: Vec<String> = by_byte.into_iter().map(|t| t.expect("every byte has a token")).collect();
    tokens.extend(["Ġt", "he", "Ġthe", "<|ctl|>", "<u>"].map(String::from));
    let mut types = vec![1i128; tokens.len()];
    types[259] = 3;
    types[260] = 4;
    let mut m = BTreeMap::new();
    m.insert("tokenizer.ggml.model".into(), Value::Str("gpt2".into()));
    m.insert("tokenizer.ggml.pre".into(), Value::Str("joyai-llm".into()));
    m.insert("tokenizer.ggml.tokens".into(), Value::StrArray(tokens));
    m.insert("tokenizer.ggml.token_type".into(), Value::IntArray { v: types, ty: "i32" });
    m.insert("tokenizer.ggml.merges".into(), Value::StrArray(["Ġ t", "h e", "Ġt he"].map(String::from).to_vec()));
    m.insert("tokenizer.ggml.bos_token_id".into(), Value::Int { v: 259, ty: "u32" });
    m.insert("tokenizer.ggml.eos_token_id".into(), Value::Int { v: 259, ty: "u32" });
    m.insert("tokenizer.ggml.eot_token_id".into(), Value::Int { v: 260, ty: "u32" });
    m
}

fn byte_id(tok: &Tokenizer, b: u8) -> u32 {
    (0..tok.n_vocab() as u32).find(|&i| tok.token_bytes(i).ok() == Some(&[b][..])).expect("byte token")
}

#[test]
fn small_vocabulary_encodes_merges_and_added_tokens() {
    let tok = Tokenizer::from_metadata(&Metadata::from_map(small_metadata())).expect("small tokenizer");
    assert_eq!(tok.n_vocab(), 261);
    assert!(tok.add_bos(), "llama.cpp's default for BPE when add_bos_token is absent");
    assert_eq!(tok.eog_ids(), &[259, 260]);
    assert_eq!(tok.encode(" the", true).expect("encode"), vec![258]);
    assert_eq!(tok.encode(" th", true).expect("encode"), vec![256, byte_id(&tok, b'h')]);
    assert_eq!(tok.encode("a<|ctl|> the<u>", true).expect("encode"), vec![byte_id(&tok, b'a'), 259, 258, 260]);
    let plain = tok.encode("a<|ctl|> the<u>", false).expect("encode");
    assert!(!plain.contains(&259) && plain.ends_with(&[258, 260]), "{plain:?}");
    assert_eq!(tok.decode(&plain, false).expect("decode"), "a<|ctl|> the<u>");
    assert_eq!(tok.decode(&[259, 258, 260], true).expect("decode"), " the<u>");
    assert_eq!(tok.decode(&[259, 258, 260], false).expect("decode"), "<|ctl|> the<u>");
}

#[test]
fn stream_decoder_holds_back_partial_characters_and_replaces_invalid_bytes() {
    let tok = Tokenizer::from_metadata(&Metadata::from_map(small_metadata())).expect("small tokenizer");
    let b = |x: u8| byte_id(&tok, x);
    let mut dec = tok.stream_decoder(false);
    // "é" = C3 A9, "😀" = F0 9F 98 80
    assert_eq!(dec.push(b(b'x')).expect("push"), Some("x".into()));
    assert_eq!(dec.push(b(0xC3)).expect("push"), None);
    assert_eq!(dec.pending_bytes(), &[0xC3]);
    assert_eq!(dec.push(b(0xA9)).expect("push"), Some("é".into()));
    for x in [0xF0, 0x9F, 0x98] {
        assert_eq!(dec.push(b(x)).expect("push"), None);
    }
    assert_eq!(dec.push(b(0x80)).expect("push"), Some("😀".into()));
    // a byte that can never start a character, and a cut-off sequence followed by ASCII
    assert_eq!(dec.push(b(0xFF)).expect("push"), Some("\u{FFFD}".into()));
    assert_eq!(dec.push(b(0xE2)).expect("push"), None);
    assert_eq!(dec.push(b(b'A')).expect("push"), Some("\u{FFFD}A".into()));
    // control tokens: skipped or not
    assert_eq!(dec.push(259).expect("push"), Some("<|ctl|>".into()));
    let mut skip = tok.stream_decoder(true);
    assert_eq!(skip.push(259).expect("push"), None);
    assert_eq!(skip.push(258).expect("push"), Some(" the".into()));
    // an unfinished character at the end becomes U+FFFD, as decode() makes it
    assert_eq!(dec.push(b(0xF0)).expect("push"), None);
    assert_eq!(dec.finish(), Some("\u{FFFD}".into()));
    assert_eq!(dec.finish(), None);
    let ids = [b(b'x'), b(0xFF), b(0xE2), b(b'A'), b(0xF0)];
    assert_eq!(tok.decode(&ids, false).expect("decode"), "x\u{FFFD}\u{FFFD}A\u{FFFD}");
}

fn build_err(edit: impl FnOnce(&mut BTreeMap<String, Value>)) -> String {
    let mut m = small_metadata();
    edit(&mut m);
    match Tokenizer::from_metadata(&Metadata::from_map(m)) {
        Ok(_) => panic!("bad metadata accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_metadata_errors_name_key_and_value() {
    let e = build_err(|m| {
        m.insert("tokenizer.ggml.pre".into(), Value::Str("qwen2".into()));
    });
    assert!(e.contains("tokenizer.ggml.pre") && e.contains("qwen2") && e.contains("joyai-llm"), "{e}");
    let e = build_err(|m| {
        m.insert("tokenizer.ggml.model".into(), Value::Str("llama".into()));
    });
    assert!(e.contains("tokenizer.ggml.model") && e.contains("llama") && e.contains("gpt2"), "{e}");
    let e = build_err(|m| {
        m.remove("tokenizer.ggml.tokens");
    });
    assert!(e.contains("tokenizer.ggml.tokens"), "{e}");
    let e = build_err(|m| {
        m.insert("tokenizer.ggml.token_type".into(), Value::IntArray { v: vec![1; 10], ty: "i32" });
    });
    assert!(e.contains("10") && e.contains("261"), "{e}");
    let e = build_err(|m| {
        m.insert("tokenizer.ggml.token_type".into(), Value::IntArray { v: vec![9; 261], ty: "i32" });
    });
    assert!(e.contains("token_type[0] = 9"), "{e}");
    let e = build_err(|m| {
        m.insert("tokenizer.ggml.eos_token_id".into(), Value::Int { v: 261, ty: "u32" });
    });
    assert!(e.contains("tokenizer.ggml.eos_token_id") && e.contains("261"), "{e}");
    let e = build_err(|m| {
        m.remove("tokenizer.ggml.bos_token_id");
    });
    assert!(e.contains("tokenizer.ggml.bos_token_id"), "{e}");
    let e = build_err(|m| {
        m.insert("tokenizer.ggml.merges".into(), Value::StrArray(vec!["Ġ t".into(), "he".into()]));
    });
    assert!(e.contains("merges[1]") && e.contains("\"he\""), "{e}");
    let e = build_err(|m| {
        m.insert("tokenizer.ggml.merges".into(), Value::StrArray(vec!["x yz".into()]));
    });
    assert!(e.contains("BPE"), "{e}");
    let e = build_err(|m| {
        if let Some(Value::StrArray(t)) = m.get_mut("tokenizer.ggml.tokens") {
            t[258] = "Ġt".into();
        }
    });
    assert!(e.contains("258") && e.contains("256") && e.contains("Ġt"), "{e}");
}
