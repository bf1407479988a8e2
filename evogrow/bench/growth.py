"""Growth exactness and cost: `growth.expand` against a plain copy into the grown shapes.

    python -m evogrow.bench growth [--sizes tiny,small,...] [--repeats N] [--min-seconds S]

For decoder-only LMs (T5 style: RMSNorm, pre-norm, gated MLP, no biases) from about 0.1M
to about 100M parameters, a small pre-LN ViT and a small post-LN BERT encoder, and for
each of the six transformations (mlp_dim, num_heads, qk_dim, v_dim, hidden, add_layer,
each growing its axis by about half; hidden by zero padding for RMSNorm and by
replication x2 for LayerNorm) and their composition, it measures

- exactness: max |logits_after - logits_before| / max |logits_before| on a small random
  batch, in float32 under `jax.default_matmul_precision("highest")` (the issue asks for
  <= 1e-5; depth growth alone must give exactly 0);
- cost: the wall time of `growth.expand` on the parameters and an Adam state (what the
  trainer grows), against the memory-bound floor, a plain copy of the same parameters
  and state into arrays of the grown shapes: every leaf of the grown tree written once
  (the old values into the leading corner, zeros elsewhere) into 64-byte aligned host
  buffers and handed to JAX (zero-copy on CPU), exactly where expand takes its inputs
  (JAX arrays on the default device) and leaves its outputs. Both run interleaved, at
  least `--repeats` times after one warm-up run each, and more (up to 100) until the
  runs add up to `--min-seconds`. Noise on a shared machine only ever slows a run down,
  so each side's time is its best run (as `timeit` takes the minimum) and the ratio is
  best(expand) / best(copy) (the issue asks for <= 2); the table also shows the ratio of
  the medians. The floor copies every leaf; expand passes leaves that a transformation
  does not touch through unchanged, so its ratio can be below 1.

The parameters are random (non-zero biases, gains 1 +- 0.3; see `random_params`). Each
model's header line also gives its float32 noise floor: how far its logits move when
every weight moves by a random half ulp; no float32 evaluation is more exact than that.

Prints a table as it goes (progress lines on stderr); the last line is one JSON object:
`<model>_<case>_err`, `<model>_<case>_ratio`, `<model>_params`, `<model>_f32_noise`,
`max_err` and `max_ratio`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import growth
from growth.transfer import aligned_empty
from models import decoder, encoder, vit

CASES = ("mlp_dim", "num_heads", "qk_dim", "v_dim", "hidden", "add_layer", "all")
_DECODER: dict[str, Any] = dict(max_len=64, attention_scaling="folded")
# model name -> config. Decoders: T5-style defaults of models.decoder (gated GELU MLP,
# RMSNorm, folded attention scale, untied logits).
MODELS: dict[str, Callable[[], Any]] = {
    "tiny": lambda: decoder.decoder_tiny(vocab_size=259, **_DECODER),
    "small": lambda: decoder.DecoderConfig(
        hidden=256,
        mlp_dim=768,
        num_heads=4,
        qk_dim=64,
        v_dim=64,
        num_layers=4,
        vocab_size=2048,
        **_DECODER,
    ),
    "medium": lambda: decoder.DecoderConfig(
        hidden=512,
        mlp_dim=1536,
        num_heads=8,
        qk_dim=64,
        v_dim=64,
        num_layers=6,
        vocab_size=4096,
        **_DECODER,
    ),
    "base": lambda: decoder.DecoderConfig(
        hidden=768,
        mlp_dim=2048,
        num_heads=12,
        qk_dim=64,
        v_dim=64,
        num_layers=12,
        vocab_size=8192,
        **_DECODER,
    ),
    "vit_small": lambda: vit.vit_small(image_shape=(32, 32, 3), num_classes=10),
    "bert_small": lambda: encoder.tiny(
        hidden=128, mlp_dim=512, num_heads=4, qk_dim=32, v_dim=32, num_layers=4, num_classes=3
    ),
}
DEFAULT_SIZES = tuple(MODELS)
BATCH = 2
LENGTH = 32
MAX_REPEATS = 100


def requests_for(config: Any) -> dict[str, list[str] | None]:
    """The growth requests of every case for a model (None: not exact, hence refused).

    Args:
      config: the model config.

    Returns:
      case -> requests. Widths grow by about half, hidden by half with zero padding
      (RMSNorm) or x2 by replication (LayerNorm); the new layer goes in the middle.
    """
    grow = lambda n: n + max(1, n // 2)
    if config.norm == "rmsnorm":
        hidden = f"hidden={grow(config.hidden)}:pad"
    else:
        hidden = f"hidden={2 * config.hidden}:replicate"
    single: dict[str, str | None] = {
        "mlp_dim": f"mlp_dim={grow(config.mlp_dim)}",
        "num_heads": f"num_heads={grow(config.num_heads)}",
        "qk_dim": f"qk_dim={grow(config.qk_dim)}",
        "v_dim": f"v_dim={grow(config.v_dim)}",
        "hidden": hidden,
        "add_layer": f"add_layer@{config.num_layers // 2}",
    }
    if config.norm_placement == "post":  # depth growth is not exact for post-norm blocks
        single["add_layer"] = None
    cases: dict[str, list[str] | None] = {k: None if v is None else [v] for k, v in single.items()}
    cases["all"] = [v for v in single.values() if v is not None]
    return cases


def _module_and_input(config: Any) -> tuple[nn.Module, np.ndarray]:
    rng = np.random.default_rng(1)
    if isinstance(config, vit.ViTConfig):
        return vit.ViT(config), rng.uniform(size=(BATCH, *config.image_shape)).astype(np.float32)
    tokens = rng.integers(1, config.vocab_size, (BATCH, LENGTH)).astype(np.int32)
    if isinstance(config, encoder.EncoderConfig):
        tokens[1, LENGTH // 2 :] = 0  # padding in one row
        return encoder.Encoder(config), tokens
    return decoder.Decoder(config), tokens


def random_params(config: Any, seed: int = 0) -> dict:
    """Random parameters on the default device (non-zero biases and heads, unit-ish gains).

    Kernels are normal with variance 1/fan_in, and the query kernel (and bias) of a model
    with `attention_scaling="folded"` carries the 1/sqrt(qk_dim) that such a model folds
    into its weights (as its initializer does). Without it the attention logits are
    sqrt(qk_dim) times too sharp, and the logits of the deeper models move by about 4e-5
    (relative) under a half-ulp perturbation of the weights: any float32 evaluation
    order, grown or not, is then only that exact.

    Args:
      config: the model config.
      seed: numpy seed.

    Returns:
      The unboxed parameter tree of JAX arrays.
    """
    module, x = _module_and_input(config)
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
    rng = np.random.default_rng(seed)

    def draw(path: Any, leaf: Any) -> jax.Array:
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape, dtype=np.float32)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.3 * noise)
        if "query" in name and config.attention_scaling == "folded":
            noise *= np.float32(config.qk_dim**-0.5)
        if leaf.ndim >= 2 and "embedding" not in name and "word" not in name:
            return jnp.asarray(noise / np.float32(math.sqrt(leaf.shape[0])))
        return jnp.asarray(0.5 * noise)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def adam_state(params: dict) -> Any:
    """An Adam state for `params` with non-zero moments (as after some training)."""
    state = optax.adam(1e-3).init(params)
    adam = state[0]
    mu = jax.tree.map(lambda p: 0.01 * p, params)
    nu = jax.tree.map(lambda p: 1e-4 * p * p, params)
    return (adam._replace(count=jnp.asarray(100, jnp.int32), mu=mu, nu=nu), *state[1:])


@functools.cache
def _apply(config: Any) -> Callable[[dict], jax.Array]:
    module, x = _module_and_input(config)
    apply = jax.jit(module.apply)
    return lambda params: apply({"params": params}, x)


def logits(config: Any, params: dict) -> np.ndarray:
    """The model's outputs on the fixed random batch, float32 at highest precision."""
    with jax.default_matmul_precision("highest"):
        return np.asarray(_apply(config)(params), np.float32)


