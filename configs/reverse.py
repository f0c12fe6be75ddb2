"""Harder variant: output the 12-symbol input in reverse order.

Reversal cannot reuse the copy task's constant offset: output position j must find
input position L+1-j, so the attention pattern is an anti-diagonal that the
model learns from the (sinusoidal) positions. Same fields as ``configs/copy.py``.
"""

import pathlib
import runpy


def get_config():
    c = runpy.run_path(str(pathlib.Path(__file__).with_name("copy.py")))["get_config"]()
    c.task = "reverse"  # output = input reversed
    c.seq_len = 12  # longer than the default copy task
    c.num_train_steps = 1200  # reversal needs more steps than copying
    c.eval_every_steps = 400  # greedy-decode the held-out set every 400 steps
    c.checkpoint_every_steps = 400  # checkpoint every 400 steps (and at the end)
    return c
