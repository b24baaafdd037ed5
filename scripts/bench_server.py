#!/usr/bin/env python3
"""Benchmark an OpenAI-compatible server (dflash serve, llama-server, ...) with streamed chat
requests. Standard library only.

Workloads: short questions, code completion, ~2K- and ~8K-token prompts, each with thinking off
and on (sent as "thinking": {"type": ...} and chat_template_kwargs, which other servers accept or
ignore). Per request: time to first token (first content/reasoning chunk), decode tok/s =
(usage.completion_tokens - 1) / (last chunk - first chunk), wall tok/s = completion_tokens / total
time; token counts come from the server's final `usage` chunk (stream_options.include_usage),
never from counting SSE chunks. Means per workload; --json writes everything.

  scripts/bench_server.py --url http://127.0.0.1:8080 --concurrency 4 --json out.json

--agent runs one conversation instead, as an agent resends it: a first user turn of about
--agent-first tokens (20000), then --agent-turns more turns (5), each the whole conversation so far
(the assistant's replies included) plus a user message of about --agent-add tokens (300). Per turn:
prompt tokens, the tokens the server restored from its prompt cache
(usage.prompt_tokens_details.cached_tokens), time to first token (client side: the first
content chunk, or the end of the reply when it has no text), and the server's prompt time
(timings.prompt_ms) when it reports one. --agent-turns 0 sends only the first turn (after a
restart: how much of it the server kept). scripts/bench/prompt-cache.sh compares a server
with and without the cache and across a restart.

--concurrency-sweep 1,4,8,16 sends one set of requests (the short and code workloads, thinking
off, cycled to --sweep-requests, default 2 x the highest level) at each concurrency in turn, so
every level keeps all its clients busy. Per level: aggregate tok/s = sum of
usage.completion_tokens / the level's wall time, its ratio to level 1's (or the lowest level's),
mean per-stream decode tok/s, and mean/p50/p95 TTFT (which includes any wait in the server's
queue).

--interrupt starts --interrupt-streams streams (8) asking for long replies
(--interrupt-max-tokens, 256) and records, client side, when every content chunk of each
arrives. Once each has produced --interrupt-after chunks (8), one request with a prompt of about
--interrupt-prompt-tokens tokens (4000, sized with /tokenize, unique so no prompt cache holds
it) is sent. Per stream: the median gap between chunks before that send, the largest gap
overlapping the window from the send to the long prompt's first token, and the chunks that
arrived in the window; and the long prompt's TTFT. A server that reads the long prompt in chunks
of C tokens between decode steps keeps every stream's largest gap within about one chunk's
compute of its usual gap; one that reads it whole stalls them for the whole prefill.
--prefill-chunk C (the value the server was given) adds the estimate TTFT x C / prompt tokens.
--ignore-eos sends "ignore_eos": true with every request (llama-server and dflash honour it),
so the replies run to max_tokens.
scripts/bench/parallel.sh runs both against `dflash serve --parallel N`.
"""
import argparse
import concurrent.futures
import json
import math
import statistics
import sys
import threading
import time
import urllib.request

FILLER = ("The quick brown fox jumps over the lazy dog while the committee reviews the quarterly report "
          "on distributed systems, cache coherence and the history of numerical linear algebra. ")


