"""Growth requests, the exactness rules as data, and refused requests."""

import dataclasses

import jax
import numpy as np
import pytest

import growth
from growth import rules
from growth.requests import Request, parse_request, parse_requests


@dataclasses.dataclass(frozen=True)
class _Config:
    hidden: int = 8
    mlp_dim: int = 12
    num_heads: int = 2
    qk_dim: int = 4
    v_dim: int = 4
    num_layers: int = 1
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    norm_placement: str = "pre"
    attention_scaling: str = "runtime"


def _params(cfg: _Config) -> dict:
    h, e, k, v, p = cfg.hidden, cfg.num_heads, cfg.qk_dim, cfg.v_dim, cfg.mlp_dim
    norm = {"scale": np.ones(h, np.float32)}
    if cfg.norm == "layernorm":
        norm["bias"] = np.zeros(h, np.float32)
    block = {
        "norm_attn": dict(norm),
        "norm_mlp": dict(norm),
        "attn": {
            "query": {"kernel": np.ones((h, e, k), np.float32)},
            "key": {"kernel": np.ones((h, e, k), np.float32)},
            "value": {"kernel": np.ones((h, e, v), np.float32)},
            "out": {"kernel": np.ones((e, v, h), np.float32)},
        },
        "mlp": {
            "wi": {"kernel": np.ones((h, p), np.float32)},
            "wo": {"kernel": np.ones((p, h), np.float32)},
        },
    }
    return {"embed": {"embedding": np.ones((5, h), np.float32)}, "block_0": block}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("mlp_dim=512", Request("mlp_dim", size=512)),
        (" num_heads = 8 ", Request("num_heads", size=8)),
        ("qk_dim=64", Request("qk_dim", size=64)),
        ("v_dim=64", Request("v_dim", size=64)),
        ("hidden=256", Request("hidden", size=256)),
        ("hidden=256:replicate", Request("hidden", size=256, method="replicate")),
        ("hidden=256:pad", Request("hidden", size=256, method="pad")),
        ("add_layer@2", Request("add_layer", position=2)),
        ("add_layer", Request("add_layer")),
    ],
)
def test_parse_round_trip(text, expected):
    assert parse_request(text) == expected
    assert parse_request(str(expected)) == expected


def test_parse_list_and_comma_string():
    assert parse_requests("mlp_dim=16, add_layer@0") == [
        Request("mlp_dim", size=16),
        Request("add_layer", position=0),
    ]
    assert parse_requests([Request("v_dim", size=3), "qk_dim=5"])[1] == Request("qk_dim", size=5)


@pytest.mark.parametrize(
    "text, match",
    [
        ("mlp=512", "Cannot parse"),
        ("mlp_dim=", "Cannot parse"),
        ("mlp_dim=1.5", "Cannot parse"),
        ("mlp_dim=0", "positive integer"),
        ("num_heads=-2", "positive integer"),
        ("add_layer@-1", "position must be >= 0"),
        ("mlp_dim=8:replicate", "only for hidden"),
        ("hidden=8:stretch", "must be 'pad' or 'replicate'"),
        ("depth=3", "Cannot parse"),
    ],
)
def test_malformed_requests_are_refused(text, match):
    with pytest.raises(growth.GrowthError, match=match):
        parse_request(text)


@pytest.mark.parametrize(
    "request_text, config, match",
    [
        ("mlp_dim=6", _Config(), "shrink mlp_dim from 12 to 6"),
        ("num_heads=1", _Config(), "shrink num_heads"),
        ("qk_dim=2", _Config(), "shrink qk_dim"),
        ("v_dim=2", _Config(), "shrink v_dim"),
        ("hidden=4", _Config(), "shrink hidden"),
        ("hidden=12", _Config(norm="layernorm"), "integer factor"),
        ("hidden=12:replicate", _Config(), "integer factor"),
        ("hidden=16:pad", _Config(norm="layernorm"), "LayerNorm subtracts the mean"),
        ("add_layer@0", _Config(norm_placement="post"), "post-norm block"),
        ("add_layer", _Config(norm="layernorm", norm_placement="post"), "not an identity"),
        ("add_layer@2", _Config(), r"position must be in 0\.\.1"),
        ("mlp_dim=16", _Config(norm="batchnorm"), "growth knows only"),
    ],
)
def test_refused_requests_say_why(request_text, config, match):
    with pytest.raises(growth.GrowthError, match=match):
        growth.expand(config, _params(config), [request_text], rng=jax.random.key(0))


def test_params_that_disagree_with_config_are_refused():
    with pytest.raises(growth.GrowthError, match="not mlp_dim=10"):
        growth.expand(
            _Config(mlp_dim=10), _params(_Config()), ["mlp_dim=16"], rng=jax.random.key(0)
        )


def test_unknown_parameter_is_refused_by_hidden_growth():
    params = _params(_Config())
    params["mystery"] = {"kernel": np.ones((8, 3), np.float32)}
    with pytest.raises(growth.GrowthError, match="does not know parameter mystery/kernel"):
        growth.expand(_Config(), params, ["hidden=16"], rng=jax.random.key(0))


def test_every_norm_transformation_pair_has_a_verdict():
    table = growth.exactness_table()
    seen = {(t, n, p) for t, n, p, _, _ in table}
    for transformation in rules.TRANSFORMATIONS:
        for norm in rules.NORMS:
            for placement in rules.PLACEMENTS:
                assert (transformation, norm, placement) in seen
    verdicts = {(t, n, p, m): v for t, n, p, m, v in table}
    assert verdicts[("hidden", "rmsnorm", "pre", "pad")] == "exact"
    assert verdicts[("hidden", "layernorm", "post", "replicate")] == "exact"
    assert "LayerNorm" in verdicts[("hidden", "layernorm", "pre", "pad")]
    assert "post-norm" in verdicts[("add_layer", "layernorm", "post", "identity_block")]


def test_qk_rescale_only_with_runtime_scaling():
    assert rules.QK_RESCALE == {"runtime": True, "folded": False}
