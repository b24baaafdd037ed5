//! The chat format as the daemon sets it up from a model file: template, vocabulary and BOS/EOS
//! from `models/tiny-ds4.gguf` (unpacked by scripts/setup.sh).

use std::path::PathBuf;

use chat::{ChatMessage, ChatTemplate, SpecialTokens, TemplateVars, TEMPLATE_KEY};

fn model() -> loader::ModelFile {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-ds4.gguf");
    loader::ModelFile::open(&path).unwrap_or_else(|e| panic!("{}: {e} (run ./scripts/setup.sh)", path.display()))
}

#[test]
fn template_and_tokens_from_the_gguf() {
    let m = model();
    let md = &m.metadata;
    let source = md.opt_str(TEMPLATE_KEY).unwrap();
    assert_eq!(source, Some(include_str!("data/ds4-template.jinja")));
    let tokens = md.str_array("tokenizer.ggml.tokens").unwrap();
    let bos = md.u32("tokenizer.ggml.bos_token_id").unwrap();
    let eos = md.u32("tokenizer.ggml.eos_token_id").unwrap();
    let special = SpecialTokens::from_vocab(tokens, bos.into(), eos.into()).unwrap();
    assert_eq!(special, SpecialTokens { bos: "<｜begin▁of▁sentence｜>".into(), eos: "<｜end▁of▁sentence｜>".into() });

    let messages: Vec<ChatMessage> = serde_json::from_value(serde_json::json!([
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "2 plus 2 is 4."},
        {"role": "user", "content": "And 3+3?"}
    ]))
    .unwrap();
    let vars = TemplateVars { thinking: true, ..TemplateVars::default() };
    let from_file = ChatTemplate::new(source, tokens, special.clone()).unwrap();
    assert!(!from_file.is_builtin());
    // The built-in format finds its control tokens in the real vocabulary and agrees here.
    let builtin = ChatTemplate::new(None, tokens, special).unwrap();
    assert!(builtin.is_builtin());
    let want = "<｜begin▁of▁sentence｜>Be exact.<｜User｜>What is 2+2?<｜Assistant｜></think>4<｜end▁of▁sentence｜>\
                <｜User｜>And 3+3?<｜Assistant｜><think>";
    assert_eq!(from_file.render(&messages, None, &vars).unwrap().text(), want);
    assert_eq!(builtin.render(&messages, None, &vars).unwrap(), from_file.render(&messages, None, &vars).unwrap());
}
