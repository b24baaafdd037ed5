//! `dflash serve --parallel N` steps its sequences together (one forward pass over every
//! running sequence's next token and the next chunk of each prompt being read): requests
//! served at the same time give exactly what each gives alone, on the shipped tiny model.
use std::sync::Barrier;

use serde_json::json;

mod common;
use common::{model, Server};

/// `n` token ids of ordinary text tokens.
fn ids(n: usize, seed: usize) -> Vec<u32> {
    (0..n).map(|i| (100 + (i * 7919 + seed * 31) % 120_000) as u32).collect()
}

/// A greedy completion of `prompt` that runs its whole `max_tokens` (end-of-generation
/// tokens ignored): (text, completion tokens).
fn complete(srv: &Server, prompt: &[u32], max_tokens: usize) -> (String, u64) {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
    let (st, v) = srv.post("/v1/completions", &body);
    assert_eq!(st, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().expect("text").to_string();
    (text, v["usage"]["completion_tokens"].as_u64().expect("completion_tokens"))
}

/// Chunks of 32: prompts of one token, less than a chunk, and several chunks with a
/// remainder, so the steps hold prompt chunks beside other sequences' decode tokens.
const PROMPTS: [(usize, usize); 6] = [(150, 3), (5, 1), (70, 2), (33, 4), (97, 5), (1, 6)];
const BASE: [&str; 6] = ["-u", "32", "--ctx-size", "512", "--cache-ram-mb", "0"];

fn start(parallel: &str) -> Server {
    let mut args = BASE.to_vec();
    args.extend_from_slice(&["--parallel", parallel]);
    Server::start(&args)
}

#[test]
fn concurrent_requests_give_exactly_what_each_gives_alone() {
    assert!(model().exists());
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|&(n, seed)| ids(n, seed)).collect();
    let max_tokens = 24;

    let alone = start("1");
    let want: Vec<(String, u64)> = prompts.iter().map(|p| complete(&alone, p, max_tokens)).collect();
    assert!(want.iter().all(|(t, n)| *n == max_tokens as u64 && !t.is_empty()), "{want:?}");
    let distinct: std::collections::HashSet<&String> = want.iter().map(|(t, _)| t).collect();
    assert!(distinct.len() >= 4, "the prompts should lead to different texts: {want:?}");
    drop(alone);

    // Six requests at once on four slots: two wait and join as others finish.
    let together = start("4");
    assert_eq!(together.metric("dflash_slots_total"), 4.0);
    let barrier = Barrier::new(prompts.len());
    let got: Vec<(String, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (srv, barrier) = (&together, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    complete(srv, p, max_tokens)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("request thread")).collect()
    });
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i} ({} prompt tokens): served beside others vs alone", prompts[i].len());
    }

    // The steps held several sequences at once; every token ran in some step.
    let steps = together.metric("dflash_step_sequences_count");
    let seq_parts = together.metric("dflash_step_sequences_sum");
    let tokens = together.metric("dflash_step_tokens_sum");
    assert!(seq_parts > steps, "no step held two sequences: {seq_parts} sequence parts in {steps} steps");
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    // each request's last sampled token is not run
    let run_tokens = prompt_tokens + prompts.len() * (max_tokens - 1);
    assert_eq!(tokens, run_tokens as f64, "tokens run in steps");
    assert_eq!(together.metric("dflash_slots_busy"), 0.0);

    // every prompt token was prefilled once
    let prompt_n = together.metric("dflash_prompt_tokens_total");
    assert_eq!(prompt_n, prompt_tokens as f64);
    drop(together);

    // The prefill chunk, not the micro-batch, decides the bits: a bigger -u with the same
    // --prefill-chunk gives the same texts, one request after another.
    let bigger = Server::start(&["-u", "100", "--prefill-chunk", "32", "--ctx-size", "512", "--cache-ram-mb", "0", "--parallel", "3"]);
    for (i, (p, w)) in prompts.iter().zip(&want).enumerate() {
        assert_eq!(&complete(&bigger, p, max_tokens), w, "request {i}: -u 100 --prefill-chunk 32 vs -u 32");
    }
}

#[test]
fn a_zero_prefill_chunk_is_refused_by_name() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dflash"))
        .args(["serve", "--port", "0", "--prefill-chunk", "0", "-m"])
        .arg(model())
        .output()
        .expect("dflash serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--prefill-chunk"), "{err}");
}
