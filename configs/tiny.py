"""Smoke-test config: copy 4 symbols with a 2-layer, width-32 model (~10 s of training on CPU).

Used by the tests; also a quick way to check an installation. Same fields as
``configs/copy.py``.
"""

import pathlib
import runpy


def get_config():
    c = runpy.run_path(str(pathlib.Path(__file__).with_name("copy.py")))["get_config"]()
    c.seq_len = 4  # 4 symbols per sequence
    c.vocab_size = 8  # 5 data symbols: 625 sources, 125 of them held out
    c.num_eval_sequences = 128  # held-out sequences decoded at each eval (drawn with repeats)
    c.d_model = 32  # narrow residual stream
    c.num_heads = 2  # 2 heads of width 16
    c.mlp_dim = 64  # narrow MLP
    c.num_train_steps = 150  # enough for ~100% held-out accuracy
    c.batch_size = 32  # sequences per step
    c.warmup_steps = 10  # short warmup
    c.eval_every_steps = 50  # evaluate every 50 steps
    c.checkpoint_every_steps = 50  # checkpoint every 50 steps
    # mesh.data / mesh.sequence come from copy.py (all devices data-parallel); set
    # --config.mesh.sequence=P to split each training sequence over P devices (ring attention).
    return c
