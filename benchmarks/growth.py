"""Growth exactness, cost and memory: the jitted expansion against a jitted copy.

    python -m benchmarks growth [--sizes tiny,small,...] [--devices 1,8] [--repeats N]
                                   [--min-seconds S]

For decoder-only LMs (T5 style: RMSNorm, pre-norm, gated MLP, no biases), a small pre-LN
ViT and a small post-LN BERT encoder, and for each of the six transformations (mlp_dim,
num_heads, qk_dim, v_dim, hidden, add_layer, each growing its axis by about half; hidden
by zero padding for RMSNorm and by replication x2 for LayerNorm) and their composition,
with an Adam state, on 1 device and on N simulated CPU devices (a 1 x N mesh: the state
sharded over the 'model' axis by the partitioner's rules; each device count runs in a
child process, since JAX fixes it at start), it measures

- exactness (`_err`): max |logits_after - logits_before| / max |logits_before| on a small
  random batch, in float32 under `jax.default_matmul_precision("highest")` (the issue
  asks for <= 1e-5; depth growth alone must give exactly 0);
- cost (`_ratio`): the run time of the compiled expansion (plan made beforehand, inputs
  and outputs in the shardings derived from the old and the grown abstract state) over
  that of a jitted copy of the same state into the grown shapes with the same shardings
  (old values in the leading corner, zeros elsewhere), best of interleaved runs (noise
  only ever slows a run down, as `timeit` assumes); the compile time is shown apart;
- memory (`_mem_ratio`): the compiled expansion's peak per device (arguments + outputs +
  temporaries, from `memory_analysis()`) over the old plus the grown state per device.

The parameters are random (non-zero biases, gains 1 +- 0.3; see `random_params`). Each
model's header line also gives its float32 noise floor: how far its logits move when
every weight moves by a random half ulp; no float32 evaluation is more exact than that.

Prints a table as it goes (progress lines on stderr); the last line is one JSON object:
`<model>_<case>_d<N>_err`, `..._ratio`, `..._mem_ratio`, `..._compile_s`,
`<model>_params`, `<model>_f32_noise`, `max_err`, `max_ratio` and `max_mem_ratio`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

import growth
from models import decoder, encoder, vit
from training import partitioning

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
DEFAULT_SIZES = ("tiny", "small", "vit_small", "bert_small", "base")
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


def _flat(tree: Any) -> dict[tuple, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(k) for k in path): leaf for path, leaf in leaves}


def copy_program(old: Any, grown: Any) -> Callable[[Any], Any]:
    """The floor: a function copying a state into the grown shapes (zeros elsewhere).

    Args:
      old: the state before growth (arrays or abstract values).
      grown: the grown state's abstract values (its structure is the output's).

    Returns:
      ``state -> grown-shaped state``: every leaf of the same path is padded with zeros
      to its grown shape, every new leaf (a new block) is zeros.
    """
    old_paths = list(_flat(old))
    grown_leaves, treedef = jax.tree.flatten(grown)
    grown_paths = list(_flat(grown))

    def copy(state: Any) -> Any:
        source = dict(zip(old_paths, jax.tree.leaves(state), strict=True))
        out = []
        for path, spec in zip(grown_paths, grown_leaves, strict=True):
            x = source.get(path)
            if x is None or x.ndim != len(spec.shape):
                out.append(jnp.zeros(spec.shape, spec.dtype))
                continue
            corner = x[tuple(slice(0, min(o, n)) for o, n in zip(x.shape, spec.shape, strict=True))]
            widths = [(0, n - o) for o, n in zip(corner.shape, spec.shape, strict=True)]
            out.append(jnp.pad(corner, widths) if x.ndim else x)
        return jax.tree.unflatten(treedef, out)

    return copy


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes of one device's shards of a tree (abstract or concrete) in ``shardings``."""
    leaves = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    return sum(
        math.prod(sharding.shard_shape(tuple(leaf.shape))) * np.dtype(leaf.dtype).itemsize
        for leaf, sharding in leaves
    )


def peak_bytes(compiled: Any) -> int:
    """Peak memory per device of a compiled program: arguments, outputs, temporaries."""
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


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
    compile_s: float
    mem_ratio: float
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