def long_prompt(tokens):
    # about 20 tokens per filler sentence with byte-level BPE
    return (FILLER * max(1, tokens // 20)) + "\nSummarize the text above in one sentence."


WORKLOADS = {
    "short": ["What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
              "What is 17 times 23?"],
    "code": ["Complete this Python function:\n\ndef fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
             "Write a C function that reverses a singly linked list.",
             "Complete this Rust code:\n\nfn is_prime(n: u64) -> bool {\n"],
    "prompt2k": [long_prompt(2000)],
    "prompt8k": [long_prompt(8000)],
}


def one(args, prompt, thinking, messages=None, on_chunk=None, times=False, max_tokens=None):
    """One streamed chat request. `on_chunk()` is called as each content/reasoning chunk
    arrives; with `times`, the result has `start` and `chunk_times` (time.perf_counter values:
    the send and every such chunk's arrival)."""
    body = {
        "model": args.model,
        "messages": messages or [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens if max_tokens is None else max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "thinking": {"type": "enabled" if thinking else "disabled"},
        "chat_template_kwargs": {"thinking": thinking, "enable_thinking": thinking},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = "Bearer " + args.api_key
    req = urllib.request.Request(args.url.rstrip("/") + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    t0 = time.perf_counter()
    first = last = None
    usage = timings = None
    text = []
    chunk_times = []
    with urllib.request.urlopen(req, timeout=args.timeout) as resp:
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("timings"):
                timings = chunk["timings"]
            for ch in chunk.get("choices") or []:
                d = ch.get("delta") or {}
                text.append(d.get("content") or "")
                if d.get("content") or d.get("reasoning_content") or d.get("reasoning"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    chunk_times.append(now)
                    if on_chunk:
                        on_chunk()
    t1 = time.perf_counter()
    if usage is None:
        raise RuntimeError("the server sent no usage chunk (stream_options.include_usage)")
    n = usage["completion_tokens"]
    decode_s = (last - first) if first is not None and last is not None else 0.0
    r = {
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
        "completion_tokens": n,
        "ttft_s": (first - t0) if first is not None else None,
        "end_s": t1 - t0,
        "server_prompt_ms": (timings or {}).get("prompt_ms"),
        "reply": "".join(text),
        "decode_tok_s": (n - 1) / decode_s if decode_s > 0 and n > 1 else None,
        "wall_tok_s": n / (t1 - t0) if t1 > t0 else None,
        "total_s": t1 - t0,
    }
    if times:
        r["start"], r["chunk_times"] = t0, chunk_times
    return r


def count_tokens(args, text):
    """Tokens of `text` by the server's /tokenize (llama-server's shape), or None."""
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = "Bearer " + args.api_key
    req = urllib.request.Request(args.url.rstrip("/") + "/tokenize", data=json.dumps({"content": text}).encode(),
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            return len(json.loads(resp.read())["tokens"])
    except Exception:  # noqa: BLE001 - any server without /tokenize
        return None


def sized_text(args, tag, tokens):
    """About `tokens` tokens of filler text starting with `tag`, sized with /tokenize when there is one."""
    unit = f"{tag} " + FILLER
    n = count_tokens(args, unit * 10)
    per_unit = n / 10 if n else 20
    return unit * max(1, round(tokens / per_unit)) + f"\n{tag}: summarize the text above in one sentence."


def agent(args):
    messages = []
    results = []
    for turn in range(args.agent_turns + 1):
        tag = f"Turn {turn}"
        messages.append({"role": "user", "content": sized_text(args, tag, args.agent_first if turn == 0 else args.agent_add)})
        r = one(args, None, args.thinking == "on", messages=messages)  # "off,on" (the default) is off
        ttft = r["ttft_s"] if r["ttft_s"] is not None else r["end_s"]
        row = {"turn": turn + 1, "prompt_tokens": r["prompt_tokens"], "cached_tokens": r["cached_tokens"], "ttft_s": ttft,
               "server_prompt_ms": r["server_prompt_ms"], "completion_tokens": r["completion_tokens"]}
        print(json.dumps(row), file=sys.stderr)
        row["reply"] = r["reply"]
        results.append(row)
        messages.append({"role": "assistant", "content": r["reply"]})
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'ttft s':>8} {'server prompt ms':>17}")
    for row in results:
        print(f"{row['turn']:>4} {row['prompt_tokens']:>7} {fmt(row['cached_tokens'], 'd'):>7} {row['ttft_s']:>8.3f} "
              f"{fmt(row['server_prompt_ms'], '.1f'):>17}")
    write_json(args, {"url": args.url, "agent_first": args.agent_first, "agent_add": args.agent_add,
                      "max_tokens": args.max_tokens, "turns": results})


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def percentile(xs, q):
    """The q-th percentile (0-100) of the values that are not None, interpolated linearly
    between the closest ranks (numpy's default); None when there are none."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def workload_jobs(args):
    """(name, prompt, thinking) for every prompt of --workloads x --thinking, --repeat times."""
    jobs = []
    for w in args.workloads.split(","):
        if w not in WORKLOADS:
            sys.exit(f"unknown workload {w!r} (expected one of {', '.join(WORKLOADS)})")
        for think in args.thinking.split(","):
            if think not in ("off", "on"):
                sys.exit(f"--thinking: expected off and/or on, found {think!r}")
            for p in WORKLOADS[w] * args.repeat:
                jobs.append((f"{w}/think-{think}", p, think == "on"))
    return jobs


def run_jobs(args, jobs, concurrency):
    """Sends `jobs` with `concurrency` clients; returns the results (an "error" for each failed
    request) in the jobs' order and the wall time from the first send to the last reply."""
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [(name, pool.submit(one, args, p, think)) for name, p, think in jobs]
        results = []
        for name, f in futures:
            try:
                r = f.result()
            except Exception as e:  # report and go on
                r = {"error": str(e)}
            r["workload"] = name
            results.append(r)
            print(json.dumps(r), file=sys.stderr)
    return results, time.perf_counter() - t0


def workloads(args):
    jobs = workload_jobs(args)
    results, wall = run_jobs(args, jobs, args.concurrency)
    summary = {}
    for name in dict.fromkeys(r["workload"] for r in results):
        rs = [r for r in results if r["workload"] == name and "error" not in r]
        summary[name] = {
            "requests": len(rs),
            "errors": sum(1 for r in results if r["workload"] == name and "error" in r),
            "mean_prompt_tokens": mean([r["prompt_tokens"] for r in rs]),
            "mean_completion_tokens": mean([r["completion_tokens"] for r in rs]),
            "mean_ttft_s": mean([r["ttft_s"] for r in rs]),
            "mean_decode_tok_s": mean([r["decode_tok_s"] for r in rs]),
            "mean_wall_tok_s": mean([r["wall_tok_s"] for r in rs]),
        }
    total_tokens = sum(r.get("completion_tokens", 0) for r in results)
    out = {"url": args.url, "concurrency": args.concurrency, "max_tokens": args.max_tokens, "wall_s": wall,
           "aggregate_tok_s": total_tokens / wall if wall > 0 else None, "workloads": summary, "requests": results}

    print(f"{'workload':<22} {'n':>3} {'prompt':>7} {'gen':>6} {'ttft s':>8} {'decode t/s':>11} {'wall t/s':>9}")
    for name, s in summary.items():
        print(f"{name:<22} {s['requests']:>3} {fmt(s['mean_prompt_tokens'], '.0f'):>7} {fmt(s['mean_completion_tokens'], '.0f'):>6} "
              f"{fmt(s['mean_ttft_s'], '.3f'):>8} {fmt(s['mean_decode_tok_s'], '.2f'):>11} {fmt(s['mean_wall_tok_s'], '.2f'):>9}")
    print(f"aggregate: {total_tokens} tokens in {wall:.1f} s = {fmt(out['aggregate_tok_s'], '.2f')} tok/s "
          f"(concurrency {args.concurrency})")
    write_json(args, out)
    return sum(1 for r in results if "error" in r)


def level_summary(concurrency, results, wall):
    """One concurrency level of the sweep: the aggregate and per-stream figures."""
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["completion_tokens"] for r in ok)
    ttft = [r["ttft_s"] for r in ok]
    return {
        "concurrency": concurrency,
        "requests": len(ok),
        "errors": len(results) - len(ok),
        "completion_tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall if wall > 0 else None,
        "mean_decode_tok_s": mean([r["decode_tok_s"] for r in ok]),
        "mean_ttft_s": mean(ttft),
        "p50_ttft_s": percentile(ttft, 50),
        "p95_ttft_s": percentile(ttft, 95),
        "requests_detail": results,
    }


def sweep(args):
    try:
        levels = [int(c) for c in args.concurrency_sweep.split(",")]
    except ValueError:
        sys.exit(f"--concurrency-sweep: expected a comma list of integers, found {args.concurrency_sweep!r}")
    if not levels or min(levels) < 1:
        sys.exit(f"--concurrency-sweep: every level must be at least 1, found {args.concurrency_sweep!r}")
    base = workload_jobs(args)
    n = args.sweep_requests or 2 * max(levels)
    jobs = [base[i % len(base)] for i in range(n)]
    for _ in range(args.warmup):
        one(args, base[0][1], base[0][2])
    rows = []
    for c in levels:
        print(f"== concurrency {c}: {n} requests", file=sys.stderr)
        results, wall = run_jobs(args, jobs, c)
        rows.append(level_summary(c, results, wall))
    ref = min(rows, key=lambda r: r["concurrency"])
    for row in rows:
        a, b = row["aggregate_tok_s"], ref["aggregate_tok_s"]
        row["aggregate_vs_ref"] = a / b if a is not None and b else None

    vs = f"vs c={ref['concurrency']}"
    print(f"{'conc':>4} {'reqs':>4} {'err':>3} {'gen tok':>7} {'wall s':>7} {'agg t/s':>8} {vs:>7} "
          f"{'stream t/s':>10} {'ttft mean':>9} {'p50':>7} {'p95':>7}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['requests']:>4} {r['errors']:>3} {r['completion_tokens']:>7} {r['wall_s']:>7.2f} "
              f"{fmt(r['aggregate_tok_s'], '.2f'):>8} {fmt(r['aggregate_vs_ref'], '.2f'):>7} "
              f"{fmt(r['mean_decode_tok_s'], '.2f'):>10} {fmt(r['mean_ttft_s'], '.3f'):>9} "
              f"{fmt(r['p50_ttft_s'], '.3f'):>7} {fmt(r['p95_ttft_s'], '.3f'):>7}")
    print(f"(workloads {args.workloads}, thinking {args.thinking}, max_tokens {args.max_tokens}; "
          f"agg = completion tokens / wall; stream = mean per-request decode t/s; TTFT in s)")
    write_json(args, {"url": args.url, "max_tokens": args.max_tokens, "workloads": args.workloads,
                      "thinking": args.thinking, "requests_per_level": n, "reference_concurrency": ref["concurrency"],
                      "levels": rows})
    return sum(r["errors"] for r in rows)


# Prompts that ask for long replies, for the streams the long prompt interrupts.
LONG_REPLY_PROMPTS = [
    "Write a detailed essay of at least 1500 words on the history of the printing press.",
    "Explain step by step and in depth how a compiler turns source code into machine code.",
    "List the numbers from 1 to 400, one per line, each followed by its square.",
    "Write a long story, with dialogue, about a lighthouse keeper during a week of storms.",
    "Describe in detail how TCP opens, uses and closes a connection, with every header field.",
    "Write a thorough tutorial on sorting algorithms, with Python code and analysis for each.",
    "Explain the causes, the course and the consequences of the French Revolution in detail.",
    "Write a long poem of at least forty stanzas about the sea and the people who sail it.",
]


def interrupt_gaps(times, send, long_first):
    """One running stream's chunk arrival times (sorted) against the long prompt's send time
    and first token: the median gap between chunks that both arrived before the send, the
    largest gap between consecutive chunks that overlaps the window (send, long_first) (the
    gap across the send included: the stream waits from its last chunk), and how many chunks
    arrived in the window. A stream with no chunk after the send has no window gap."""
    gaps_before = [b - a for a, b in zip(times, times[1:]) if b <= send]
    window = [b - a for a, b in zip(times, times[1:]) if b > send and a < long_first]
    return {
        "median_gap_before_s": statistics.median(gaps_before) if gaps_before else None,
        "max_gap_window_s": max(window) if window else None,
        "chunks_in_window": sum(1 for t in times if send < t <= long_first),
        "chunks_before": sum(1 for t in times if t <= send),
    }


def interrupt(args):
    k = args.interrupt_streams
    if k < 1:
        sys.exit(f"--interrupt-streams must be at least 1, found {k}")
    nonce = f"Request {time.time_ns()}"  # a new prefix each run: no prompt cache holds it
    long_text = sized_text(args, nonce, args.interrupt_prompt_tokens)
    cond = threading.Condition()
    counts, done = [0] * k, [False] * k

    def chunk(i):
        with cond:
            counts[i] += 1
            cond.notify_all()

    def stream(i):
        try:
            return one(args, LONG_REPLY_PROMPTS[i % len(LONG_REPLY_PROMPTS)], False, times=True,
                       max_tokens=args.interrupt_max_tokens, on_chunk=lambda: chunk(i))
        finally:
            with cond:
                done[i] = True
                cond.notify_all()

    for _ in range(args.warmup):
        one(args, WORKLOADS["short"][0], False)
    origin = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(k + 1) as pool:
        futures = [pool.submit(stream, i) for i in range(k)]
        with cond:
            ready = cond.wait_for(lambda: all(c >= args.interrupt_after or d for c, d in zip(counts, done)),
                                  timeout=args.timeout)
        if not ready:
            sys.exit(f"--interrupt: the {k} streams did not all produce {args.interrupt_after} chunks within "
                     f"{args.timeout} s (is the server's --parallel below {k}?)")
        long_future = pool.submit(one, args, long_text, False, times=True, max_tokens=args.interrupt_long_max_tokens)
        streams = []
        for f in futures:
            try:
                streams.append(f.result())
            except Exception as e:  # report and go on
                streams.append({"error": str(e)})
        try:
            long_r = long_future.result()
        except Exception as e:
            long_r = {"error": str(e)}

    errors = sum(1 for r in streams + [long_r] if "error" in r)
    if "error" in long_r:
        print(f"the long prompt failed: {long_r['error']}", file=sys.stderr)
        write_json(args, {"url": args.url, "streams": streams, "long": long_r})
        return errors
    send = long_r["start"]
    long_first = long_r["chunk_times"][0] if long_r["chunk_times"] else send + long_r["end_s"]
    rows = []
    for i, r in enumerate(streams):
        row = {"stream": i}
        if "error" in r:
            row["error"] = r["error"]
        else:
            row.update(interrupt_gaps(r["chunk_times"], send, long_first))
            row["completion_tokens"] = r["completion_tokens"]
            row["ended_before_send"] = r["start"] + r["end_s"] <= send
            r["start"] -= origin
            r["chunk_times"] = [t - origin for t in r["chunk_times"]]
        rows.append(row)
    long_ttft = long_first - send
    long_r["start"] -= origin
    long_r["chunk_times"] = [t - origin for t in long_r["chunk_times"]]
    per_chunk = long_ttft * args.prefill_chunk / long_r["prompt_tokens"] if args.prefill_chunk else None

    print(f"{'stream':>6} {'gen':>5} {'before':>6} {'median gap s':>12} {'max gap in window s':>19} {'in window':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['stream']:>6} error: {row['error']}")
            continue
        note = "  (ended before the long prompt)" if row["ended_before_send"] else ""
        print(f"{row['stream']:>6} {row['completion_tokens']:>5} {row['chunks_before']:>6} "
              f"{fmt(row['median_gap_before_s'], '.4f'):>12} "
              f"{fmt(row['max_gap_window_s'], '.4f'):>19} {row['chunks_in_window']:>9}{note}")
    ok = [r for r in rows if "error" not in r]
    median_before = percentile([r["median_gap_before_s"] for r in ok], 50)
    max_window = max((r["max_gap_window_s"] for r in ok if r["max_gap_window_s"] is not None), default=None)
    print(f"long prompt: {long_r['prompt_tokens']} tokens, TTFT {long_ttft:.3f} s"
          + (f", server prompt {long_r['server_prompt_ms']:.1f} ms" if long_r.get("server_prompt_ms") is not None else "")
          + (f"; prefill per {args.prefill_chunk}-token chunk ~ {per_chunk:.4f} s (TTFT x chunk / prompt tokens)"
             if per_chunk is not None else ""))
    print(f"running streams: median gap before it {fmt(median_before, '.4f')} s (median of the streams' medians), "
          f"largest gap while it was read {fmt(max_window, '.4f')} s")
    write_json(args, {"url": args.url, "streams_n": k, "interrupt_after": args.interrupt_after,
                      "stream_max_tokens": args.interrupt_max_tokens, "prefill_chunk": args.prefill_chunk,
                      "long_prompt_tokens": long_r["prompt_tokens"], "long_ttft_s": long_ttft,
                      "long_send_s": send - origin, "prefill_per_chunk_s": per_chunk,
                      "median_gap_before_s": median_before, "max_gap_window_s": max_window,
                      "per_stream": rows, "streams": streams, "long": long_r})
    return errors


def write_json(args, out):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="", help="model name to send (dflash accepts its alias or empty)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--workloads", help="comma list of " + ",".join(WORKLOADS)
                    + " (default all; short,code with --concurrency-sweep)")
    ap.add_argument("--thinking", help="off, on or off,on (default off,on; off with --concurrency-sweep)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action="store_true", help='send "ignore_eos": true (llama-server)')
    ap.add_argument("--repeat", type=int, default=1, help="times each prompt is sent")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--warmup", type=int, default=1, help="requests sent and not counted before a sweep or interrupt test")
    ap.add_argument("--concurrency-sweep", metavar="LIST", help="e.g. 1,4,8,16: the same requests at each concurrency")
    ap.add_argument("--sweep-requests", type=int, help="requests per level (default 2 x the highest level)")
    ap.add_argument("--interrupt", action="store_true", help="a long prompt arriving while streams generate")
    ap.add_argument("--interrupt-streams", type=int, default=8, help="running streams")
    ap.add_argument("--interrupt-max-tokens", type=int, default=256, help="max_tokens of the running streams")
    ap.add_argument("--interrupt-after", type=int, default=8, help="chunks every stream has produced before the long prompt")
    ap.add_argument("--interrupt-prompt-tokens", type=int, default=4000, help="about this many tokens of long prompt")
    ap.add_argument("--interrupt-long-max-tokens", type=int, default=16, help="max_tokens of the long prompt's reply")
    ap.add_argument("--prefill-chunk", type=int, help="the server's --prefill-chunk, for the per-chunk estimate")
    ap.add_argument("--agent", action="store_true", help="the agent conversation instead of the workloads")
    ap.add_argument("--agent-first", type=int, default=20000, help="tokens of the first user turn")
    ap.add_argument("--agent-add", type=int, default=300, help="tokens each later user turn adds")
    ap.add_argument("--agent-turns", type=int, default=5, help="turns after the first")
    args = ap.parse_args()
    modes = [m for m in ("agent", "concurrency_sweep", "interrupt") if getattr(args, m)]
    if len(modes) > 1:
        sys.exit("--agent, --concurrency-sweep and --interrupt are separate runs: give one")
    args.workloads = args.workloads or ("short,code" if args.concurrency_sweep else ",".join(WORKLOADS))
    args.thinking = args.thinking or ("off" if args.concurrency_sweep else "off,on")
    if args.agent:
        agent(args)
        return
    errors = sweep(args) if args.concurrency_sweep else interrupt(args) if args.interrupt else workloads(args)
    if errors:
        sys.exit(f"{errors} request(s) failed (see above)")


if __name__ == "__main__":
    main()
