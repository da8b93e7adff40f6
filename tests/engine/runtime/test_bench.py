"""`plan-engine bench --concurrency`: both load generators run end to end and count what they claim.

Speed is never asserted (that is what the benchmark itself reports); these tests check that
every level runs the requests it says, counts every generated token, and reports sane timings,
on the tiny synthetic model so they take a second.
"""

from __future__ import annotations

import json

import pytest
from cli_runner import assert_clean_error, cli


@pytest.mark.parametrize("mode", [[], ["--grpc"], ["--batch-invariant"]])
def test_concurrency_levels_count_every_token(tiny, mode):
    result = cli("bench", "--model", str(tiny), "--concurrency", "1,3", "--prompt-len", "4", "--gen-len", "5",
                 "--json", *mode)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["mode"] == ("grpc" if "--grpc" in mode else "in-process")
    assert report["batch_invariant"] == ("--batch-invariant" in mode)
    levels = report["levels"]
    assert [r["concurrency"] for r in levels] == [1, 3]
    for r in levels:
        assert r["tokens"] == r["concurrency"] * 5  # every request decoded its 5 tokens
        assert r["aggregate_tok_s"] > 0
        assert 0 <= r["ttft_p50_s"] <= r["ttft_p99_s"] and 0 <= r["itl_p50_s"] <= r["itl_p99_s"]
    assert levels[0]["vs_first_level"] == 1.0


@pytest.mark.parametrize("levels", ["0", "a,b", "1,300"])
def test_bad_levels_are_a_clean_error(tiny, levels):
    assert_clean_error(cli("bench", "--model", str(tiny), "--concurrency", levels), "--concurrency")


def test_prefix_cache_bench_reports_both_ttfts(tiny):
    result = cli("bench", "--model", str(tiny), "--prefix-cache", "40", "--repeats", "1", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["prefix_len"] == 40 and out["rounds"] == 1
    assert all(out[f"cache_{s}_{n}_ttft_s"] >= 0 for s in ("on", "off") for n in ("first", "second"))
