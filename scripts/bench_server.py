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
"""
import argparse
import concurrent.futures
import json
import statistics
import sys
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


def one(args, prompt, thinking, messages=None):
    body = {
        "model": args.model,
        "messages": messages or [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "thinking": {"type": "enabled" if thinking else "disabled"},
        "chat_template_kwargs": {"thinking": thinking, "enable_thinking": thinking},
    }
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = "Bearer " + args.api_key
    req = urllib.request.Request(args.url.rstrip("/") + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    t0 = time.perf_counter()
    first = last = None
    usage = timings = None
    text = []
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
    t1 = time.perf_counter()
    if usage is None:
        raise RuntimeError("the server sent no usage chunk (stream_options.include_usage)")
    n = usage["completion_tokens"]
    decode_s = (last - first) if first is not None and last is not None else 0.0
    return {
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
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{row['turn']:>4} {row['prompt_tokens']:>7} {fmt(row['cached_tokens'], 'd'):>7} {row['ttft_s']:>8.3f} "
              f"{fmt(row['server_prompt_ms'], '.1f'):>17}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"url": args.url, "agent_first": args.agent_first, "agent_add": args.agent_add,
                       "max_tokens": args.max_tokens, "turns": results}, f, indent=2)


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="", help="model name to send (dflash accepts its alias or empty)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--workloads", default="short,code,prompt2k,prompt8k", help="comma list of " + ",".join(WORKLOADS))
    ap.add_argument("--thinking", default="off,on", help="off, on or off,on")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeat", type=int, default=1, help="times each prompt is sent")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--agent", action="store_true", help="the agent conversation instead of the workloads")
    ap.add_argument("--agent-first", type=int, default=20000, help="tokens of the first user turn")
    ap.add_argument("--agent-add", type=int, default=300, help="tokens each later user turn adds")
    ap.add_argument("--agent-turns", type=int, default=5, help="turns after the first")
    args = ap.parse_args()
    if args.agent:
        agent(args)
        return

    jobs = []
    for w in args.workloads.split(","):
        if w not in WORKLOADS:
            sys.exit(f"unknown workload {w!r} (expected one of {', '.join(WORKLOADS)})")
        for think in args.thinking.split(","):
            if think not in ("off", "on"):
                sys.exit(f"--thinking: expected off and/or on, found {think!r}")
            for p in WORKLOADS[w] * args.repeat:
                jobs.append((f"{w}/think-{think}", p, think == "on"))

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
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
    wall = time.perf_counter() - t0

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

    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"{'workload':<22} {'n':>3} {'prompt':>7} {'gen':>6} {'ttft s':>8} {'decode t/s':>11} {'wall t/s':>9}")
    for name, s in summary.items():
        print(f"{name:<22} {s['requests']:>3} {fmt(s['mean_prompt_tokens'], '.0f'):>7} {fmt(s['mean_completion_tokens'], '.0f'):>6} "
              f"{fmt(s['mean_ttft_s'], '.3f'):>8} {fmt(s['mean_decode_tok_s'], '.2f'):>11} {fmt(s['mean_wall_tok_s'], '.2f'):>9}")
    print(f"aggregate: {total_tokens} tokens in {wall:.1f} s = {fmt(out['aggregate_tok_s'], '.2f')} tok/s "
          f"(concurrency {args.concurrency})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
