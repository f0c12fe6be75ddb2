"""Bad input raises ValueError/TypeError naming the argument, eagerly and under jit."""

import jax
import jax.numpy as jnp
import pytest

import jattn

B, T, S, N, K, H = 2, 5, 7, 4, 2, 3


def _ok():
    q = jnp.ones((B, T, N, H), jnp.float32)
    k = jnp.ones((B, S, K, H), jnp.float32)
    v = jnp.ones((B, S, K, H), jnp.float32)
    return q, k, v


def _case(**changes):
    q, k, v = _ok()
    args = dict(query=q, key=k, value=v)
    args.update(changes)
    return args


CASES = [
    ("rank", _case(query=jnp.ones((T, H))), ValueError, ["query", "[*B, T, N, H]", "(5, 3)"]),
    ("head dim", _case(key=jnp.ones((B, S, K, H + 1))), ValueError, ["key", "(2, 7, 2, 4)"]),
    ("batch", _case(key=jnp.ones((B + 1, S, K, H)), value=jnp.ones((B + 1, S, K, H))), ValueError, ["key", "(3, 7, 2, 3)"]),
    ("kv length", _case(value=jnp.ones((B, S + 1, K, H))), ValueError, ["value", "(2, 8, 2, 3)"]),
    ("heads multiple", _case(key=jnp.ones((B, S, 3, H)), value=jnp.ones((B, S, 3, H))), ValueError, ["N=4", "K=3"]),
    ("int query", _case(query=jnp.ones((B, T, N, H), jnp.int32)), TypeError, ["query", "int32"]),
    ("mixed dtypes", _case(value=jnp.ones((B, S, K, H), jnp.bfloat16)), TypeError, ["value", "bfloat16"]),
    ("mask dtype", _case(mask=jnp.ones((B, 1, T, S), jnp.float32)), TypeError, ["mask", "bool", "float32"]),
    ("mask shape", _case(mask=jnp.ones((B, 1, T, S + 1), bool)), ValueError, ["mask", "(2, 4, 5, 7)", "(2, 1, 5, 8)"]),
    ("bias shape", _case(bias=jnp.ones((3, N, T, S))), ValueError, ["bias", "(3, 4, 5, 7)"]),
    ("bias dtype", _case(bias=jnp.ones((T, S), jnp.int32)), TypeError, ["bias", "int32"]),
    ("lengths shape", _case(key_value_seq_lengths=jnp.ones((B, 1), jnp.int32)), ValueError, ["key_value_seq_lengths", "(2,)", "(2, 1)"]),
    ("lengths dtype", _case(query_seq_lengths=jnp.ones((B,), jnp.float32)), TypeError, ["query_seq_lengths", "float32"]),
    ("negative window", _case(local_window_size=(-1, 2)), ValueError, ["local_window_size", "(-1, 2)"]),
    ("window type", _case(local_window_size="wide"), TypeError, ["local_window_size", "wide"]),
    ("implementation", _case(implementation="magic"), ValueError, ["implementation", "magic"]),
    ("alignment", _case(causal_alignment="middle"), ValueError, ["causal_alignment", "middle"]),
    ("one segment", _case(q_segment_ids=jnp.zeros((B, T), jnp.int32)), ValueError, ["kv_segment_ids", "both"]),
    ("segment shape", _case(q_segment_ids=jnp.zeros((B, S), jnp.int32), kv_segment_ids=jnp.zeros((B, S), jnp.int32)),
     ValueError, ["q_segment_ids", "(2, 5)", "(2, 7)"]),
    ("dropout rate", _case(dropout_rate=1.0, dropout_rng=jax.random.key(0)), ValueError, ["dropout_rate", "1.0"]),
    ("soft cap", _case(logits_soft_cap=0.0), ValueError, ["logits_soft_cap", "0.0"]),
    ("scale", _case(scale=float("nan")), ValueError, ["scale", "finite"]),
    ("block sizes", _case(block_sizes=(0, 4)), ValueError, ["block_sizes", "(0, 4)"]),
    ("not an array", _case(key="keys"), TypeError, ["key"]),
]


@pytest.mark.parametrize("name, args, exc, words", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_bad_input_is_named(name, args, exc, words, jitted):
    arrays = {k: v for k, v in args.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in args.items() if not isinstance(v, jax.Array)}

    def call(arrays):
        return jattn.dot_product_attention(**arrays, **static)

    with pytest.raises(exc) as info:
        (jax.jit(call) if jitted else call)(arrays)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(q=jnp.ones((3, 4, 1)), k=jnp.ones((5, 4)), v=jnp.ones((5, 2))), ValueError, ["q", "[T, d_k]"]),
        (dict(q=jnp.ones((3, 4)), k=jnp.ones((5, 3)), v=jnp.ones((5, 2))), ValueError, ["k", "head dim 4"]),
        (dict(q=jnp.ones((3, 4)), k=jnp.ones((5, 4)), v=jnp.ones((6, 2))), ValueError, ["v", "length 5"]),
        (dict(q=jnp.ones((3, 4)), k=jnp.ones((5, 4)), v=jnp.ones((5, 2)), mask=jnp.ones((3, 4), bool)), ValueError, ["mask", "(3, 5)"]),
        (dict(q=jnp.ones((3, 4), jnp.int32), k=jnp.ones((5, 4)), v=jnp.ones((5, 2))), TypeError, ["q", "int32"]),
    ],
)
def test_single_head_bad_input(kwargs, exc, words):
    with pytest.raises(exc) as info:
        jattn.attention(**kwargs)
    for word in words:
        assert word in str(info.value)
