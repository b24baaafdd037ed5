"""The official anthropic client against `dflash serve` (started by scripts/test_openai.sh with
--api-key test-key on models/tiny-ds4.gguf), checked against the same server's OpenAI
endpoints: the same conversation renders to the same prompt and greedy reply through both. Run
through that script."""
import json
import os
import unittest
import urllib.request

import anthropic
import openai

URL = os.environ["DFLASH_URL"]
KEY = os.environ["DFLASH_KEY"]
SERVED = "tiny-ds4"
# agents send their own model names; the server answers with the one it serves
MODEL = "claude-sonnet-4-5"
WEATHER = {"name": "get_weather", "description": "Current weather for a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OPENAI_WEATHER = {"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                                   "parameters": WEATHER["input_schema"]}}
OPENING = "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\""


def client(key=KEY):
    return anthropic.Anthropic(base_url=URL, api_key=key, max_retries=0, timeout=300)


def oai():
    return openai.OpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0, timeout=300)


# greedy; this client version has no `temperature` argument, the API still takes the field
GREEDY = {"temperature": 0}


def create(messages, max_tokens=6, **kw):
    return client().messages.create(model=MODEL, max_tokens=max_tokens, messages=messages, extra_body=GREEDY, **kw)


def count(messages, **kw):
    return client().messages.count_tokens(model=MODEL, messages=messages, **kw).input_tokens


def n_tokens(text, parse_special=True):
    req = urllib.request.Request(URL + "/tokenize", method="POST",
                                 data=json.dumps({"content": text, "parse_special": parse_special}).encode(),
                                 headers={"Authorization": "Bearer " + KEY})
    return len(json.loads(urllib.request.urlopen(req).read())["tokens"])


def user(text):
    return [{"role": "user", "content": text}]