def float32_noise(config: Any, params: dict, before: np.ndarray) -> float:
    """How exact any float32 evaluation of this model can be (its noise floor).

    Args:
      config: the model config.
      params: its parameters.
      before: its logits.

    Returns:
      The relative error of its logits when every weight moves by a random half ulp (the
      rounding of a float64 value to float32).
    """
    rng = np.random.default_rng(1)

    def perturb(x: jax.Array) -> jax.Array:
        u = rng.uniform(-(2.0**-24), 2.0**-24, x.shape)
        return jnp.asarray((np.asarray(x, np.float64) * (1.0 + u)).astype(np.float32))

    return relative_error(before, logits(config, jax.tree.map(perturb, params)))


def relative_error(before: np.ndarray, after: np.ndarray) -> float:
    """The relative error max |after - before| / max |before|."""
    return float(np.max(np.abs(after - before)) / np.max(np.abs(before)))


def copy_into(old: np.ndarray | None, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A new array of `shape`: `old` in the leading corner, zeros elsewhere, each byte once."""
    out = aligned_empty(shape, dtype)
    if old is None or old.ndim != len(shape):
        out[...] = 0
        return out
    corner = tuple(slice(0, min(o, n)) for o, n in zip(old.shape, shape, strict=True))
    out[corner] = old[corner]
    for axis, (o, n) in enumerate(zip(old.shape, shape, strict=True)):
        if n > o:  # the slab past the old extent along `axis` (disjoint from the others)
            out[corner[:axis] + (slice(o, n),)] = 0
    return out


def _flat(tree: Any) -> dict[tuple, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(k) for k in path): leaf for path, leaf in leaves}


def copy_floor(old: Any, grown_shapes: dict[tuple, tuple[tuple[int, ...], Any]]) -> list:
    """The memory-bound floor: the old leaves copied into the grown shapes, on device.

    Args:
      old: the tree before growth (parameters and optimizer state), JAX arrays.
      grown_shapes: flattened path -> (shape, dtype) of the grown tree.

    Returns:
      The new leaves as JAX arrays (ready).
    """
    old_flat = _flat(old)
    host = []
    for path, (shape, dtype) in grown_shapes.items():
        source = old_flat.get(path)
        host.append(copy_into(None if source is None else np.asarray(source), shape, dtype))
    return jax.block_until_ready(jax.device_put(host))  # one batched, zero-copy transfer


def _timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def count(tree: Any) -> int:
    """Number of entries of a tree of arrays."""
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


@dataclasses.dataclass
class Result:
    """One measured case."""

    requests: list[str]
    params_after: int
    err: float
    expand_times: list[float]
    copy_times: list[float]

    @property
    def expand_s(self) -> float:
        """The best expand time (noise only ever slows a run down, as `timeit` assumes)."""
        return min(self.expand_times)

    @property
    def copy_s(self) -> float:
        """The best copy time."""
        return min(self.copy_times)

    @property
    def ratio(self) -> float:
        """Best expand time over best copy time."""
        return self.expand_s / self.copy_s

    @property
    def median_ratio(self) -> float:
        """Median expand time over median copy time (shown for comparison)."""
        return float(np.median(self.expand_times) / np.median(self.copy_times))


def measure_case(
    config: Any,
    params: dict,
    state: Any,
    before: np.ndarray,
    requests: list[str],
    repeats: int,
    min_seconds: float = 0.0,
) -> Result:
    """Grows once for the error, then times expand and the copy floor, interleaved.

    Args:
      config: the model config.
      params: its parameters (JAX arrays).
      state: its Adam state.
      before: the model's logits before growth.
      requests: the growth requests.
      repeats: timed runs of each, at least (after one warm-up run).
      min_seconds: more runs (up to `MAX_REPEATS`) until the timed runs of both add up to
        this much: a median of a few runs of a millisecond operation is mostly noise.

    Returns:
      The `Result`.
    """
    key = jax.random.key(0)
    run = lambda: growth.expand(config, params, requests, rng=key, opt_state=state)
    new_config, new_params, new_state = jax.block_until_ready(run())
    err = relative_error(before, logits(new_config, new_params))
    grown = {p: (tuple(a.shape), a.dtype) for p, a in _flat((new_params, new_state)).items()}
    params_after = count(new_params)
    del new_params, new_state
    floor = lambda: copy_floor((params, state), grown)
    _timed(floor)  # warm-up (first-touch page faults, allocator)
    expand_times: list[float] = []
    copy_times: list[float] = []
    # Everything alive now stays out of the collections that `_timed` runs before each
    # run (a full collection of this process's heap takes ~0.1 s).
    gc.freeze()
    try:
        while len(copy_times) < repeats or (
            sum(expand_times) + sum(copy_times) < min_seconds and len(copy_times) < MAX_REPEATS
        ):
            copy_times.append(_timed(floor))
            expand_times.append(_timed(run))
    finally:
        gc.unfreeze()
    return Result(requests, params_after, err, expand_times, copy_times)


def _refused(config: Any) -> str:
    try:
        growth.expand(config, random_params(config), ["add_layer"], rng=jax.random.key(0))
    except growth.GrowthError as e:
        return str(e).split(":")[0]
    raise AssertionError("add_layer on a post-norm model was expected to be refused")


def measure_model(
    name: str, repeats: int, results: dict[str, Any], min_seconds: float = 0.0
) -> None:
    """Measures every case of one model, printing a row per case into the table.

    Args:
      name: a key of MODELS.
      repeats: timed runs per case, at least.
      results: the JSON results, updated in place.
      min_seconds: see `measure_case`.
    """
    config = MODELS[name]()
    params = random_params(config)
    state = jax.block_until_ready(adam_state(params))
    before = logits(config, params)
    noise = float32_noise(config, params, before)
    results[f"{name}_params"] = count(params)
    results[f"{name}_f32_noise"] = noise
    mib = 3 * count(params) * 4 / 2**20
    print(
        f"# {name}: {type(config).__name__} hidden={config.hidden} mlp={config.mlp_dim} "
        f"heads={config.num_heads}x{config.qk_dim}/{config.v_dim} layers={config.num_layers} "
        f"{config.norm_placement}-{config.norm}: {count(params) / 1e6:.2f}M params, "
        f"params+adam {mib:.0f} MiB; float32 noise floor of its logits {noise:.1e}",
        flush=True,
    )
    for case, requests in requests_for(config).items():
        if requests is None:
            print(f"{name:10} {case:9} refused: {_refused(config)}", flush=True)
            continue
        print(
            f"  [{name} {case}] growing {','.join(requests)} (logits before/after), then "
            f">={repeats}x (>= {min_seconds:g} s) expand with Adam state, interleaved with "
            "a copy into the grown shapes",
            file=sys.stderr,
            flush=True,
        )
        r = measure_case(config, params, state, before, requests, repeats, min_seconds)
        results[f"{name}_{case}_err"] = r.err
        results[f"{name}_{case}_ratio"] = round(r.ratio, 3)
        print(
            f"{name:10} {case:9} {r.params_after / 1e6:9.2f}M {r.err:9.1e} "
            f"{r.expand_s * 1e3:10.1f} {r.copy_s * 1e3:9.1f} {r.ratio:6.2f} "
            f"{r.median_ratio:7.2f} {len(r.copy_times):4d}  {','.join(requests)}",
            flush=True,
        )


def main(argv: list[str]) -> int:
    """Runs the benchmark.

    Args:
      argv: [--sizes NAME,...] [--repeats N] [--min-seconds S].

    Returns:
      the exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m evogrow.bench growth")
    parser.add_argument(
        "--sizes",
        default=",".join(DEFAULT_SIZES),
        help=f"comma-separated models from {','.join(MODELS)}",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case, at least")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help=f"more timed runs (up to {MAX_REPEATS}) until expand and copy took this long",
    )
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in MODELS]
    if unknown or args.repeats < 1:
        parser.error(f"unknown sizes {unknown}; choose from {list(MODELS)}; repeats >= 1")
    print(
        f"{'model':10} {'case':9} {'params':>10} {'rel err':>9} {'expand ms':>10} "
        f"{'copy ms':>9} {'ratio':>6} {'median':>7} {'runs':>4}  requests",
        flush=True,
    )
    results: dict[str, Any] = {}
    for name in sizes:
        measure_model(name, args.repeats, results, args.min_seconds)
    results["max_err"] = max(v for k, v in results.items() if k.endswith("_err"))
    results["max_ratio"] = max(v for k, v in results.items() if k.endswith("_ratio"))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
