"""Test-session set-up: a persistent XLA compilation cache private to this pytest run.

Many tests compile the same programs (the same tiny models, resumed and regrown runs);
JAX's compilation cache serves repeats from a temporary directory that is created for
the session and deleted after it, so no compiled code outlives the run. Every test
starts and ends on an empty gin configuration, as a fresh launcher process would.
"""

import shutil
import tempfile

import gin
import jax
import pytest

_CACHE_DIR = tempfile.mkdtemp(prefix="evogrow-test-xla-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_SLOW_KINDS = ("ray", "postgres", "multiprocess")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    """Marks every Ray, PostgreSQL and multi-process test slow as well."""
    for item in items:
        if any(item.get_closest_marker(kind) for kind in _SLOW_KINDS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _remove_compilation_cache():
    """Deletes the session's compilation cache when the tests end."""
    yield
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_gin():
    """Clears gin's global configuration around every test."""
    gin.clear_config()
    yield
    gin.clear_config()
