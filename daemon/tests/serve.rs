//! `dflash run` and `dflash serve` on the shipped tiny model (models/tiny-ds4.gguf, unpacked by
//! scripts/setup.sh), driven as a user would: the binary, and HTTP over a plain TCP socket.
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::{http, model, Server, KEY};

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({"model": "tiny-ds4", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
}

fn stream_text(events: &[String]) -> (String, String, Value) {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let (mut content, mut reasoning, mut finish) = (String::new(), String::new(), Value::Null);
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).expect("chunk json");
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(c) = v["choices"].get(0) {
            content.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            reasoning.push_str(c["delta"]["reasoning_content"].as_str().unwrap_or(""));
            if !c["finish_reason"].is_null() {
                finish = c["finish_reason"].clone();
            }
        }
    }
    (content, reasoning, finish)
}

#[test]
fn run_and_serve_agree_and_requests_are_checked() {
    // dflash run: greedy text on stdout, timings on stderr, deterministic
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_dflash"))
            .args(["run", "-t", "2", "-m"])
            .arg(model())
            .args(["-p", "Hello", "-n", "6"])
            .output()
            .expect("dflash run");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8(out.stdout).expect("utf-8 stdout"), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // The shipped model's greedy reply to "Hello" runs the whole 6 tokens (no end of
    // sequence), and they are visible text: every assertion below has something to compare.
    let (text, err) = run();
    assert!(err.contains("prompt: ") && err.contains("tok/s") && err.contains("time to first token"), "{err}");
    assert!(err.contains("decode: 6 tokens"), "{err}");
    let text = text.strip_suffix('\n').expect("a final newline").to_string();
    assert!(text.chars().filter(|c| !c.is_whitespace()).count() >= 4, "{text:?}");
    assert_eq!(run().0, format!("{text}\n"), "dflash run is deterministic");

    let srv = Server::start(&["--parallel", "2", "--ctx-size", "256", "--max-body-bytes", "65536", "--max-tokens-limit", "64"]);
    // auth: /health is open, the rest needs the key
    assert_eq!(srv.request("GET", "/health", None, b"").0, 200);
    let (st, body) = srv.request("GET", "/v1/models", None, b"");
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("invalid_api_key"));
    assert_eq!(srv.request("GET", "/v1/models", Some("wrong"), b"").0, 401);
    let (st, body) = srv.request("GET", "/v1/models", Some(KEY), b"");
    assert_eq!(st, 200);
    let models: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(models["data"][0]["id"], "tiny-ds4");

    // the same greedy reply through run, chat non-stream and chat stream
    let (st, v) = srv.post("/v1/chat/completions", &chat("Hello", 6));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"].as_str(), Some(text.as_str()), "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], v["timings"]["prompt_n"]);
    assert!(v["usage"]["prompt_tokens"].as_u64().is_some_and(|n| n > 1), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 6, "{v}");
    let mut req = chat("Hello", 6);
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let events = srv.stream("/v1/chat/completions", &req);
    let (content, reasoning, finish) = stream_text(&events);
    assert_eq!((content.as_str(), reasoning.as_str()), (text.as_str(), ""));
    assert_eq!(finish, "length");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], v["usage"]);

    // thinking on: the reply starts as reasoning
    let mut req = chat("Hello", 4);
    req["thinking"] = json!({"type": "enabled"});
    req["stream"] = json!(true);
    let (content, reasoning, finish) = stream_text(&srv.stream("/v1/chat/completions", &req));
    assert!(!reasoning.trim().is_empty(), "reasoning {reasoning:?} content {content:?}");
    assert_eq!(finish, "length");

    // a stop string taken from inside the greedy reply cuts it there
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 4, "{text:?}");
    let stop: String = chars[2..4].iter().collect();
    let cut = &text[..text.find(&stop).expect("stop in text")];
    let mut req = chat("Hello", 6);
    req["stop"] = json!([stop]);
    let (st, v) = srv.post("/v1/chat/completions", &req);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"].as_str(), Some(cut));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // seeded sampling repeats
    let mut req = chat("Hello", 5);
    req["temperature"] = json!(1.0);
    req["seed"] = json!(1234);
    let a = srv.post("/v1/chat/completions", &req).1["choices"][0]["message"]["content"].clone();
    let b = srv.post("/v1/chat/completions", &req).1["choices"][0]["message"]["content"].clone();
    assert!(a.as_str().is_some_and(|t| !t.is_empty()), "{a}");
    assert_eq!(a, b);

    // completions with a token-array prompt, tokenize / detokenize
    let (st, t) = srv.post("/tokenize", &json!({"content": "Hello world"}));
    assert_eq!(st, 200);
    let ids = t["tokens"].clone();
    assert!(ids.as_array().is_some_and(|a| a.len() >= 2 && a.iter().all(Value::is_u64)), "{t}");
    let (_, d) = srv.post("/detokenize", &json!({"tokens": ids}));
    assert_eq!(d["content"], "Hello world");
    let (st, c) = srv.post("/v1/completions", &json!({"prompt": ids, "max_tokens": 3, "temperature": 0}));
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["object"], "text_completion");
    assert!(c["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()), "{c}");
    assert_eq!((&c["choices"][0]["finish_reason"], &c["usage"]["completion_tokens"]), (&json!("length"), &json!(3)), "{c}");
    let (_, c2) = srv.post("/v1/completions", &json!({"prompt": "Hello world", "max_tokens": 3, "temperature": 0}));
    assert_eq!(c["choices"][0]["text"], c2["choices"][0]["text"]);

    // errors: OpenAI objects with 4xx statuses naming the bad value
    let n_vocab = 129280;
    let cases: Vec<(Value, u16, &str)> = vec![
        ({ let mut r = chat("x", 2); r["n"] = json!(2); r }, 400, "n must be 1"),
        ({ let mut r = chat("x", 2); r["model"] = json!("gpt-4"); r }, 404, "model_not_found"),
        ({ let mut r = chat("x", 2); r["logit_bias"] = json!({"999999": 1}); r }, 400, "token id 999999"),
        ({ let mut r = chat("x", 2); r["max_tokens"] = json!(65); r }, 400, "max_tokens 65 exceeds the limit of 64"),
        ({ let mut r = chat("x", 2); r["temperature"] = json!(-1); r }, 400, "temperature"),
        (chat(&"hello ".repeat(400), 2), 400, "context_length_exceeded"),
    ];
    for (req, want_status, want_text) in cases {
        let (st, v) = srv.post("/v1/chat/completions", &req);
        assert_eq!(st, want_status, "{v}");
        assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string(), "{v}");
        assert!(v.to_string().contains(want_text), "{want_text}: {v}");
    }
    let (st, v) = srv.post("/v1/completions", &json!({"prompt": [1, 2, n_vocab], "max_tokens": 2}));
    assert_eq!(st, 400);
    assert!(v["error"]["message"].as_str().unwrap_or("").contains(&format!("token id {n_vocab} (index 2)")), "{v}");
    let (st, v) = srv.post("/v1/completions", &json!({"prompt": [-5], "max_tokens": 2}));
    assert_eq!(st, 400, "{v}");
    let (st, v) = srv.post("/detokenize", &json!({"tokens": [n_vocab + 7]}));
    assert_eq!(st, 400);
    assert!(v.to_string().contains(&format!("token id {}", n_vocab + 7)), "{v}");
    let (st, body) = srv.request("POST", "/v1/chat/completions", Some(KEY), b"{not json");
    assert_eq!(st, 400);
    assert!(body.contains("invalid JSON"), "{body}");
    let big = format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}", "a".repeat(100_000));
    let (st, body) = srv.request("POST", "/v1/chat/completions", Some(KEY), big.as_bytes());
    assert_eq!(st, 413, "{body}");

    // a client that goes away mid-stream is cancelled; the server keeps serving
    let cancelled0 = srv.metric("dflash_requests_cancelled_total");
    {
        let mut s = TcpStream::connect(&srv.addr).expect("connect");
        let mut r = chat("Tell me a story", 60);
        r["stream"] = json!(true);
        let body = r.to_string();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(head.as_bytes()).expect("write");
        let mut reader = BufReader::new(s);
        let mut seen = 0;
        let mut line = String::new();
        while seen < 2 && reader.read_line(&mut line).expect("read") > 0 {
            if line.contains("data: ") {
                seen += 1;
            }
            line.clear();
        }
    }
    let t0 = Instant::now();
    while srv.metric("dflash_requests_cancelled_total") <= cancelled0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the dropped stream was not cancelled");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (st, v) = srv.post("/v1/chat/completions", &chat("Hello", 6));
    assert_eq!((st, v["choices"][0]["message"]["content"].as_str()), (200, Some(text.as_str())));
    assert!(srv.metric("dflash_completion_tokens_total") > 0.0);
    assert_eq!(srv.metric("dflash_queue_depth"), 0.0);

    let status = srv.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn beyond_queue_max_requests_get_503_with_retry_after() {
    // one request generates, one waits; the others are refused at once
    let srv = Server::start(&["--parallel", "1", "--queue-max", "1", "--ctx-size", "512"]);
    // a token pushed up by logit_bias: greedy repeats it, so no request ends early
    let long = json!({"prompt": "Hello", "max_tokens": 40, "temperature": 0, "logit_bias": {"1000": 100}}).to_string();
    let t0 = Instant::now();
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (addr, body) = (srv.addr.clone(), long.clone());
            std::thread::spawn(move || http(&addr, "POST", "/v1/completions", Some(KEY), body.as_bytes()))
        })
        .collect();
    let answers: Vec<(u16, String, String)> = clients.into_iter().map(|c| c.join().expect("client thread")).collect();
    let elapsed = t0.elapsed();
    let ok: Vec<_> = answers.iter().filter(|a| a.0 == 200).collect();
    let busy: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
    assert_eq!(ok.len() + busy.len(), answers.len(), "{answers:?}");
    assert_eq!(ok.len(), 2, "one running + one waiting are served ({elapsed:?}): {answers:?}");
    for (_, _, body) in &ok {
        let v: Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["usage"]["completion_tokens"], 40, "{v}");
    }
    for (_, head, body) in &busy {
        assert!(head.contains("\r\nretry-after: 1"), "{head}");
        let v: Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["error"]["code"], "queue_full", "{v}");
        assert!(v["error"]["message"].as_str().unwrap_or("").contains("--queue-max"), "{v}");
    }
    // the queue drains: the next request is served
    let (st, v) = srv.post("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(srv.metric("dflash_queue_depth"), 0.0);
    assert_eq!(srv.metric("dflash_requests_active"), 0.0);
}