class Setup:
    """A model's random state placed on a 1 x N mesh, and the shardings of any config.

    Args:
      name: a key of MODELS.
      devices: the number of devices of the 'model' axis (all of this process's).
    """

    def __init__(self, name: str, devices: int):
        self.config = MODELS[name]()
        self.partitioner = partitioning.Partitioner(num_partitions=devices)
        self.host_params = random_params(self.config)
        self.shardings = self.state_shardings(self.config)
        self.params = jax.device_put(self.host_params, self.shardings[0])
        self.state = jax.device_put(adam_state(self.host_params), self.shardings[1])

    def state_shardings(self, config: Any) -> tuple[Any, Any]:
        """Shardings of (params, Adam state) of `config`, from its logical axis names."""
        module, x = _module_and_input(config)
        boxed = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
        specs = self.partitioner.param_specs(boxed)
        params = nn.unbox(boxed)
        abstract_state = jax.eval_shape(adam_state, params)
        state_specs = self.partitioner.state_specs(abstract_state, specs, params)
        specs = jax.tree.map(self._divisible, specs, params, is_leaf=_is_spec)
        state_specs = jax.tree.map(self._divisible, state_specs, abstract_state, is_leaf=_is_spec)
        return self.partitioner.shardings(specs), self.partitioner.shardings(state_specs)

    def _divisible(self, spec: PartitionSpec, leaf: Any) -> PartitionSpec:
        """``spec`` with the dimensions the mesh axis does not divide replicated.

        The benchmark's sizes (e.g. 6 heads) are not all multiples of 8; a run would
        size its model for its mesh.
        """
        mesh = self.partitioner.mesh.shape
        return PartitionSpec(
            *(
                axis if axis is None or size % mesh[axis] == 0 else None
                for axis, size in zip(tuple(spec), leaf.shape, strict=False)
            )
        )


def measure_case(
    setup: Setup, before: np.ndarray, requests: list[str], repeats: int, min_seconds: float
) -> Result:
    """Compiles the expansion and the copy, checks the error, times both interleaved.

    Args:
      setup: the placed model state.
      before: the model's logits before growth.
      requests: the growth requests.
      repeats: timed runs of each, at least (after one warm-up run).
      min_seconds: more runs (up to `MAX_REPEATS`) until the timed runs of both add up to
        this much.

    Returns:
      The `Result`.
    """
    key = jax.random.key(0)
    params, state = setup.params, setup.state
    expansion = growth.plan_expansion(setup.config, params, requests, opt_state=state)
    out_shardings = setup.state_shardings(expansion.config)
    start = time.perf_counter()
    compiled = expansion.lower(params, state, rng=key, out_shardings=out_shardings).compile()
    compile_s = time.perf_counter() - start
    grown = expansion.abstract_state(params, state)
    old_bytes = per_device_bytes((params, state), setup.shardings)
    new_bytes = per_device_bytes(grown, out_shardings)
    mem_ratio = peak_bytes(compiled) / (old_bytes + new_bytes)
    key_data = np.asarray(jax.random.key_data(key))
    run = lambda: compiled(params, state, key_data)
    new_params, _ = jax.block_until_ready(run())
    err = relative_error(before, logits(expansion.config, jax.device_get(new_params)))
    params_after = count(new_params)
    del new_params
    copy = jax.jit(copy_program((params, state), grown), out_shardings=out_shardings)
    copy_compiled = copy.lower((params, state)).compile()
    floor = lambda: copy_compiled((params, state))
    _timed(floor)  # warm-up (first-touch page faults, allocator)
    expand_times: list[float] = []
    copy_times: list[float] = []
    gc.freeze()  # everything alive now stays out of the collections before each run
    try:
        while len(copy_times) < repeats or (
            sum(expand_times) + sum(copy_times) < min_seconds and len(copy_times) < MAX_REPEATS
        ):
            copy_times.append(_timed(floor))
            expand_times.append(_timed(run))
    finally:
        gc.unfreeze()
    return Result(requests, params_after, err, compile_s, mem_ratio, expand_times, copy_times)


def _refused(config: Any) -> str:
    try:
        growth.plan_expansion(config, random_params(config), ["add_layer"])
    except growth.GrowthError as e:
        return str(e).split(":")[0]
    raise AssertionError("add_layer on a post-norm model was expected to be refused")


