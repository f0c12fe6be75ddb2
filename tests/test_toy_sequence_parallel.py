"""Toy trainer with sequence parallelism (config.mesh.sequence): the padded zig-zag batch,
config checks, ``sequence_parallel_attention_fn``'s errors, and a training run on a
2 (data) x 4 (sequence) mesh of 8 simulated CPU devices that equals the 1-device run
(subprocess: tests/toy_sequence_parallel_checks.py)."""

import json
import os
import pathlib
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

import jattn
import jattn.nnx
from jattn.toy import data, train, validation

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name: str):
    return runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"]()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "toy_sequence_parallel_checks.py"), str(ROOT / "configs" / "tiny.py"),
         str(tmp_path_factory.mktemp("sp"))],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,  # it took over 300 s on a shared 2-core machine
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sequence_parallel_training_equals_one_device(report):
    sp, one = report["sequence"], report["single"]
    assert report["device_count"] == 8
    assert sp["mesh"] == {"data": 2, "sequence": 4} and one["mesh"] == {"data": 1, "sequence": 1}
    # tiny: T = 2*4+1 = 9 padded to 16 (2 x 4 zig-zag chunks); each device holds [8/2, 16/4].
    assert sp["batch_shape"] == [8, 16] and sp["shard_shapes"] == [[4, 4]] and sp["batch_devices"] == 8
    assert one["batch_shape"] == [8, 9] and one["shard_shapes"] == [[8, 9]]
    for got, want in zip(sp["metrics"], one["metrics"]):
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert sp["params"].keys() == one["params"].keys()
    for name in one["params"]:
        np.testing.assert_allclose(sp["params"][name], one["params"][name], rtol=1e-5, atol=1e-6, err_msg=name)
    # the attention really ran as a ring: key/value blocks hop with collective-permute
    assert sp["collective_permutes"] > 0 and one["collective_permutes"] == 0


def test_sequence_parallel_module_equals_default(report):
    assert report["module_max_err"] < 1e-5


def test_mesh_errors(report):
    assert report["mesh_errors"] == [
        "config.mesh.sequence: expected a divisor of the 8 local devices when mesh.data=-1, got 3",
        "config.mesh.sequence: expected at most 8 (local devices), got 16",
        "config.mesh.data: expected -1 or at most 2 (local devices) with mesh.sequence=4, got 4",
        "config.batch_size: expected a multiple of the data axis size 4, got 6",
    ]


def test_trainer_runs_end_to_end_on_the_mesh(report):
    summary = report["run"]
    assert summary["num_devices"] == 8 and summary["num_train_steps"] == 2
    assert np.isfinite(summary["final_loss"]) and 0 <= summary["seq_accuracy"] <= 1


def test_sequence_layout_pads_and_permutes():
    batch = data.train_batch(0, 0, batch_size=3, seq_len=4, vocab_size=8, task="copy")  # T = 9
    out = train.to_sequence_layout(batch, 2)  # padded to 12 = 3 x (2 x 2 chunks of 3)
    order = np.array([0, 1, 2, 9, 10, 11, 3, 4, 5, 6, 7, 8])  # device 0: chunks 0, 3; device 1: 1, 2
    for got, x in zip(out, batch):
        padded = np.concatenate([np.asarray(x), np.zeros((3, 3), np.asarray(x).dtype)], axis=1)  # [B, 12]
        np.testing.assert_array_equal(got, padded[:, order])
    tokens = np.asarray(out.inputs)
    assert (tokens[:, order >= 9] == data.PAD).all() and (np.asarray(out.weights)[:, order >= 9] == 0).all()
    np.testing.assert_array_equal(train._positions(out.inputs, 2), np.broadcast_to(order, (3, 12)))
    assert train.to_sequence_layout(batch, 1) is batch  # no sequence axis: unchanged


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"sequence": 0}, "config.mesh.sequence: expected a positive int, got 0"),
        ({"sequence": 2.0}, "config.mesh.sequence: expected a positive int, got 2.0"),
        ({"sequence": 2, "attention_implementation": "xla"},
         "config.attention_implementation: expected None with mesh.sequence > 1 (ring attention computes "
         "its own tiles), got 'xla'"),
    ],
)
def test_bad_sequence_config(changes, expected):
    fields = load("copy").to_dict()
    if "attention_implementation" in changes:
        fields["attention_implementation"] = changes["attention_implementation"]
    fields["mesh"]["sequence"] = changes["sequence"]
    with pytest.raises(ValueError, match="invalid config") as e:
        validation.validate(ml_collections.ConfigDict(fields))
    assert expected in str(e.value)


def one_device_fn(**kw):
    mesh = jax.make_mesh((1, 1), ("data", "sequence"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:1])
    return jattn.sequence_parallel_attention_fn(mesh=mesh, **{"axis_name": "sequence", **kw})


def test_attention_fn_on_one_device_equals_default():
    kw = dict(num_heads=2, in_features=6, qkv_features=8)
    x = jax.random.normal(jax.random.key(0), (3, 7, 6))  # [B, T, F], odd T (contiguous, P=1)
    plain = jattn.nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
    ring = jattn.nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0), attention_fn=one_device_fn())
    for causal in (True, False):
        np.testing.assert_allclose(ring(x, is_causal=causal), plain(x, is_causal=causal), atol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(mask=jnp.ones((5, 5), bool)), "mask: not supported by sequence_parallel_attention_fn"),
        (dict(bias=jnp.zeros((5, 5))), "bias: not supported by sequence_parallel_attention_fn"),
        (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "dropout_rate: not supported"),
        (dict(module=object()), "module: not supported by sequence_parallel_attention_fn"),
        (dict(implementation="xla"), "implementation: not supported by sequence_parallel_attention_fn"),
    ],
)
def test_attention_fn_rejects_what_the_ring_cannot_do(call, message):
    q = jnp.ones((1, 5, 2, 4))  # [B, T, N, H]
    with pytest.raises(ValueError, match=message):
        one_device_fn()(q, q, q, **call)


def test_attention_fn_factory_errors():
    with pytest.raises(ValueError, match=r"axis_name: expected one of the mesh axes \('data', 'sequence'\), got 'seq'"):
        one_device_fn(axis_name="seq")
    with pytest.raises(ValueError, match="batch_axis: expected one of the mesh axes"):
        one_device_fn(batch_axis="batch")
    with pytest.raises(ValueError, match="layout: expected one of"):
        one_device_fn(layout="striped")
    with pytest.raises(TypeError, match="mesh: expected a jax.sharding.Mesh"):
        jattn.sequence_parallel_attention_fn(mesh=None, axis_name="sequence")


def test_module_passes_flax_keywords_to_attention_fn():
    """attention_fn is called with Flax's keywords plus jattn's extras (and the default's result)."""
    seen = {}

    def spy(q, k, v, **kw):
        seen.update(kw)
        return jattn.flax_attention_fn(q, k, v, **kw)

    kw = dict(num_heads=2, in_features=6, qkv_features=8, logits_soft_cap=5.0)
    x = jax.random.normal(jax.random.key(0), (2, 5, 6))
    got = jattn.nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0), attention_fn=spy)(x, is_causal=True)
    np.testing.assert_array_equal(got, jattn.nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))(x, is_causal=True))
    assert set(seen) == {"mask", "dropout_rng", "dropout_rate", "broadcast_dropout", "deterministic", "dtype",
                         "precision", "module", "is_causal", "implementation", "logits_soft_cap"}
    assert seen["is_causal"] is True and seen["logits_soft_cap"] == 5.0 and seen["module"] is None
