//! The prompt cache through `dflash serve` on the shipped tiny model: a prompt that starts
//! like an earlier one resumes from it (usage `prompt_tokens_details.cached_tokens`, /metrics)
//! and generates exactly what a server without the cache generates; a second server process on
//! the same `--cache-dir` resumes from the first one's files; `POST /slots/{id}` saves,
//! erases and restores a slot's cached prompt.
use serde_json::{json, Value};

mod common;
use common::{model, Server};

/// `n` token ids of ordinary text tokens.
fn ids(n: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| (100 + (i * 7919 + seed * 31) % 120_000) as u32).collect()
}

/// A greedy completion of `prompt`: (text, cached tokens, the whole answer).
fn complete(srv: &Server, prompt: &[u32]) -> (String, u64, Value) {
    let (st, v) = srv.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 8, "temperature": 0}));
    assert_eq!(st, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().expect("text").to_string();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached_tokens");
    assert_eq!(v["usage"]["prompt_tokens"].as_u64(), Some(prompt.len() as u64));
    assert_eq!(v["timings"]["cache_n"].as_u64(), Some(cached));
    assert_eq!(v["timings"]["prompt_n"].as_u64(), Some(prompt.len() as u64 - cached));
    (text, cached, v)
}

const BASE: [&str; 6] = ["--ctx-size", "512", "-u", "32", "--parallel", "2"];