def measure_model(
    name: str,
    devices: int,
    repeats: int,
    results: dict[str, Any],
    min_seconds: float = 0.0,
    cases: tuple[str, ...] = CASES,
) -> None:
    """Measures every case of one model on this process's devices, a row per case.

    Args:
      name: a key of MODELS.
      devices: this process's device count (the 'model' axis).
      repeats: timed runs per case, at least.
      results: the JSON results, updated in place.
      min_seconds: see `measure_case`.
      cases: which of CASES to measure.
    """
    setup = Setup(name, devices)
    config = setup.config
    before = logits(config, setup.host_params)
    noise = float32_noise(config, setup.host_params, before)
    results[f"{name}_params"] = count(setup.host_params)
    results[f"{name}_f32_noise"] = noise
    mib = 3 * count(setup.host_params) * 4 / 2**20
    print(
        f"# {name} on {devices} device(s): {type(config).__name__} hidden={config.hidden} "
        f"mlp={config.mlp_dim} heads={config.num_heads}x{config.qk_dim}/{config.v_dim} "
        f"layers={config.num_layers} {config.norm_placement}-{config.norm}: "
        f"{count(setup.host_params) / 1e6:.2f}M params, params+adam {mib:.0f} MiB; "
        f"float32 noise floor of its logits {noise:.1e}",
        flush=True,
    )
    for case, requests in requests_for(config).items():
        if case not in cases:
            continue
        if requests is None:
            print(f"{name:10} {case:9} {devices:3d} refused: {_refused(config)}", flush=True)
            continue
        print(
            f"  [{name} {case} d{devices}] compiling and growing {','.join(requests)}, then "
            f">={repeats}x (>= {min_seconds:g} s) expand interleaved with the copy",
            file=sys.stderr,
            flush=True,
        )
        r = measure_case(setup, before, requests, repeats, min_seconds)
        prefix = f"{name}_{case}_d{devices}"
        results[f"{prefix}_err"] = r.err
        results[f"{prefix}_ratio"] = round(r.ratio, 3)
        results[f"{prefix}_mem_ratio"] = round(r.mem_ratio, 3)
        results[f"{prefix}_compile_s"] = round(r.compile_s, 2)
        print(
            f"{name:10} {case:9} {devices:3d} {r.params_after / 1e6:8.2f}M {r.err:9.1e} "
            f"{r.expand_s * 1e3:10.2f} {r.copy_s * 1e3:9.2f} {r.ratio:6.2f} "
            f"{r.mem_ratio:6.3f} {r.compile_s:8.1f} {len(r.copy_times):4d}  {','.join(requests)}",
            flush=True,
        )


HEADER = (
    f"{'model':10} {'case':9} {'dev':>3} {'params':>9} {'rel err':>9} {'expand ms':>10} "
    f"{'copy ms':>9} {'ratio':>6} {'mem':>6} {'compile':>8} {'runs':>4}  requests"
)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _run_child(devices: int, argv: list[str]) -> dict[str, Any]:
    """Runs the measurements on `devices` simulated CPU devices in a child process."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "benchmarks.growth", *argv, "--devices", str(devices)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    for line in lines[:-1]:
        if not line.startswith(HEADER[:10]):
            print(line, flush=True)
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the {devices}-device run failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def main(argv: list[str]) -> int:
    """Runs the benchmark.

    Args:
      argv: [--sizes NAME,...] [--devices N,...] [--repeats N] [--min-seconds S].

    Returns:
      the exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks growth")
    parser.add_argument(
        "--sizes",
        default=",".join(DEFAULT_SIZES),
        help=f"comma-separated models from {','.join(MODELS)}",
    )
    parser.add_argument(
        "--devices",
        default="1,8",
        help="comma-separated device counts (simulated CPU devices, state sharded over them)",
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated cases from {','.join(CASES)}"
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
    cases = tuple(c for c in args.cases.split(",") if c)
    unknown = [s for s in sizes if s not in MODELS] + [c for c in cases if c not in CASES]
    try:
        devices = [int(d) for d in args.devices.split(",") if d]
    except ValueError:
        devices = []
    if unknown or args.repeats < 1 or not devices or min(devices) < 1:
        parser.error(
            f"unknown sizes or cases {unknown}; choose from {list(MODELS)} and "
            f"{list(CASES)}; repeats >= 1; "
            "devices: positive integers"
        )
    results: dict[str, Any] = {}
    print(HEADER, flush=True)
    if len(devices) == 1 and jax.device_count() == devices[0]:
        for name in sizes:
            measure_model(name, devices[0], args.repeats, results, args.min_seconds, cases)
    else:
        child_args = ["--sizes", args.sizes, "--cases", args.cases]
        child_args += ["--repeats", str(args.repeats)]
        child_args += ["--min-seconds", str(args.min_seconds)]
        for count_ in devices:
            results.update(_run_child(count_, child_args))
    results = {k: v for k, v in results.items() if not k.startswith("max_")}
    for kind in ("err", "mem_ratio"):
        results[f"max_{kind}"] = max(v for k, v in results.items() if k.endswith(f"_{kind}"))
    results["max_ratio"] = max(
        v for k, v in results.items() if k.endswith("_ratio") and not k.endswith("_mem_ratio")
    )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
