"""Context-parallel decoding (jattn.parallel.context_parallel): a KV cache sharded along its sequence over
8 simulated CPU devices equals single-device attention (subprocess, tests/ring_checks.py), only
small all-reduces travel, and bad input is named."""

import jax
import numpy as np
import pytest

import jattn
from jattn.parallel.context_parallel import context_parallel_decode
from test_ring import _run_group


def test_sharded_cache_matches_one_device_and_sends_only_partials():
    r = _run_group("decode")
    for case in ("one_token_explicit", "three_tokens_auto_softcap", "grid_two_by_four"):
        err, shape = r[case]
        assert err < 1e-5, (case, err)
        assert shape[:3] == [2, {"one": 1, "thr": 3, "gri": 2}[case[:3]], 6], (case, shape)
    hlo = r["hlo"]
    assert hlo["all-reduce"] >= 1 and hlo["all-gather"] == hlo["collective-permute"] == hlo["all-to-all"] == 0, hlo


def _mesh():
    return jax.make_mesh((1,), ("s",), devices=jax.devices()[:1])


def test_one_device_and_nan_propagation():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 4, 8), np.float32)
    k, v = (rng.standard_normal((1, 16, 2, 8), np.float32) for _ in range(2))
    lengths = np.asarray([11], np.int32)
    out = context_parallel_decode(q, k, v, mesh=_mesh(), axis_name="s", key_value_seq_lengths=lengths)
    np.testing.assert_allclose(out, jattn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths), atol=1e-6)
    k[0, 3, 0, 0] = np.nan  # a visible NaN key poisons the query heads that use it
    out = np.asarray(context_parallel_decode(q, k, v, mesh=_mesh(), axis_name="s"))
    assert np.isnan(out[0, :, :2]).all() and not np.isnan(out[0, :, 2:]).any()


@pytest.mark.parametrize(
    "kwargs, kind, text",
    [
        (dict(mesh="m"), TypeError, "mesh: expected a jax.sharding.Mesh"),
        (dict(axis_name="t"), ValueError, "axis_name: expected one of the mesh axes ('s',), got 't'"),
        (dict(query=np.ones((1, 4, 8), np.float32)), ValueError, "query: expected rank 4 ([B, Tq, N, H])"),
        (dict(key_value_seq_lengths=np.ones((2,), np.int32)), ValueError, "key_value_seq_lengths: expected shape (1,)"),
        (dict(key_value_seq_lengths=np.ones((1,), np.float32)), TypeError, "key_value_seq_lengths: expected an integer"),
    ],
)
def test_bad_input(kwargs, kind, text):
    x = np.ones((1, 1, 2, 8), np.float32)
    args = dict(query=x, key_cache=np.ones((1, 4, 2, 8), np.float32), value_cache=np.ones((1, 4, 2, 8), np.float32),
                mesh=_mesh(), axis_name="s")
    args.update(kwargs)
    with pytest.raises(kind) as e:
        context_parallel_decode(**args)
    assert text in str(e.value)
