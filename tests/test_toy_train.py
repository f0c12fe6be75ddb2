"""Toy trainer end to end (in process): it learns, writes its outputs, and decodes correctly.

One run of ``configs/tiny.py`` (copy 4 symbols) feeds every check, so they live in a single
test (a module fixture would be re-run on each pytest-xdist worker).
"""

import functools
import json
import pathlib
import runpy

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from jattn.toy import checkpoint, data, mesh as mesh_lib, train
from jattn.toy.run import run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tiny_run_learns_writes_outputs_and_decodes(tmp_path):
    config = runpy.run_path(str(ROOT / "configs" / "tiny.py"))["get_config"]()
    summary = run(config, str(tmp_path))
    trained = config, tmp_path, summary
    check_learned(trained)
    check_outputs(trained)
    params = trained_params(trained)
    check_greedy_decode_matches_full_forward(trained, params)
    check_cached_logits_match_full_forward(trained, params)


def check_learned(trained):
    config, _, summary = trained
    assert summary["num_train_steps"] == config.num_train_steps
    assert summary["seq_accuracy"] >= 0.95, summary
    assert summary["token_accuracy"] >= 0.98, summary
    assert summary["final_loss"] < 0.1, summary


def check_outputs(trained):
    config, workdir, summary = trained
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == config.num_train_steps
    assert steps[:3] == [config.log_every_steps * i for i in (1, 2, 3)]
    grad_keys = {f"grad_norm/layer{i}/{w}" for i in range(config.num_layers)
                 for w in ("W_Q", "W_K", "W_V", "W_O")} | {"grad_norm/embed", "grad_norm/output"}
    for r in rows:
        assert {"step", "loss", "token_accuracy", "learning_rate"} | grad_keys <= set(r)
        assert all(np.isfinite(r[k]) for k in grad_keys)
    # gradients reach the queries and keys through the softmax, in every layer
    assert all(rows[0][f"grad_norm/layer{i}/{w}"] > 0 for i in range(config.num_layers) for w in ("W_Q", "W_K"))
    assert rows[-1]["loss"] < rows[0]["loss"] / 10
    assert any("eval/seq_accuracy" in r for r in rows)  # the intermediate evaluations
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk == pytest.approx(summary)
    assert {"num_train_steps", "final_loss", "token_accuracy", "seq_accuracy", "wall_seconds"} <= set(on_disk)
    assert isinstance(on_disk["final_loss"], float) and on_disk["final_loss"] == rows[-1]["loss"]
    for name in ("attention.png", "grad_flow.png"):
        image = matplotlib.image.imread(workdir / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), max_to_keep=config.max_checkpoints_to_keep)
    assert ckpt.complete_steps() == [100, 150]
    ckpt.close()


def trained_params(trained):
    config, workdir, _ = trained
    mesh = mesh_lib.make_mesh(config.mesh, config.batch_size)
    graphdef, state = train.create_train_state(config, mesh)
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), max_to_keep=config.max_checkpoints_to_keep)
    state = ckpt.restore(ckpt.latest_step(), like=state)
    ckpt.close()
    return graphdef, state.params


def check_greedy_decode_matches_full_forward(trained, trained_params):
    """decode() == argmax of a full causal forward pass, one token at a time (no cache)."""
    config, _, _ = trained
    graphdef, params = trained_params
    L = config.seq_len
    batch = data.eval_batch(config.seed + 1, num_sequences=16, seq_len=L,
                            vocab_size=config.vocab_size, task=config.task)
    prompt = data.prompts(batch, L)  # [B, L+2]
    cached = jax.jit(lambda p, x: train.decode(p, x, graphdef=graphdef, num_new=L))(params, prompt)

    # Reference: the full causal forward pass over a fixed-length buffer (positions after t
    # cannot affect position t), re-run after each token is appended.
    T = prompt.shape[1] + L - 1
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, jnp.broadcast_to(jnp.arange(T), x.shape)))
    tokens = jnp.concatenate([prompt, jnp.full((prompt.shape[0], L), data.PAD, prompt.dtype)], 1)
    for t in range(prompt.shape[1] - 1, T):
        next_token = jnp.argmax(forward(params, tokens[:, :T])[:, t], -1)  # [B]
        tokens = tokens.at[:, t + 1].set(next_token)
    np.testing.assert_array_equal(cached, tokens[:, L + 2 :])
    assert np.mean(np.all(np.asarray(cached) == np.asarray(data.expected_outputs(batch, L)), 1)) >= 0.9


def check_cached_logits_match_full_forward(trained, trained_params):
    """Every position's logits from the KV-cache path equal the full causal forward pass."""
    config, _, _ = trained
    graphdef, params = trained_params
    inputs = data.eval_batch(config.seed, num_sequences=3, seq_len=config.seq_len,
                             vocab_size=config.vocab_size, task=config.task).inputs  # [B, T]
    B, T = inputs.shape
    full = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, jnp.broadcast_to(jnp.arange(T), (B, T))))(
        params, inputs)  # [B, T, V]

    P = config.seq_len + 2  # prompt length, as in decode()

    @functools.partial(jax.jit, static_argnums=2)
    def cached(params, inputs, prefill):  # ``prefill`` tokens in one call, then one per call
        model = nnx.merge(graphdef, params)
        model.init_cache(B, T)
        chunks = [(0, prefill)] + [(t, t + 1) for t in range(prefill, T)]
        steps = [model(inputs[:, a:b], jnp.broadcast_to(jnp.arange(a, b), (B, b - a)), decode=True)
                 for a, b in chunks]
        return jnp.concatenate(steps, axis=1)  # [B, T, V]

    for prefill in (1, P):
        np.testing.assert_allclose(cached(params, inputs, prefill), full, atol=2e-5, rtol=2e-5)
