"""scripts/bench_server.py: its statistics against the standard library's and hand-worked
cases, and its --concurrency-sweep and --interrupt runs against `dflash serve` (started by
scripts/test_openai.sh with --api-key test-key --parallel 4 on models/tiny-ds4.gguf). Run
through that script."""
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "scripts", "bench_server.py")
sys.path.insert(0, os.path.dirname(SCRIPT))
import bench_server  # noqa: E402

URL = os.environ["DFLASH_URL"]
KEY = os.environ["DFLASH_KEY"]


def run_bench(*flags):
    """Runs the script against the server; returns its JSON output."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        p = subprocess.run([sys.executable, SCRIPT, "--url", URL, "--api-key", KEY, "--json", out, *flags],
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise AssertionError(f"bench_server.py exited {p.returncode}: {p.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f), p.stdout


class Statistics(unittest.TestCase):
    def test_percentile_is_the_inclusive_quantile(self):
        rng = random.Random(7)
        for n in (2, 3, 10, 33):
            xs = [rng.uniform(0, 5) for _ in range(n)]
            cuts = statistics.quantiles(xs, n=100, method="inclusive")  # cuts[q-1] is the q-th percentile
            for q in (50, 95):
                self.assertAlmostEqual(bench_server.percentile(xs + [None], q), cuts[q - 1], places=12)
        self.assertEqual(bench_server.percentile([4.0], 95), 4.0)
        self.assertIsNone(bench_server.percentile([None], 50))

    def test_interrupt_gaps(self):
        # chunks at 0, 1, 2, 3, then a stall to 10; the long prompt sent at 3.5, its first token at 9.5
        g = bench_server.interrupt_gaps([0, 1, 2, 3, 10, 11], 3.5, 9.5)
        self.assertEqual(g, {"median_gap_before_s": 1, "max_gap_window_s": 7, "chunks_in_window": 0, "chunks_before": 4})
        # two chunks inside the window: the largest of the gaps 3->5, 5->6, 6->9.75 that overlap it
        g = bench_server.interrupt_gaps([0, 2, 3, 5, 6, 9.75, 10], 4, 8)
        self.assertEqual(g, {"median_gap_before_s": 1.5, "max_gap_window_s": 3.75, "chunks_in_window": 2, "chunks_before": 3})
        # a stream that ended before the send has no window gap
        g = bench_server.interrupt_gaps([0, 1, 3], 4, 8)
        self.assertEqual(g, {"median_gap_before_s": 1.5, "max_gap_window_s": None, "chunks_in_window": 0, "chunks_before": 3})


class AgainstServer(unittest.TestCase):
    def test_concurrency_sweep(self):
        out, table = run_bench("--concurrency-sweep", "1,2", "--sweep-requests", "5", "--max-tokens", "6", "--warmup", "0")
        self.assertEqual([lv["concurrency"] for lv in out["levels"]], [1, 2])
        prompts_per_level = []
        for lv in out["levels"]:
            reqs = lv["requests_detail"]
            self.assertEqual((lv["requests"], lv["errors"]), (5, 0))
            self.assertEqual(lv["completion_tokens"], sum(r["completion_tokens"] for r in reqs))
            self.assertTrue(all(1 <= r["completion_tokens"] <= 6 for r in reqs))
            self.assertAlmostEqual(lv["aggregate_tok_s"], lv["completion_tokens"] / lv["wall_s"])
            ttft = sorted(r["ttft_s"] for r in reqs)
            self.assertAlmostEqual(lv["p50_ttft_s"], ttft[2])
            self.assertLessEqual(lv["p95_ttft_s"], ttft[-1])
            prompts_per_level.append([(r["workload"], r["prompt_tokens"]) for r in reqs])
        # the same requests at every level, cycled through the short and code workloads
        self.assertEqual(prompts_per_level[0], prompts_per_level[1])
        self.assertEqual([w for w, _ in prompts_per_level[0]], ["short/think-off"] * 4 + ["code/think-off"])
        self.assertAlmostEqual(out["levels"][0]["aggregate_vs_ref"], 1.0)
        self.assertIn("vs c=1", table)

    def test_interrupt(self):
        out, table = run_bench("--interrupt", "--interrupt-streams", "2", "--interrupt-max-tokens", "48",
                               "--interrupt-after", "3", "--interrupt-prompt-tokens", "300",
                               "--interrupt-long-max-tokens", "4", "--warmup", "0")
        self.assertEqual(len(out["per_stream"]), 2)
        # the long prompt was sized with the server's /tokenize
        self.assertLessEqual(abs(out["long_prompt_tokens"] - 300), 45)
        long = out["long"]
        self.assertAlmostEqual(out["long_send_s"], long["start"])
        self.assertAlmostEqual(out["long_ttft_s"], long["chunk_times"][0] - long["start"])
        for row, s in zip(out["per_stream"], out["streams"]):
            # sent only once every stream had 3 chunks (or had ended)
            self.assertTrue(row["chunks_before"] >= 3 or row["ended_before_send"])
            self.assertEqual(row["completion_tokens"], s["completion_tokens"])
            # the figures are those of its chunk times as written (relative times: equal up to rounding)
            again = bench_server.interrupt_gaps(s["chunk_times"], long["start"], long["chunk_times"][0])
            for key, value in again.items():
                if value is None or row[key] is None:
                    self.assertEqual(row[key], value, key)
                else:
                    self.assertAlmostEqual(row[key], value, places=9, msg=key)
        self.assertIn("long prompt:", table)


if __name__ == "__main__":
    unittest.main()
