"""The growth benchmark runs end to end on the tiny model and reports exact growth."""

import json

import pytest

from evogrow.bench import growth as bench

pytestmark = pytest.mark.slow  # runs a benchmark end to end


def test_tiny_model_every_case_is_exact_and_timed(capsys):
    assert bench.main(["--sizes", "tiny", "--repeats", "1", "--min-seconds", "0"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cases = bench.CASES
    assert {f"tiny_{c}_err" for c in cases} <= set(results)
    assert results["max_err"] <= 1e-5
    assert results["tiny_add_layer_err"] == 0.0  # depth growth is bit-exact
    assert all(results[f"tiny_{c}_ratio"] > 0 for c in cases)
    assert results["max_ratio"] == max(results[f"tiny_{c}_ratio"] for c in cases)
