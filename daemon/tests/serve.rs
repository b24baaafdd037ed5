//! `dflash run` and `dflash serve` on the shipped tiny model (models/tiny-ds4.gguf, unpacked by
//! scripts/setup.sh), driven as a user would: the binary, and HTTP over a plain TCP socket.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn model() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-ds4.gguf");
    assert!(p.exists(), "{} is missing: run ./scripts/setup.sh", p.display());
    p
}

const KEY: &str = "test-key";

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_with_env(extra, &[])
    }

    fn start_with_env(extra: &[&str], env: &[(&str, &std::path::Path)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dflash"))
            .args(["serve", "-m"])
            .arg(model())
            .args(["--port", "0", "--api-key", KEY, "-t", "2"])
            .args(extra)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dflash serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines.next().expect("server exited before listening").expect("read stderr");
            if let Some(a) = line.split("listening on http://").nth(1) {
                break a.trim().to_string();
            }
        };
        // keep draining stderr so the server never blocks on it
        std::thread::spawn(move || for _ in lines {});
        Server { child, addr }
    }

    /// One request with `Connection: close`; returns (status, body).
    fn request(&self, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> (u16, String) {
        let (status, _, body) = http(&self.addr, method, path, key, body);
        (status, body)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.request("POST", path, Some(KEY), body.to_string().as_bytes());
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}")))
    }

    /// A streamed request: the `data:` payloads in order.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let (status, text) = self.request("POST", path, Some(KEY), body.to_string().as_bytes());
        assert_eq!(status, 200, "{text}");
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }

    fn metric(&self, name: &str) -> f64 {
        let (status, text) = self.request("GET", "/metrics", Some(KEY), b"");
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.parse().ok()))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request with `Connection: close` to `addr`; returns (status, lower-cased head, body).
fn http(addr: &str, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> (u16, String, String) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    http_with(addr, method, path, &headers, body)
}

