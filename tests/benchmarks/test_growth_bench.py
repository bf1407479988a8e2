"""The growth benchmark runs end to end on the tiny model and reports exact growth."""

import json

import jax
import pytest

from benchmarks import growth as bench

pytestmark = pytest.mark.slow  # runs a benchmark end to end


def test_tiny_model_every_case_is_exact_timed_and_sized(capsys):
    devices = jax.device_count()
    args = ["--sizes", "tiny", "--devices", str(devices), "--repeats", "1", "--min-seconds", "0"]
    assert bench.main(args) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cases = [f"tiny_{c}_d{devices}" for c in bench.CASES]
    assert {f"{c}_err" for c in cases} <= set(results)
    assert results["max_err"] <= 1e-5
    assert results[f"tiny_add_layer_d{devices}_err"] == 0.0  # depth growth is bit-exact
    assert all(results[f"{c}_ratio"] > 0 for c in cases)
    assert results["max_ratio"] == max(results[f"{c}_ratio"] for c in cases)
    # Peak memory per device is at least old + new state (both are live), and the
    # temporaries stay a fraction of it.
    assert all(1.0 <= results[f"{c}_mem_ratio"] <= 1.5 for c in cases)
