"""One validator for every entry point: each public attention function checks its arrays with
``jattn.core.spec.check_arrays`` and so reports the same bad input in the same words, before
anything is compiled."""

import jax
import numpy as np
import pytest

import jattn
from jattn.core import spec
from jattn.kernels import paged
from jattn.parallel.context_parallel import context_parallel_decode

Q = np.ones((1, 4, 2, 8), np.float32)  # [B, T, N, H]
KV = np.ones((1, 4, 2, 8), np.float32)  # [B, S, K, H]
HALF = KV.astype(np.float16)


def _mesh():
    return jax.make_mesh((1,), ("s",), devices=jax.devices()[:1])


def _in_shard_map(fn):
    """``fn`` (ring/Ulysses, which take local shards) called inside a one-device shard_map."""
    def call(q, k, v):
        P = jax.sharding.PartitionSpec
        return jax.shard_map(lambda q, k, v: fn(q, k, v, axis_name="s"), mesh=_mesh(),
                             in_specs=(P(),) * 3, out_specs=P())(q, k, v)
    return call


def _paged(q, k, v):
    cache = paged.init(4, 2, 2, 8, batch_size=1, max_pages_per_sequence=2, dtype=v.dtype)
    return paged.paged_decode_attention(q, cache)


ENTRY_POINTS = {  # name -> (call with query, key, value; what it calls key and value)
    "dot_product_attention": (jattn.dot_product_attention, "key", "value"),
    "dot_product_attention chunked": (
        lambda q, k, v: jattn.dot_product_attention(q, k, v, implementation="chunked"), "key", "value"),
    "flex_attention": (jattn.flex_attention, "key", "value"),
    "decode_attention": (lambda q, k, v: jattn.decode_attention(q, k, v, lengths=np.array([4])),
                         "key_cache", "value_cache"),
    "paged_decode_attention": (_paged, "cache.key_pages", "cache.value_pages"),
    "context_parallel_decode": (lambda q, k, v: context_parallel_decode(q, k, v, mesh=_mesh(), axis_name="s"),
                                "key_cache", "value_cache"),
    "sequence_parallel_attention": (
        lambda q, k, v: jattn.sequence_parallel_attention(q, k, v, mesh=_mesh(), axis_name="s"), "key", "value"),
    "ring_attention": (_in_shard_map(jattn.ring_attention), "key", "value"),
    "ulysses_attention": (_in_shard_map(jattn.ulysses_attention), "key", "value"),
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_uses_the_one_validator(name, monkeypatch):
    fn, key_name, value_name = ENTRY_POINTS[name]
    calls = []
    check = spec.check_arrays
    monkeypatch.setattr(spec, "check_arrays", lambda *a, **kw: calls.append(kw.get("names")) or check(*a, **kw))
    with pytest.raises(TypeError) as e:
        fn(Q, KV, HALF)  # value in another dtype
    assert calls, f"{name} did not call spec.check_arrays"
    key_dtype = "float16" if name == "paged_decode_attention" else "float32"  # the pages have one dtype
    assert str(e.value) == (f"query, {key_name}, {value_name}: expected one dtype, got "
                            f"{{'query': 'float32', '{key_name}': '{key_dtype}', '{value_name}': 'float16'}}")
    calls.clear()
    with pytest.raises(ValueError, match="multiple of the kv heads"):
        three = np.ones((1, 4, 3, 8), np.float32)
        if name == "paged_decode_attention":
            fn(np.ones((1, 4, 3, 8), np.float32), KV, KV)  # the cache has K=2: 3 query heads instead
        else:
            fn(Q, three, three)
    assert calls


@pytest.mark.parametrize("fn", [jattn.ring_attention, jattn.ulysses_attention], ids=["ring", "ulysses"])
def test_ring_and_ulysses_share_the_local_checks(fn):
    P = jax.sharding.PartitionSpec
    odd = np.ones((1, 3, 2, 8), np.float32)  # 3 local rows: no zig-zag split

    def run(axis, layout, x):
        return jax.shard_map(lambda q: fn(q, q, q, axis_name=axis, layout=layout), mesh=_mesh(),
                             in_specs=P(), out_specs=P())(x)

    with pytest.raises(ValueError, match="axis_name: expected a mesh axis of the enclosing shard_map, got 'seq'"):
        run("seq", "contiguous", Q)
    with pytest.raises(ValueError, match=r"query: the zig-zag layout needs an even number of rows per device "
                                         r"\(sequence length divisible by 2 x 1\), got 3 local rows"):
        run("s", "zigzag", odd)
    with pytest.raises(ValueError, match="layout: expected one of"):
        run("s", "striped", Q)
