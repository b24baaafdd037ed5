"""The official openai client against `dflash serve` (started by scripts/test_openai.sh with
--api-key test-key --parallel 4 on models/tiny-ds4.gguf). Run through that script."""
import concurrent.futures
import json
import os
import socket
import time
import unittest
import urllib.request

import openai

URL = os.environ["DFLASH_URL"]
KEY = os.environ["DFLASH_KEY"]
MODEL = "tiny-ds4"


def client(key=KEY):
    return openai.OpenAI(base_url=URL + "/v1", api_key=key, max_retries=0, timeout=300)


def ask(content, max_tokens=6, **kw):
    return client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0, **kw)


def stream(content, max_tokens=6, **kw):
    chunks = client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, **kw)
    text, finish, usage = "", None, None
    for c in chunks:
        if c.usage is not None:
            usage = c.usage
        for ch in c.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return text, finish, usage


def metric(name):
    req = urllib.request.Request(URL + "/metrics", headers={"Authorization": "Bearer " + KEY})
    for line in urllib.request.urlopen(req).read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(name)


class OpenAIClient(unittest.TestCase):
    def test_models(self):
        self.assertEqual([m.id for m in client().models.list().data], [MODEL])

    def test_chat_stream_and_non_stream_agree(self):
        r = ask("Hello")
        self.assertEqual(r.choices[0].finish_reason, "length")
        self.assertEqual(r.usage.completion_tokens, 6)
        text, finish, usage = stream("Hello")
        self.assertEqual(text, r.choices[0].message.content)
        self.assertEqual(finish, "length")
        self.assertEqual(usage.total_tokens, r.usage.total_tokens)

    def test_max_tokens(self):
        for n in (1, 3):
            self.assertEqual(ask("Count", max_tokens=n).usage.completion_tokens, n)

    def test_stop_string(self):
        text = ask("Hello", max_tokens=8).choices[0].message.content
        self.assertGreaterEqual(len(text), 4)
        stop = text[2:4]
        r = ask("Hello", max_tokens=8, stop=[stop])
        self.assertEqual(r.choices[0].message.content, text[:text.index(stop)])
        self.assertEqual(r.choices[0].finish_reason, "stop")
        s, finish, _ = stream("Hello", max_tokens=8, stop=stop)
        self.assertEqual((s, finish), (text[:text.index(stop)], "stop"))

    def test_seed_determinism(self):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "Pick"}], max_tokens=6, temperature=1.0)
        a = client().chat.completions.create(seed=5, **kw).choices[0].message.content
        b = client().chat.completions.create(seed=5, **kw).choices[0].message.content
        self.assertEqual(a, b)

    def test_n_above_one_rejected(self):
        with self.assertRaises(openai.BadRequestError) as e:
            ask("x", n=2)
        self.assertIn("n must be 1", str(e.exception))

    def test_invalid_json(self):
        req = urllib.request.Request(URL + "/v1/chat/completions", data=b"{oops", method="POST",
                                     headers={"Authorization": "Bearer " + KEY, "Content-Type": "application/json"})
        with self.assertRaises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        self.assertEqual(e.exception.code, 400)
        self.assertEqual(json.loads(e.exception.read())["error"]["type"], "invalid_request_error")

    def test_any_model_name_is_accepted_and_the_served_one_echoed(self):
        r = client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hello"}],
                                             max_tokens=6, temperature=0)
        self.assertEqual(r.model, MODEL)
        self.assertEqual(r.choices[0].message.content, ask("Hello").choices[0].message.content)
        c = client().completions.create(model="gpt-3.5-turbo-instruct", prompt="Hello", max_tokens=2)
        self.assertEqual(c.model, MODEL)

    def test_tool_choice(self):
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
        q = "Weather in Oslo?"

        def run(**kw):
            return ask(q, max_tokens=5, **kw)
        plain, auto, none = run(), run(tools=tools), run(tools=tools, tool_choice="none")
        # tools are rendered (auto, the default) or not (none)
        self.assertGreater(auto.usage.prompt_tokens, plain.usage.prompt_tokens + 100)
        self.assertEqual(none.usage.prompt_tokens, plain.usage.prompt_tokens)
        self.assertEqual(none.choices[0].message.content, plain.choices[0].message.content)
        # required / named: the reply starts inside a tool-call block; the tiny model does not close
        # it in 5 tokens, so the reply is its text with finish "length"
        opening = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\""
        for choice, forced in (("required", opening),
                               ({"type": "function", "function": {"name": "get_weather"}}, opening + "get_weather\">\n")):
            r = run(tools=tools, tool_choice=choice)
            text = r.choices[0].message.content
            self.assertTrue(text.startswith(forced), text)
            self.assertGreater(len(text), len(forced))
            self.assertEqual((r.choices[0].finish_reason, r.choices[0].message.tool_calls), ("length", None))
            s, finish, usage = stream(q, max_tokens=5, tools=tools, tool_choice=choice)
            self.assertEqual((s, finish, usage.prompt_tokens), (text, "length", r.usage.prompt_tokens))
        with self.assertRaises(openai.BadRequestError) as e:
            run(tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}})
        self.assertIn("not among the tools", str(e.exception))
        with self.assertRaises(openai.BadRequestError) as e:
            run(tool_choice="required")
        self.assertIn("needs tools", str(e.exception))

    def test_tool_call_history(self):
        tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
        history = [{"role": "user", "content": "Time?"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
        r = client().chat.completions.create(model=MODEL, messages=history, tools=tools, max_tokens=3, temperature=0)
        self.assertEqual(r.usage.completion_tokens, 3)
        shorter = client().chat.completions.create(model=MODEL, messages=history[:1], tools=tools, max_tokens=1)
        self.assertGreater(r.usage.prompt_tokens, shorter.usage.prompt_tokens + 10)

    def test_wrong_api_key(self):
        with self.assertRaises(openai.AuthenticationError):
            client("nope").models.list()

    def test_oversized_prompt(self):
        with self.assertRaises(openai.BadRequestError) as e:
            ask("hello " * 2000)
        self.assertEqual(e.exception.code, "context_length_exceeded")
        self.assertIn("2005 tokens", str(e.exception))

    def test_out_of_range_token_ids(self):
        with self.assertRaises(openai.BadRequestError) as e:
            client().completions.create(model=MODEL, prompt=[1, 2, 10_000_000], max_tokens=2)
        self.assertIn("10000000", str(e.exception))
        with self.assertRaises(openai.BadRequestError) as e:
            ask("x", logit_bias={"999999": 5})
        self.assertIn("999999", str(e.exception))

    def test_client_disconnect_mid_stream(self):
        before = metric("dflash_requests_cancelled_total")
        s = client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go on"}],
                                             max_tokens=100, temperature=0, stream=True)
        next(iter(s))
        s.close()
        deadline = time.time() + 60
        while metric("dflash_requests_cancelled_total") <= before:
            self.assertLess(time.time(), deadline)
            time.sleep(0.1)
        self.assertEqual(ask("Hello").choices[0].finish_reason, "length")

    def test_concurrent_streams_match_sequential_greedy(self):
        prompts = [f"Question {i}: what is {i} + {i}?" for i in range(16)]
        sequential = [stream(p, max_tokens=5)[0] for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            concurrent_ = list(pool.map(lambda p: stream(p, max_tokens=5)[0], prompts))
        self.assertEqual(concurrent_, sequential)
        self.assertGreater(len(set(sequential)), 1)


if __name__ == "__main__":
    unittest.main()
