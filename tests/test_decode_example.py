"""examples/continuous_batching.py: continuous batching over a paged cache gives the same
tokens as generating each request alone with the module's fixed-size cache."""

import importlib.util
import os

import numpy as np
from flax import nnx

_PATH = os.path.join(os.path.dirname(__file__), "..", "examples", "continuous_batching.py")


def _example():
    spec = importlib.util.spec_from_file_location("continuous_batching", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_continuous_batching_equals_one_at_a_time():
    ex = _example()
    model = ex.TinyLM(layers=1, rngs=nnx.Rngs(1))
    requests = ex.demo_requests(seed=3, count=4)
    batched, steps, log = ex.serve(model, requests, slots=2, num_pages=12, max_pages=4)
    capacity = max(len(prompt) + n for prompt, n in requests)  # one cache size: shared compiles
    alone = [ex.generate_alone(model, prompt, n, capacity) for prompt, n in requests]
    assert batched == alone
    assert [len(t) for t in batched] == [n for _, n in requests]
    # Slots were shared: fewer engine steps than tokens, and requests joined mid-flight.
    assert steps < sum(n for _, n in requests)
    assert any(entry["T"] > 1 and entry["active"] > 1 for entry in log)
    assert len(set(map(tuple, batched))) > 1 or len(requests) == 1
    assert np.all(np.array([e["active"] for e in log]) <= 2)