#[test]
fn health_answers_while_huge_bodies_are_tokenized() {
    let srv = Server::start(&["--max-body-bytes", "100000000"]);
    let body = json!({"content": "Hello world, this is a long text. ".repeat(400_000)}).to_string();
    let tokenize = |addr: String, body: String| std::thread::spawn(move || http(&addr, "POST", "/tokenize", Some(KEY), body.as_bytes()));
    // one alone: how long tokenizing the body takes
    let t0 = Instant::now();
    let (st, _, out) = tokenize(srv.addr.clone(), body.clone()).join().expect("client thread");
    let alone = t0.elapsed();
    assert_eq!(st, 200, "{}", &out[..out.len().min(300)]);
    assert!(alone > Duration::from_millis(800), "the body must take a while to tokenize: {alone:?}");
    // as many at once as the runtime has threads (2), then /health
    let busy: Vec<_> = (0..2).map(|_| tokenize(srv.addr.clone(), body.clone())).collect();
    std::thread::sleep(alone / 3);
    let t1 = Instant::now();
    let (st, _, health) = http(&srv.addr, "GET", "/health", None, b"");
    let waited = t1.elapsed();
    assert!(busy.iter().all(|b| !b.is_finished()), "the tokenizations ended before /health was asked ({alone:?} alone)");
    assert_eq!((st, health.as_str()), (200, r#"{"status":"ok"}"#));
    assert!(waited < alone / 4, "/health took {waited:?} while bodies were tokenized ({alone:?} each alone)");
    for b in busy {
        assert_eq!(b.join().expect("client thread").0, 200);
    }
}