fn start(extra: &[&str]) -> Server {
    let mut args = BASE.to_vec();
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn a_cached_prompt_resumes_with_the_same_output_and_survives_a_restart() {
    assert!(model().exists());
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let first = ids(150, 1);
    let mut second = first.clone();
    second.extend(ids(50, 2));

    let off = start(&["--cache-ram-mb", "0"]);
    let (want1, c, _) = complete(&off, &first);
    assert_eq!(c, 0);
    let (want2, c, _) = complete(&off, &second);
    assert_eq!(c, 0);
    assert_eq!(off.metric("dflash_prompt_cache_hits_total"), 0.0);
    drop(off);

    let on = start(&["--cache-dir", d]);
    let (t, c, _) = complete(&on, &first);
    assert_eq!((t.as_str(), c), (want1.as_str(), 0));
    // 150 tokens cached in micro-batches of 32: 128; the next prompt resumes there
    let (t, c, _) = complete(&on, &second);
    assert_eq!((t.as_str(), c), (want2.as_str(), 128));
    // the same prompt again: 192 of its 200 tokens, its last token is always run
    let (t, c, v) = complete(&on, &second);
    assert_eq!((t.as_str(), c), (want2.as_str(), 192), "{v}");
    assert_eq!(on.metric("dflash_prompt_cache_hits_total"), 2.0);
    assert_eq!(on.metric("dflash_prompt_cache_misses_total"), 1.0);
    assert_eq!(on.metric("dflash_prompt_cache_reused_tokens_total"), 320.0);
    assert_eq!(on.metric("dflash_prompt_tokens_total"), (150 + 200 + 200 - 320) as f64, "only prefilled tokens count");
    assert!(on.metric("dflash_prompt_cache_ram_bytes") > 0.0);
    // a prompt leaving the cached one at 100 resumes at 96
    let mut diverged = second.clone();
    diverged[100] += 1;
    let (_, c, _) = complete(&on, &diverged);
    assert_eq!(c, 96);
    on.terminate();

    let again = start(&["--cache-dir", d]);
    assert!(again.metric("dflash_prompt_cache_disk_bytes") > 0.0);
    let (t, c, _) = complete(&again, &second);
    assert_eq!((t.as_str(), c), (want2.as_str(), 192), "a second process resumes from the first one's files");
}

#[test]
fn slots_save_erase_and_restore_the_cached_prompt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = start(&["--cache-dir", dir.path().to_str().expect("utf-8 path")]);
    let prompt = ids(100, 3);
    let (want, _, _) = complete(&srv, &prompt);

    let (st, v) = srv.post("/slots/0?action=save", &json!({"filename": "conv.bin"}));
    assert_eq!(st, 200, "{v}");
    assert_eq!((v["id_slot"].as_u64(), v["n_saved"].as_u64()), (Some(0), Some(96)), "{v}");
    assert!(v["n_written"].as_u64() > Some(0) && v["timings"]["save_ms"].is_number(), "{v}");
    assert!(dir.path().join("slots/conv.bin").exists());

    let (st, v) = srv.post("/slots/0?action=erase", &json!({}));
    assert_eq!((st, v["n_erased"].as_u64()), (200, Some(96)), "{v}");
    let (_, c, _) = complete(&srv, &prompt);
    assert_eq!(c, 0, "erased from memory and disk");
    let (st, v) = srv.post("/slots/0?action=erase", &json!({}));
    assert_eq!((st, v["n_erased"].as_u64()), (200, Some(96)), "the prompt was cached again: {v}");

    let (st, v) = srv.post("/slots/1?action=restore", &json!({"filename": "conv.bin"}));
    assert_eq!(st, 200, "{v}");
    assert_eq!((v["id_slot"].as_u64(), v["n_restored"].as_u64()), (Some(1), Some(96)), "{v}");
    assert!(v["n_read"].as_u64() > Some(0) && v["timings"]["restore_ms"].is_number(), "{v}");
    let (t, c, _) = complete(&srv, &prompt);
    assert_eq!((t.as_str(), c), (want.as_str(), 96));

    for (path, body, says) in [
        ("/slots/2?action=save", json!({"filename": "x.bin"}), "slot 2 does not exist"),
        ("/slots/x?action=save", json!({"filename": "x.bin"}), "not a number"),
        ("/slots/0?action=load", json!({"filename": "x.bin"}), "save, restore or erase"),
        ("/slots/0", json!({"filename": "x.bin"}), "save, restore or erase"),
        ("/slots/0?action=save", json!({}), "needs a filename"),
        ("/slots/0?action=save", json!({"filename": "../x.bin"}), "invalid file name"),
        ("/slots/0?action=restore", json!({"filename": "missing.bin"}), "missing.bin"),
    ] {
        let (st, v) = srv.post(path, &body);
        assert_eq!(st, 400, "{path}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains(says)), "{path}: {v}");
    }
    drop(srv);

    let no_dir = start(&[]);
    let (st, v) = no_dir.post("/slots/0?action=save", &json!({"filename": "x.bin"}));
    assert_eq!(st, 400);
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("--cache-dir")), "{v}");
}

/// The chat endpoint reports the cached tokens in its streamed usage chunk too.
#[test]
fn a_chat_turn_resumes_from_the_previous_turn() {
    let srv = start(&[]);
    let long = "The committee reviewed the quarterly report on distributed systems and cache coherence. ".repeat(8);
    let turn = |messages: Value| {
        let events = srv.stream("/v1/chat/completions", &json!({"messages": messages, "max_tokens": 4, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}));
        let usage: Value = events.iter().rev().filter_map(|e| serde_json::from_str::<Value>(e).ok()).find(|v| !v["usage"].is_null()).expect("usage chunk")["usage"].clone();
        usage
    };
    let u1 = turn(json!([{"role": "user", "content": long}]));
    assert_eq!(u1["prompt_tokens_details"]["cached_tokens"], 0);
    let u2 = turn(json!([{"role": "user", "content": long}, {"role": "assistant", "content": "Noted."}, {"role": "user", "content": "And then?"}]));
    let cached = u2["prompt_tokens_details"]["cached_tokens"].as_u64().expect("cached_tokens");
    let first = u1["prompt_tokens"].as_u64().expect("prompt_tokens");
    assert!(cached > 0 && cached <= first && cached % 32 == 0, "cached {cached} of the first turn's {first}: {u2}");
}
