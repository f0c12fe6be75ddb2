"""Train a small Transformer on the copy task with jattn's attention, on CPU, in about a minute.

    python train_toy.py                                   # configs/copy.py
    python train_toy.py --config=configs/reverse.py       # another config
    python train_toy.py --config.num_train_steps=200      # override a field
    python train_toy.py --workdir=runs/mine               # run again with it to resume

The logic lives in ``jattn.toy``; this file only parses flags.
"""

import datetime
import os
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = pathlib.Path(__file__).resolve().parent
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_HERE / "configs" / "copy.py"), "Training config (a file with get_config()).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder; reusing one resumes its run. Default: a fresh runs/<config>-<time>."
)


def _fresh_workdir() -> str:
    name = pathlib.Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join("runs", f"{name}-{stamp}")
    suffix = 1
    while os.path.exists(path):
        suffix += 1
        path = os.path.join("runs", f"{name}-{stamp}-{suffix}")
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from jattn.toy.run import run  # after flag parsing, so --help does not import jax

    run(_CONFIG.value, _WORKDIR.value or _fresh_workdir())


if __name__ == "__main__":
    app.run(main)
