"""Candidates of a generation over several devices; mu2Net+'s FLOPs score and population cap.

The parallel test runs in a subprocess with two simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=2): the same task iteration with
`devices=1` and `devices=2` publishes the same best path with bit-identical parameters,
and with two devices the steps were compiled for both of them.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from search_testlib import SEARCH, _task_data_of
from tiny_vit_testlib import TINY_VIT, random_params

from evolution.roots import seeding
from evolution.search import iteration, scoring
from evolution.search import loop as search
from evolution.search.execution import placement
from evolution.search.paths import candidate as cand
from evolution.search.paths import flops as flops_lib
from evolution.store import sqlite as sqlite_store
from evolution.system import state as system

TESTS_DIR = pathlib.Path(__file__).resolve().parents[3]
REPO = TESTS_DIR.parent

_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    import jax
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from search_testlib import SEARCH, _task_data_of
    from tiny_vit_testlib import TINY_VIT, random_params
    from evolution.search.paths import candidate
    from evolution.search import loop as search
    from evolution.roots import seeding
    from evolution.store import sqlite as sqlite_store

    assert len(jax.local_devices()) == 2, jax.local_devices()
    out = {}
    for devices in (1, 2):
        store = sqlite_store.SqliteStore(f"{sys.argv[2]}/store{devices}")
        seeding.seed_root(store, TINY_VIT, random_params(), agent="root")
        cache = candidate.StepCache()
        data = _task_data_of("tex_a")
        config = dataclasses.replace(SEARCH, devices=devices)
        result = search.evolve_task(
            store, "tex_a", config, train_batches_fn=data.train_batches_fn,
            validation_batches=data.validation_batches, cache=cache,
        )
        params = {cid: store.load_params(cid) for cid in result.best_path.component_ids}
        out[devices] = {
            "best": result.best_path.id,
            "quality": result.quality,
            "qualities": [c.quality for c in result.candidates],
            "checksum": float(sum(np.abs(x).sum() for x in jax.tree_util.tree_leaves(params))),
            "train_devices": sorted({k[-1] for k in cache._train}),
        }
    print(json.dumps(out))
    """
)


@pytest.mark.multiprocess
def test_candidates_on_two_devices_match_one_device(tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        PJRT_NPROC="16",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    completed = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(TESTS_DIR), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = json.loads(completed.stdout.strip().splitlines()[-1])
    one, two = out["1"], out["2"]
    assert one["best"] == two["best"]
    assert one["qualities"] == two["qualities"]
    assert one["checksum"] == two["checksum"]
    assert len(one["train_devices"]) == 1
    assert len(two["train_devices"]) == 2  # both devices trained candidates


def test_search_devices_rejects_more_than_local():
    with pytest.raises(ValueError, match="local devices"):
        placement.search_devices(64)


def test_flops_term_enters_the_score(tmp_path):
    store = sqlite_store.SqliteStore(str(tmp_path / "store"))
    root = seeding.seed_root(store, TINY_VIT, random_params(), agent="root")
    config = dataclasses.replace(SEARCH, generations=1, flops_scale=0.5, scale=1.0)
    data = _task_data_of("tex_a")
    result = search.evolve_task(
        store,
        "tex_a",
        config,
        train_batches_fn=data.train_batches_fn,
        validation_batches=data.validation_batches,
        cache=cand.StepCache(),
    )
    root_flops = flops_lib.path_flops(TINY_VIT, root.components, store.load_params)
    assert root_flops > 0
    best = result.best_path
    flops = best.metrics["flops"]
    assert flops >= root_flops * 0.9  # the child is at least about the root's size
    expected = scoring.score(
        result.quality,
        result.accounted_params,
        result.root_params,
        flops=flops,
        root_flops=root_flops,
        flops_scale=0.5,
    )
    np.testing.assert_allclose(best.score, expected, rtol=1e-9)
    assert best.score < result.quality  # 0.5 ** (flops / F) < 1
    store.close()


def test_population_cap_keeps_the_best():
    paths = [
        system.Path(f"p{i}", "t", (("embed", "c"),), "a", score=score)
        for i, score in enumerate((0.3, 0.9, 0.5, 0.7))
    ]
    population = iteration.Population(paths)
    population.opt_states = {p.id: (None, ()) for p in paths}
    population.cap(2)
    assert sorted(population.paths) == ["p1", "p3"]
    assert sorted(population.offspring) == ["p1", "p3"]
    assert sorted(population.opt_states) == ["p1", "p3"]
    population.cap(None)
    assert len(population.paths) == 2


def test_bad_search_settings_are_refused():
    with pytest.raises(ValueError, match="flops_scale"):
        search.SearchConfig(flops_scale=0.0)
    with pytest.raises(ValueError, match="population_cap"):
        search.SearchConfig(population_cap=0)
    with pytest.raises(ValueError, match="grid of mutation rates"):
        search.SearchConfig(mu=0.25)
    assert search.SearchConfig(mu=0.3).mu == 0.3