/// `http` with the given headers (besides Host, Content-Type, Content-Length and Connection).
fn http_with(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    // the server may answer (413) before reading a large body: ignore a reset on write
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("bad response {text:?}"));
    let head = head.to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    (status, head, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

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

    // any model name is accepted; the served one is echoed
    let mut req = chat("Hello", 6);
    req["model"] = json!("gpt-4o");
    let (st, other_name) = srv.post("/v1/chat/completions", &req);
    assert_eq!((st, &other_name["model"]), (200, &json!("tiny-ds4")), "{other_name}");

    // the same greedy reply through run, chat non-stream and chat stream
    let (st, v) = srv.post("/v1/chat/completions", &chat("Hello", 6));
    assert_eq!(v["choices"][0]["message"], other_name["choices"][0]["message"]);
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

#[test]
fn strict_model_names_alias_and_anthropic_errors() {
    let srv = Server::start(&["--strict-model-names", "--alias", "ds4-flash", "--ctx-size", "256"]);
    // x-api-key is a key too
    let (st, _, body) = http_with(&srv.addr, "GET", "/v1/models", &[("x-api-key", KEY)], b"");
    assert_eq!(st, 200, "{body}");
    let models: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(models["data"][0]["id"], "ds4-flash");
    // the alias and the path are accepted and the alias echoed; another name is 404
    let mut req = chat("Hello", 2);
    for name in [json!("ds4-flash"), json!(model().display().to_string())] {
        req["model"] = name;
        let (st, v) = srv.post("/v1/chat/completions", &req);
        assert_eq!((st, &v["model"]), (200, &json!("ds4-flash")), "{v}");
    }
    req["model"] = json!("gpt-4o");
    let (st, v) = srv.post("/v1/chat/completions", &req);
    assert_eq!((st, &v["error"]["code"]), (404, &json!("model_not_found")), "{v}");
    // the Anthropic endpoints answer in Anthropic's shape: unknown model, bad key, no key
    let msg = json!({"model": "claude-sonnet-4-5", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}).to_string();
    for (headers, want_status, want_type) in [
        (vec![("x-api-key", KEY)], 404, "not_found_error"),
        (vec![("x-api-key", "wrong")], 401, "authentication_error"),
        (vec![], 401, "authentication_error"),
    ] {
        for path in ["/v1/messages", "/v1/messages/count_tokens"] {
            let (st, _, body) = http_with(&srv.addr, "POST", path, &headers, msg.as_bytes());
            let v: Value = serde_json::from_str(&body).expect("json");
            assert_eq!((st, &v["type"], &v["error"]["type"]), (want_status, &json!("error"), &json!(want_type)), "{path}: {v}");
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        }
    }
    // with the served name: a message whose greedy text is the chat completion's
    let msg = json!({"model": "ds4-flash", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "Hello"}]});
    let (st, _, body) = http_with(&srv.addr, "POST", "/v1/messages", &[("x-api-key", KEY)], msg.to_string().as_bytes());
    assert_eq!(st, 200, "{body}");
    let m: Value = serde_json::from_str(&body).expect("json");
    let (_, c) = srv.post("/v1/chat/completions", &json!({"model": "ds4-flash", "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "Hello"}]}));
    assert_eq!(m["content"][0]["text"], c["choices"][0]["message"]["content"], "{m} {c}");
    assert_eq!((&m["stop_reason"], &m["usage"]["output_tokens"]), (&json!("max_tokens"), &json!(4)), "{m}");
}

/// Every way an expert worker can fail during a request ends in a respawn (the request is
/// replayed and gets the undisturbed reply) or in a clear error to that request, and the next
/// request gets the undisturbed reply: the worker pool is never left broken. The failures are
/// real worker processes misbehaving on cue (`expert_worker::faults`: the worker that takes
/// an armed fault removes its file).
#[test]
fn expert_worker_failures_end_in_a_respawn_or_a_clear_error_and_the_next_request_works() {
    use expert_worker::faults::{Fault, TEST_FAULTS_ENV};
    let faults = tempfile::tempdir().expect("tempdir");
    let srv = Server::start_with_env(&["--experts-hot", "none", "--expert-workers", "2", "--ctx-size", "256"], &[(TEST_FAULTS_ENV, faults.path())]);
    let req = json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0});
    let (st, v) = srv.post("/v1/completions", &req);
    assert_eq!(st, 200, "{v}");
    let want = v["choices"][0]["text"].clone();
    assert!(want.as_str().is_some_and(|t| !t.is_empty()), "{v}");
    let arm = |fs: &[Fault]| {
        for f in fs {
            std::fs::write(faults.path().join(f.file_name()), "").expect("arm a fault");
        }
    };
    let taken = |fs: &[Fault]| fs.iter().all(|f| !faults.path().join(f.file_name()).exists());

    // A remote error frame, a malformed frame, a reply of another protocol version, a crash:
    // the worker is replaced and the layer replayed.
    for f in [Fault::EvalError, Fault::EvalMalformed, Fault::EvalVersion, Fault::EvalExit] {
        arm(&[f]);
        let (st, v) = srv.post("/v1/completions", &req);
        assert!(taken(&[f]), "{f:?} was not taken");
        assert_eq!((st, &v["choices"][0]["text"]), (200, &want), "{f:?}: {v}");
    }
    // A crash whose respawn fails (the new worker exits at start, or speaks another protocol
    // version): that request fails saying why; the next one starts the worker again.
    let version = format!("protocol version mismatch: expected {}, found {}", ipc_proto::PROTOCOL_VERSION, ipc_proto::PROTOCOL_VERSION + 1);
    for (f, says) in [(Fault::StartExit, "exited during start-up"), (Fault::HelloVersion, version.as_str())] {
        arm(&[Fault::EvalExit, f]);
        let (st, v) = srv.post("/v1/completions", &req);
        assert!(taken(&[Fault::EvalExit, f]), "{f:?} was not taken");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert_eq!(st, 500, "{f:?}: {v}");
        assert!(msg.contains("expert worker") && msg.contains(says), "{f:?}: {msg}");
        let (st, v) = srv.post("/v1/completions", &req);
        assert_eq!((st, &v["choices"][0]["text"]), (200, &want), "after {f:?}: {v}");
    }
    let status = srv.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn serve_with_an_adaptive_placement_swaps_experts_and_counts_them() {
    let srv = Server::start(&["--experts-hot", "adaptive:0.5", "--expert-workers", "0", "--ctx-size", "256"]);
    assert_eq!(srv.metric("dflash_expert_swaps_total"), 0.0);
    let (st, v) = srv.post("/v1/chat/completions", &chat("Tell me a long story about the sea and the wind.", 32));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 32, "{v}");
    let swaps = srv.metric("dflash_expert_swaps_total");
    let bytes = srv.metric("dflash_expert_swap_bytes_total");
    assert!(swaps > 0.0, "no expert was swapped while serving");
    assert!(bytes >= swaps, "{bytes} bytes for {swaps} swaps");
    // With workers too: their shares hold every expert of the partly held layers.
    let srv = Server::start(&["--experts-hot", "adaptive:0.5", "--expert-workers", "2", "--ctx-size", "256"]);
    let (st, v) = srv.post("/v1/chat/completions", &chat("Tell me a long story about the sea and the wind.", 32));
    assert_eq!(st, 200, "{v}");
    assert!(srv.metric("dflash_expert_swaps_total") > 0.0);
}
