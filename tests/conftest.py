import atexit
import os
import shutil
import sys
import tempfile

# One XLA compilation cache for the whole test run: the xdist workers and the subprocesses tests
# start inherit it, so a program that several tests compile (same HLO, same options) is compiled
# once and loaded after that. It changes no compiled code, only whether it is compiled again.
# The process that creates it (pytest's main process) removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="jattn-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache_dir, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # small test programs too
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402  (after the cache settings, which jax reads at import)
import pytest  # noqa: E402

# Tests import the NumPy reference as a plain module.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend to be on an NVIDIA GPU; jax.nn's cuDNN call runs its XLA path instead and
    records that it was asked for cuDNN (returns the list of requested implementations)."""
    from jattn import dispatch

    monkeypatch.setattr(dispatch, "on_nvidia_gpu", lambda: True)
    real = jax.nn.dot_product_attention
    calls = []

    def fake(*args, implementation, **kwargs):
        calls.append(implementation)
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    return calls
