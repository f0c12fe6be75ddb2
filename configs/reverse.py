"""Harder variant: output a 16-symbol input in reverse order.

Reversal cannot reuse the copy task's constant offset: output position j must find
input position L+1-j, so the attention pattern is an anti-diagonal that the
model learns from the (sinusoidal) positions. Same fields as ``configs/copy.py``.
"""

import pathlib
import runpy


def get_config():
    c = runpy.run_path(str(pathlib.Path(__file__).with_name("copy.py")))["get_config"]()
    c.task = "reverse"  # output = input reversed
    c.seq_len = 16  # longer than the default copy task (T = 33 model positions)
    c.num_train_steps = 500  # a little more training than copying
    c.eval_every_steps = 100  # greedy-decode the held-out set every 100 steps
    # mesh.data / mesh.sequence come from copy.py (all devices data-parallel); set
    # --config.mesh.sequence=P to split each training sequence over P devices (ring attention).
    return c
