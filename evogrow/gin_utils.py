"""Gin for the launcher only: flag rewriting, parsing with clear errors, config summaries.

Library modules never import gin; this module is imported by `evogrow.main` (and by gin
files, for `summarize_gin_config`), mirroring t5x's gin_utils.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import tokenize
from collections.abc import Iterable, Sequence

import gin
import jax
from clu import metric_writers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GIN_SEARCH_PATHS = (REPO_ROOT,)


class GinConfigError(ValueError):
    """A gin file or binding could not be parsed or does not fit the configurables."""


# What gin raises for unparsable text, unknown names, failed imports and missing files.
_GIN_ERRORS = (OSError, ValueError, SyntaxError, NameError, ImportError, tokenize.TokenError)


def rewrite_gin_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits `--gin.NAME=VALUE` flags off the other arguments.

    Args:
      args: command-line arguments.

    Returns:
      (other arguments, gin bindings as "NAME = VALUE").

    Raises:
      GinConfigError: a `--gin.` flag without `=VALUE` or without a name.
    """
    rest, bindings = [], []
    for arg in args:
        if not arg.startswith("--gin."):
            rest.append(arg)
            continue
        name, sep, value = arg[len("--gin.") :].partition("=")
        if not sep or not name.strip():
            raise GinConfigError(
                f"malformed gin binding {arg!r}: expected --gin.NAME=VALUE, "
                "e.g. --gin.TRAIN_STEPS=100 or --gin.MODEL_DIR=\"'/tmp/run'\""
            )
        bindings.append(f"{name} = {value}")
    return rest, bindings


class _QuietPathNotFound(logging.Filter):
    """Drops gin's "Path not found" errors, logged for each search path that lacks a file.

    gin tries every search path in turn; a file found under a later path is no error,
    and a file found under none fails the parse with a `GinConfigError` naming it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")


@contextlib.contextmanager
def _quiet_search_misses():
    quiet = _QuietPathNotFound()
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def parse_gin(
    gin_search_paths: Sequence[str],
    gin_files: Sequence[str],
    gin_bindings: Sequence[str],
) -> None:
    """Parses gin files, then each binding, then finalizes (checks REQUIRED macros).

    Args:
      gin_search_paths: folders that `include` and `--gin_file` paths are relative to.
      gin_files: files in order (later ones override earlier ones).
      gin_bindings: "NAME = VALUE" bindings applied after the files.

    Raises:
      GinConfigError: naming the file or binding that failed and gin's reason.
    """
    for path in gin_search_paths:
        gin.add_config_file_search_path(path)
    for gin_file in gin_files:
        try:
            with _quiet_search_misses():
                gin.parse_config_file(gin_file)
        except _GIN_ERRORS as error:
            raise GinConfigError(f"gin file {gin_file!r}: {error}") from error
    for binding in gin_bindings:
        try:
            gin.parse_config(binding)
        except _GIN_ERRORS as error:
            raise GinConfigError(f"malformed gin binding {binding!r}: {error}") from error
    check_macro_bindings(gin_bindings)
    try:
        gin.finalize()
    except ValueError as error:
        raise GinConfigError(f"incomplete gin configuration: {error}") from error


def _macro_name(binding: str) -> str | None:
    """The macro a "NAME = VALUE" binding sets (a name without '.' or '/'), else None."""
    name = binding.partition("=")[0].strip()
    return name if name.isidentifier() else None


def _macros_of_parsed_config() -> tuple[set[str], set[str]]:
    """(macros defined, macros referenced with %NAME) in gin's parsed configuration."""
    # gin keeps its bindings in `gin.config._CONFIG` (scoped configurable -> arguments);
    # a macro NAME is the configurable `gin.macro` in scope NAME, and `%NAME` is a
    # reference to it. gin has no public query for who references a macro.
    config = gin.config._CONFIG  # noqa: SLF001
    defined = {scope for scope, selector in config if selector == "gin.macro"}
    referenced = {
        "/".join(ref.scopes)
        for ref in gin.config.iterate_references(config)
        if ref.configurable.selector == "gin.macro"
    }
    return defined, referenced


def check_macro_bindings(gin_bindings: Iterable[str]) -> None:
    """Refuses a binding of a macro that no gin file or binding references.

    gin accepts `NAME = VALUE` for any NAME and defines a new macro; a misspelled
    `--gin.TRAIN_STPES=20` would be ignored and the run would go on with the file's
    value. Call after the files and bindings are parsed.

    Args:
      gin_bindings: the "NAME = VALUE" bindings of the command line.

    Raises:
      GinConfigError: naming the unreferenced macro and the close names that are.
    """
    defined, referenced = _macros_of_parsed_config()
    for binding in gin_bindings:
        name = _macro_name(binding)
        if name is None or name in referenced:
            continue
        known = sorted((referenced | defined) - {name})
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "check its spelling"
        raise GinConfigError(
            f"gin binding {binding.strip()!r} sets the macro {name}, which no gin file or "
            f"binding uses (it would be ignored); {hint}"
        )


def error_message(error: BaseException) -> str:
    """`str(error)` without the "In call to configurable ..." lines gin appends.

    gin re-raises an exception from a configurable with its call context added to the
    message; a user error (bad setting) is reported in one line without it.

    Args:
      error: an exception, possibly re-raised by gin.

    Returns:
      the message of the original exception.
    """
    return str(error).split("\n  In call to configurable", 1)[0]


def summarize_gin_config(
    model_dir: str, summary_writer: metric_writers.MetricWriter | None, step: int
) -> None:
    """Writes the operative gin config to `model_dir/config.gin` and a text summary.

    Args:
      model_dir: the run's directory.
      summary_writer: where to add the config as text (None: file only).
      step: the step the summary is recorded at.
    """
    if jax.process_index() != 0:
        return
    config = gin.config_str()
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.gin"), "w") as f:
        f.write(config)
    if summary_writer is not None:
        summary_writer.write_texts(step, {"config": gin.markdown(config)})
        summary_writer.flush()
