import os
import sys

import jax
import pytest

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
