"""Check a toy-trainer config before anything is built or compiled.

``validate(config)`` rejects unknown fields, wrong types and bad values (non-finite numbers
included), and values that could only fail later (an attention implementation that cannot
run the model's attention on this machine); it raises one ``ConfigError`` (a ``ValueError``)
listing every problem as ``config.<field>: expected ..., got ...``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jattn import dispatch
from jattn.toy.errors import ConfigError

TASKS = ("copy", "reverse")
NUM_SPECIAL_TOKENS = 3  # PAD, BOS, SEP (see jattn.toy.data)


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _positive_finite(v) -> bool:
    return math.isfinite(v) and v > 0


def _non_negative_finite(v) -> bool:
    return math.isfinite(v) and v >= 0


# field -> (type, value predicate, description of the allowed values)
_INT, _REAL = int, numbers.Real
SCHEMA: dict[str, Any] = {
    "task": (str, lambda v: v in TASKS, f"one of {TASKS}"),
    "seq_len": (_INT, _positive, "a positive int"),
    "vocab_size": (_INT, lambda v: v >= NUM_SPECIAL_TOKENS + 2,
                   f"an int >= {NUM_SPECIAL_TOKENS + 2} ({NUM_SPECIAL_TOKENS} specials + >= 2 symbols)"),
    "num_eval_sequences": (_INT, _positive, "a positive int"),
    "num_layers": (_INT, _positive, "a positive int"),
    "d_model": (_INT, lambda v: v > 0 and v % 2 == 0, "a positive even int (sinusoidal positions)"),
    "num_heads": (_INT, _positive, "a positive int"),
    "mlp_dim": (_INT, _positive, "a positive int"),
    "attention_implementation": ((str, type(None)), lambda v: v is None or v in dispatch.IMPLEMENTATIONS,
                                 f"None or one of {dispatch.IMPLEMENTATIONS}"),
    "num_train_steps": (_INT, _positive, "a positive int"),
    "batch_size": (_INT, _positive, "a positive int"),
    "learning_rate": (_REAL, _positive_finite, "a finite positive number"),
    "warmup_steps": (_INT, _non_negative, "a non-negative int"),
    "weight_decay": (_REAL, _non_negative_finite, "a finite non-negative number"),
    "grad_clip_norm": (_REAL, _positive_finite, "a finite positive number"),
    "seed": (_INT, _non_negative, "a non-negative int"),
    "log_every_steps": (_INT, _positive, "a positive int"),
    "eval_every_steps": (_INT, _positive, "a positive int"),
    "num_samples_to_print": (_INT, _non_negative, "a non-negative int"),
    "checkpoint_every_steps": (_INT, _positive, "a positive int"),
    "max_checkpoints_to_keep": (_INT, _positive, "a positive int"),
    "check_grads": (bool, lambda v: True, "a bool"),
    "mesh": {
        "data": (_INT, lambda v: v == -1 or v > 0, "-1 (all local devices) or a positive int"),
        "sequence": (_INT, _positive, "a positive int"),
    },
}


def _type_ok(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)


def _check_fields(config, schema: dict, prefix: str, problems: list[str]) -> None:
    keys = set(config.keys())
    for unknown in sorted(keys - set(schema)):
        problems.append(f"{prefix}{unknown}: unknown field (allowed: {', '.join(sorted(schema))})")
    for name, spec in schema.items():
        where = f"{prefix}{name}"
        if name not in keys:
            problems.append(f"{where}: missing field")
            continue
        value = config[name]
        if isinstance(spec, dict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                problems.append(f"{where}: expected a ConfigDict section, got {value!r}")
            else:
                _check_fields(value, spec, where + ".", problems)
            continue
        kind, ok, allowed = spec
        if not _type_ok(value, kind) or not ok(value):
            problems.append(f"{where}: expected {allowed}, got {value!r}")


def _implementation_problem(config) -> str | None:
    """Why ``config.attention_implementation`` cannot run the model's attention here, or None.

    Asks ``jattn.dispatch`` about the training call's shapes (nothing is computed): e.g.
    ``'cudnn'`` needs an NVIDIA GPU and float16/bfloat16, and the toy model computes in float32.
    """
    T, N = 2 * config.seq_len + 1, config.num_heads  # model input length, heads
    q = jax.ShapeDtypeStruct((config.batch_size, T, N, config.d_model // N), jnp.float32)  # [B, T, N, H]
    try:
        dispatch.explain_implementation(q, q, q, is_causal=True,
                                        implementation=config.attention_implementation)
    except ValueError as e:
        return str(e)
    return None


def validate(config) -> None:
    """Raise ``ConfigError`` naming every unknown field and bad value of ``config``."""
    problems: list[str] = []
    _check_fields(config, SCHEMA, "config.", problems)
    if not problems:  # relations between fields, once each field is valid on its own
        if config.d_model % config.num_heads:
            problems.append(
                f"config.num_heads: expected a divisor of d_model={config.d_model}, got {config.num_heads}"
            )
        if config.warmup_steps >= config.num_train_steps:
            problems.append(
                f"config.warmup_steps: expected < num_train_steps={config.num_train_steps}, "
                f"got {config.warmup_steps}"
            )
        if config.mesh.sequence > 1 and config.attention_implementation is not None:
            problems.append(
                "config.attention_implementation: expected None with mesh.sequence > 1 (ring "
                f"attention computes its own tiles), got {config.attention_implementation!r}"
            )
        elif config.attention_implementation is not None:
            problem = _implementation_problem(config)
            if problem:
                problems.append(f"config.attention_implementation: {config.attention_implementation!r} "
                                f"cannot run the model's attention on this machine ({problem})")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
