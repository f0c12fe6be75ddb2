"""Train a small Transformer on the copy task with jattn's attention, on CPU, in about a minute.

    python train_toy.py                                   # configs/copy.py
    python train_toy.py --config=configs/reverse.py       # another config
    python train_toy.py --config.num_train_steps=200      # override a field
    python train_toy.py --workdir=runs/mine               # run again with it to resume

Several processes (hosts): run the same command in each, with ``--distributed`` (on Cloud TPU,
SLURM or Open MPI JAX finds the rest) or ``--coordinator_address=host0:1234
--num_processes=N --process_id=i``; see README, "Many hosts".

The logic lives in ``jattn.toy``; this file only parses flags. A failure the user can act on
(an invalid config, a workdir in use, a damaged file, a diverged run) is printed as one message
without a traceback; the exit status is 2 for an invalid config or override, 1 for the others,
130 for Ctrl-C and 143 for SIGTERM (the run stops after its current step; a
second signal exits at once).
"""

import datetime
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = pathlib.Path(__file__).resolve().parent
# ml_collections parses --config.<field> overrides while it defines the flag (default config)
# or while absl parses flags (--config given); either may fail on an override naming a section
# the config does not have (an unknown field is accepted here and named by validation).
_OVERRIDE_ERRORS = (KeyError, AttributeError, TypeError)


def _bad_override(error: Exception):
    name = str(error.args[0] if error.args else error).strip("'\"")
    overrides = [a.split("=")[0] for a in sys.argv[1:] if a.lstrip("-").startswith("config.")]
    culprits = [o for o in overrides if name in o.split(".")[1:]] or overrides
    print(f"train_toy.py: error: invalid config override {', '.join(culprits)}: {name!r} is not a field "
          "of the config (every field is a commented line of configs/copy.py)", file=sys.stderr)
    sys.exit(2)


try:
    _CONFIG = config_flags.DEFINE_config_file(
        "config", str(_HERE / "configs" / "copy.py"), "Training config (a file with get_config()).",
        lock_config=False, accept_new_attributes=True,
    )
except _OVERRIDE_ERRORS as e:
    _bad_override(e)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder; reusing one resumes its run. Default: a fresh runs/<config>-<time>."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Run as one of several JAX processes (jax.distributed.initialize); implied by "
    "--coordinator_address. Without the three flags below JAX detects them (Cloud TPU, SLURM, Open MPI).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")


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
    from jattn.toy import interrupt  # after flag parsing, so --help does not import jax
    from jattn.toy.errors import TrainerError
    from jattn.toy.run import run

    with interrupt.StopOnSignal() as stop:
        if _DISTRIBUTED.value or _COORDINATOR.value:
            from jattn.toy import processes

            processes.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
            if not _WORKDIR.value:
                raise app.UsageError("--workdir is required with several processes (they must share it)")
        workdir = _WORKDIR.value or _fresh_workdir()
        try:
            run(_CONFIG.value, workdir, stop=stop)
        except interrupt.Interrupted as e:
            print(f"train_toy.py: {e}", file=sys.stderr)
            # Exit at once: XLA may still run in its own threads, and the interpreter's shutdown
            # under them can crash. The checkpoints and the lock are already closed.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.exit_code)
        except TrainerError as e:
            print(f"train_toy.py: error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)


def _parse_flags(argv):
    try:
        return app.parse_flags_with_usage(argv)
    except _OVERRIDE_ERRORS as e:
        _bad_override(e)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
