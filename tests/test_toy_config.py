"""Toy trainer: config validation, the mesh checks, the data split, the CLI's error path."""

import os
import pathlib
import runpy
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from jattn.toy import data, mesh as mesh_lib, validation

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name: str):
    return runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"]()


@pytest.mark.parametrize("name", ["copy", "reverse", "tiny"])
def test_shipped_configs_are_valid_and_commented(name):
    validation.validate(load(name))
    # every field of the default config carries a comment
    for line in (ROOT / "configs" / "copy.py").read_text().splitlines():
        if line.strip().startswith("c.") and "=" in line and "ConfigDict()" not in line:
            assert "#" in line, line


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("d_model", -64, "config.d_model: expected a positive even int"),
        ("d_model", 33, "config.d_model: expected a positive even int"),
        ("num_heads", 3, "config.num_heads: expected a divisor of d_model=64, got 3"),
        ("num_heads", 0, "config.num_heads: expected a positive int, got 0"),
        ("seq_len", 0, "config.seq_len: expected a positive int, got 0"),
        ("vocab_size", 4, "config.vocab_size: expected an int >= 5"),
        ("batch_size", 2.5, "config.batch_size: expected a positive int, got 2.5"),
        ("learning_rate", -1e-3, "config.learning_rate: expected a finite positive number, got -0.001"),
        ("learning_rate", float("inf"), "config.learning_rate: expected a finite positive number, got inf"),
        ("weight_decay", float("nan"), "config.weight_decay: expected a finite non-negative number, got nan"),
        ("warmup_steps", 300, "config.warmup_steps: expected < num_train_steps=300, got 300"),
        ("task", "sort", "config.task: expected one of ('copy', 'reverse'), got 'sort'"),
        ("check_grads", 1, "config.check_grads: expected a bool, got 1"),
        ("attention_implementation", "flash", "config.attention_implementation: expected None or one of ("),
        ("num_train_steps", True, "config.num_train_steps: expected a positive int, got True"),
    ],
)
def test_bad_values_are_named(field, value, expected):
    # A config file may build its ConfigDict with any types, so start from a plain dict.
    fields = {**load("copy").to_dict(), field: value}
    with pytest.raises(ValueError, match="invalid config") as e:
        validation.validate(ml_collections.ConfigDict(fields))
    assert expected in str(e.value)


def test_unknown_and_missing_fields():
    c = load("copy")
    c.unlock()
    c.num_layer = 3  # typo of num_layers
    c.mesh.model = 2  # an axis that does not exist (yet)
    del c.seed
    with pytest.raises(ValueError) as e:
        validation.validate(c)
    msg = str(e.value)
    assert "config.num_layer: unknown field" in msg
    assert "config.mesh.model: unknown field" in msg
    assert "config.seed: missing field" in msg


def test_mesh_checks():
    c = load("copy")
    mesh = mesh_lib.make_mesh(c.mesh, 64)
    assert dict(mesh.shape) == {"data": len(jax.local_devices()), "sequence": 1}
    c.mesh.data = len(jax.local_devices()) + 2
    with pytest.raises(ValueError, match=r"config.mesh.data: expected -1 or at most \d+ \(local devices\)"):
        mesh_lib.make_mesh(c.mesh, 64)


def test_data_split_is_disjoint_and_deterministic():
    kw = dict(seq_len=5, vocab_size=10, task="copy")
    m = kw["vocab_size"] - data.NUM_SPECIAL
    train = [data.train_batch(3, s, batch_size=256, **kw) for s in range(4)]
    heldout = data.eval_batch(3, num_sequences=256, **kw)

    def sources(b):
        return np.asarray(b.inputs[:, 1 : kw["seq_len"] + 1]) - data.NUM_SPECIAL

    def checksum(x):  # independent NumPy version of the documented rule
        w = np.arange(1, x.shape[1])
        return (x[:, :-1] @ w + x[:, -1]) % m

    assert all((checksum(sources(b)) != 0).all() for b in train)
    assert (checksum(sources(heldout)) == 0).all()
    train_rows = {tuple(r) for b in train for r in sources(b)}
    assert not train_rows & {tuple(r) for r in sources(heldout)}
    # every symbol shows up in every position of the training data, including the last
    assert all(len(set(sources(train[0])[:, i])) == m for i in range(kw["seq_len"]))
    again = data.train_batch(3, 2, batch_size=256, **kw)
    np.testing.assert_array_equal(again.inputs, train[2].inputs)
    assert not np.array_equal(train[1].inputs, train[2].inputs)


@pytest.mark.parametrize("task", ["copy", "reverse"])
def test_example_layout(task):
    b = data.train_batch(0, 0, batch_size=3, seq_len=4, vocab_size=9, task=task)
    tokens = np.concatenate([np.asarray(b.inputs), np.asarray(b.targets)[:, -1:]], axis=1)  # [B, 2L+2]
    x, y = tokens[:, 1:5], tokens[:, 6:]
    assert (tokens[:, 0] == data.BOS).all() and (tokens[:, 5] == data.SEP).all()
    np.testing.assert_array_equal(y, x if task == "copy" else x[:, ::-1])
    np.testing.assert_array_equal(b.targets[:, :-1], b.inputs[:, 1:])
    np.testing.assert_array_equal(np.asarray(b.weights[0]), [0, 0, 0, 0, 0, 1, 1, 1, 1])


def test_cli_rejects_bad_value_before_compiling(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_toy.py"), "--config.num_heads=5", f"--workdir={tmp_path / 'w'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode != 0
    assert "config.num_heads: expected a divisor of d_model=64, got 5" in proc.stderr
    assert not (tmp_path / "w").exists()  # nothing was started