class AnthropicClient(unittest.TestCase):
    def test_message_matches_the_openai_endpoint(self):
        r = create(user("Hello"), system="Be brief.")
        self.assertEqual((r.type, r.role, r.model), ("message", "assistant", SERVED))
        self.assertEqual(r.stop_reason, "max_tokens")
        self.assertEqual(r.usage.output_tokens, 6)
        self.assertEqual([b.type for b in r.content], ["text"])
        o = oai().chat.completions.create(model=MODEL, max_tokens=6, temperature=0, messages=[
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
        self.assertEqual(o.model, SERVED)
        self.assertGreater(len(r.content[0].text), 0)
        self.assertEqual(r.content[0].text, o.choices[0].message.content)
        self.assertEqual(r.usage.input_tokens, o.usage.prompt_tokens)

    def test_stream_matches_the_whole_message(self):
        whole = create(user("Hello"))
        with client().messages.stream(model=MODEL, max_tokens=6, messages=user("Hello"), extra_body=GREEDY) as s:
            events = [e.type for e in s]
            final = s.get_final_message()
        self.assertEqual(events[0], "message_start")
        self.assertEqual(events[-1], "message_stop")
        self.assertIn("content_block_start", events)
        self.assertIn("message_delta", events)
        self.assertEqual(final.content[0].text, whole.content[0].text)
        self.assertEqual((final.stop_reason, final.usage.output_tokens), ("max_tokens", 6))
        self.assertEqual(final.usage.input_tokens, whole.usage.input_tokens)

    def test_thinking_blocks(self):
        r = create(user("Hello"), max_tokens=4, thinking={"type": "enabled", "budget_tokens": 1024})
        self.assertEqual(r.content[0].type, "thinking")
        self.assertGreater(len(r.content[0].thinking.strip()), 0)
        o = oai().chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=user("Hello"),
                                          extra_body={"thinking": {"type": "enabled"}})
        self.assertEqual(r.content[0].thinking, o.choices[0].message.reasoning_content)
        # a thinking block in the history is the assistant turn's reasoning (which the template
        # keeps in a conversation with tools)
        def history(blocks):
            return user("Hello") + [{"role": "assistant", "content": blocks + [{"type": "text", "text": "Hi!"}]}] + user("Again")
        on = {"type": "enabled", "budget_tokens": 1024}
        with_reasoning = count(history([{"type": "thinking", "thinking": "Greet back.", "signature": ""}]), tools=[WEATHER], thinking=on)
        self.assertEqual(with_reasoning - count(history([]), tools=[WEATHER], thinking=on), n_tokens("Greet back.", False))
        self.assertEqual(with_reasoning, oai().chat.completions.create(
            model=MODEL, max_tokens=1, temperature=0, tools=[OPENAI_WEATHER], extra_body={"thinking": {"type": "enabled"}}, messages=[
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi!", "reasoning_content": "Greet back."},
                {"role": "user", "content": "Again"}]).usage.prompt_tokens)

    def test_stop_sequences(self):
        text = create(user("Hello"), max_tokens=8).content[0].text
        self.assertGreaterEqual(len(text), 4)
        stop = text[2:4]
        r = create(user("Hello"), max_tokens=8, stop_sequences=[stop])
        self.assertEqual((r.stop_reason, r.stop_sequence), ("stop_sequence", stop))
        self.assertEqual(r.content[0].text, text[:text.index(stop)])

    def test_tools_are_rendered_and_a_named_tool_is_forced(self):
        base = count(user("Weather in Oslo?"))
        with_tools = count(user("Weather in Oslo?"), tools=[WEATHER])
        self.assertGreater(with_tools, base + 100)
        self.assertEqual(count(user("Weather in Oslo?"), tools=[WEATHER], tool_choice={"type": "none"}), base)
        r = create(user("Weather in Oslo?"), max_tokens=5, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"})
        # the prompt ends with the start of a get_weather call
        opening = n_tokens(OPENING) + n_tokens("get_weather", False) + n_tokens("\">\n")
        self.assertEqual(r.usage.input_tokens, with_tools + opening)
        # the tiny model does not close the block in 5 tokens: the reply is the text, opening included
        self.assertEqual((r.stop_reason, [b.type for b in r.content]), ("max_tokens", ["text"]))
        self.assertTrue(r.content[0].text.startswith(OPENING + "get_weather\">\n"), r.content[0].text)
        self.assertGreater(len(r.content[0].text), len(OPENING + "get_weather\">\n"))
        # the same through OpenAI's named tool_choice
        o = oai().chat.completions.create(model=MODEL, max_tokens=5, temperature=0, messages=user("Weather in Oslo?"),
                                          tools=[OPENAI_WEATHER],
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
        self.assertEqual(o.choices[0].message.content, r.content[0].text)
        with self.assertRaises(anthropic.BadRequestError) as e:
            create(user("x"), tools=[WEATHER], tool_choice={"type": "any"}, thinking={"type": "enabled", "budget_tokens": 1024})
        self.assertIn("cannot be combined with thinking", e.exception.body["error"]["message"])

    def test_tool_use_round_trip(self):
        # an assistant tool_use and the user's tool_result render like OpenAI's tool_calls and tool message
        history = user("Weather in Oslo?") + [
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo", "days": 2}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "-3 C, snow"}]},
                {"type": "text", "text": "Is that cold?"}]}]
        r = create(history, tools=[WEATHER])
        self.assertEqual(r.usage.input_tokens, count(history, tools=[WEATHER]))
        o = oai().chat.completions.create(model=MODEL, max_tokens=6, temperature=0, tools=[OPENAI_WEATHER], messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
                "name": "get_weather", "arguments": json.dumps({"city": "Oslo", "days": 2})}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "-3 C, snow"},
            {"role": "user", "content": "Is that cold?"}])
        self.assertEqual(r.usage.input_tokens, o.usage.prompt_tokens)
        self.assertEqual(r.content[0].text, o.choices[0].message.content)
        # the call's arguments reach the prompt: other arguments, another prompt
        other = json.loads(json.dumps(history))
        other[1]["content"][1]["input"] = {"city": "Bergen", "days": 20}
        self.assertEqual(count(other, tools=[WEATHER]), r.usage.input_tokens + n_tokens("Bergen") - n_tokens("Oslo")
                         + n_tokens("20") - n_tokens("2"))

    def test_count_tokens(self):
        self.assertEqual(count(user("Hello")), create(user("Hello"), max_tokens=1).usage.input_tokens)
        self.assertLess(count(user("Hello")), count(user("Hello there, how are you today?")))

    def test_auth_failure(self):
        with self.assertRaises(anthropic.AuthenticationError) as e:
            client("nope").messages.create(model=MODEL, max_tokens=2, messages=user("x"))
        self.assertEqual(e.exception.body["type"], "error")
        self.assertEqual(e.exception.body["error"]["type"], "authentication_error")
        # a bearer token works too
        r = anthropic.Anthropic(base_url=URL, auth_token=KEY, max_retries=0).messages.create(
            model=MODEL, max_tokens=1, messages=user("x"), extra_body=GREEDY)
        self.assertEqual(r.usage.output_tokens, 1)

    def test_error_shape(self):
        with self.assertRaises(anthropic.BadRequestError) as e:
            create([{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
        self.assertEqual(e.exception.body["error"]["type"], "invalid_request_error")
        self.assertIn("messages[0].content[0]: unsupported content block type \"image\"", e.exception.body["error"]["message"])
        # max_tokens is required; a body that is not JSON is refused in the same shape
        for body in (json.dumps({"model": MODEL, "messages": user("x")}).encode(), b"{oops"):
            req = urllib.request.Request(URL + "/v1/messages", data=body, method="POST", headers={"x-api-key": KEY})
            with self.assertRaises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req)
            self.assertEqual(e.exception.code, 400)
            err = json.loads(e.exception.read())
            self.assertEqual((err["type"], err["error"]["type"]), ("error", "invalid_request_error"))
        with self.assertRaises(anthropic.BadRequestError) as e:
            create(user("hello " * 2000))
        self.assertIn("2005 tokens", e.exception.body["error"]["message"])


if __name__ == "__main__":
    unittest.main()
