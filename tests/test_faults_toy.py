"""Toy trainer faults, with real ``train_toy.py`` processes: a run never ends "successfully" in
a broken state, and never loses its last good state.

Covered: SIGKILL mid-run then resume (the losses equal an uninterrupted run's; leftovers of
an unfinished save are never loaded); a checkpoint with corrupted bytes, truncated, or missing
its metadata (fall back to the older intact one, with a warning naming the damaged one); every
checkpoint damaged; a garbage line in metrics.jsonl; a garbage config.json; two runs on one
workdir (and a SIGKILLed holder's lock); Ctrl-C; a diverging run (NaN) and non-finite
hyper-parameters; unknown config fields and overrides; an implementation that cannot run here;
an unwritable workdir; a resumed run with another config; SIGTERM during a save.

Cost: one tiny run (configs/tiny.py, 12 steps, checkpoints every 4) is SIGKILLed after step 9
once per session and copied by each test that resumes it; the subprocesses share a JAX
compilation cache, so each resumed run compiles almost nothing. Every subprocess has a timeout
and is killed and reaped in ``finally``.
"""

import fcntl
import json
import os
import pathlib
import re
import runpy
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jattn.toy import interrupt, workdir_lock
from jattn.toy.errors import TrainerError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    f"--config={ROOT / 'configs' / 'tiny.py'}",
    "--config.num_train_steps=12",
    "--config.checkpoint_every_steps=4",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=100",
    "--config.num_eval_sequences=8",
    "--config.num_samples_to_print=1",
    "--config.check_grads=False",
]
TIMEOUT = 240  # seconds, per subprocess (a loaded 2-core machine)


def _kill(proc: subprocess.Popen) -> None:
    """Kill ``proc`` if it still runs, and reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _reap(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for ``proc`` (at most ``timeout`` s); kill and reap it whatever happens."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _start(workdir, *overrides, env, **popen) -> subprocess.Popen:
    args = [sys.executable, str(ROOT / "train_toy.py"), f"--workdir={workdir}", *TINY, *overrides]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT, **popen)


def _train(workdir, *overrides, env, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    return _reap(_start(workdir, *overrides, env=env), timeout)


def _shared_dir(tmp_path_factory) -> pathlib.Path:
    """A directory of this session shared by all pytest-xdist workers (or this process)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = _shared_dir(tmp_path_factory) / "faults_toy_jax_cache"
    cache.mkdir(exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    return env


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, env) -> pathlib.Path:
    """A run SIGKILLed right after step 9: checkpoints 4 and 8, metrics rows 1..9 (made once)."""
    shared = _shared_dir(tmp_path_factory)
    workdir = shared / "faults_toy_killed"
    with open(shared / "faults_toy_killed.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another xdist worker may be making it
        if not (workdir / "ready").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            proc = _train(workdir, env={**env, "JATTN_TOY_SIGKILL_AFTER_STEP": "9"})
            assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
            (workdir / "ready").touch()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "8"]
    assert [r["step"] for r in _rows(workdir)] == list(range(1, 10))
    return workdir


@pytest.fixture
def copy_of_killed(killed_run, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(killed_run, workdir)
    return workdir


def _rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(workdir) -> list[str]:
    return sorted((p.name for p in (workdir / "checkpoints").iterdir()), key=int)


def _assert_clean_failure(proc, *phrases):
    """A non-zero exit with one message (no traceback) containing every phrase."""
    assert proc.returncode > 0, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in proc.stderr, (phrase, proc.stderr[-3000:])


def _assert_finished_from(proc, workdir, step, killed_run):
    """The run resumed from ``step``, finished, and replayed the killed run's losses exactly."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from checkpoint at step {step}" in proc.stdout
    assert json.loads((workdir / "summary.json").read_text())["resumed_from_step"] == step
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, 13))  # no step twice, none missing
    # the restored state is the saved one: steps 1..9 reproduce the killed run bit for bit
    np.testing.assert_allclose([r["loss"] for r in rows[:9]], [r["loss"] for r in _rows(killed_run)],
                               rtol=0, atol=1e-6)
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert _checkpoints(workdir) == ["8", "12"]  # max_checkpoints_to_keep=2


def _uninterrupted_losses() -> list[float]:
    """Loss of each of the 12 steps, trained in this process with the trainer's own steps."""
    from jattn.toy import mesh as mesh_lib, train

    config = runpy.run_path(str(ROOT / "configs" / "tiny.py"))["get_config"]()
    config.num_train_steps = 12
    mesh = mesh_lib.make_mesh(config.mesh, config.batch_size)
    graphdef, state = train.create_train_state(config, mesh)
    steps = train.jit_steps(config, graphdef, mesh)
    losses = []
    for step in range(config.num_train_steps):
        state, metrics = steps.train_step(state, steps.train_batch(step))
        losses.append(float(metrics["loss"]))
    return losses


def test_resume_after_sigkill_matches_an_uninterrupted_run(copy_of_killed, killed_run, env):
    holder = (copy_of_killed / workdir_lock.LOCK_FILE).read_text()
    assert holder.startswith("pid ")  # the killed run's record is left behind and does not block
    ckpts = copy_of_killed / "checkpoints"
    # What a save killed midway would leave, and a step directory orbax never finished:
    # neither may be loaded (nor reported as damaged).
    (ckpts / "12.orbax-checkpoint-tmp-1234" / "default").mkdir(parents=True)
    (ckpts / "12.orbax-checkpoint-tmp-1234" / "default" / "garbage").write_text("partial")
    (ckpts / "11" / "default").mkdir(parents=True)
    proc = _train(copy_of_killed, env=env)
    assert f"discarded incomplete checkpoint {ckpts / '11'}" in proc.stdout
    _assert_finished_from(proc, copy_of_killed, 8, killed_run)
    assert "WARNING" not in proc.stderr
    expected = _uninterrupted_losses()
    np.testing.assert_allclose([r["loss"] for r in _rows(copy_of_killed)], expected, rtol=0, atol=1e-6)
    summary = json.loads((copy_of_killed / "summary.json").read_text())
    assert abs(summary["final_loss"] - expected[-1]) <= 1e-6


def _data_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The largest array-data file orbax wrote for the step."""
    files = [p for p in (step_dir / "default").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _corrupt(step_dir):
    path = _data_file(step_dir)
    data = bytearray(path.read_bytes())
    at = len(data) // 2 - 32
    data[at : at + 64] = np.random.default_rng(0).bytes(64)
    assert data != path.read_bytes()
    path.write_bytes(bytes(data))
    return f"file {path.relative_to(step_dir)} has changed since it was saved"


def _truncate(step_dir):
    path = _data_file(step_dir)
    os.truncate(path, path.stat().st_size // 2)
    return f"file {path.relative_to(step_dir)} has changed since it was saved"


def _delete_metadata(step_dir):
    (step_dir / "default" / "_METADATA").unlink()
    return "file default/_METADATA is missing"


@pytest.mark.parametrize("damage", [_corrupt, _truncate, _delete_metadata], ids=lambda f: f.__name__[1:])
def test_damaged_checkpoint_falls_back_to_older_intact_one(copy_of_killed, killed_run, env, damage):
    step_dir = copy_of_killed / "checkpoints" / "8"
    why = damage(step_dir)
    proc = _train(copy_of_killed, env=env)
    assert f"checkpoint {step_dir} is damaged: {why}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    _assert_finished_from(proc, copy_of_killed, 4, killed_run)
    moved = copy_of_killed / "damaged_checkpoints" / "8"
    assert moved.is_dir() and f"Moved it to {moved}" in proc.stderr  # kept for inspection


def test_every_checkpoint_damaged_is_a_clear_error(copy_of_killed, env):
    _corrupt(copy_of_killed / "checkpoints" / "8")
    (copy_of_killed / "checkpoints" / "4" / "jattn_manifest.json").unlink()  # as if killed before writing it
    proc = _train(copy_of_killed, env=env)
    _assert_clean_failure(proc, "no intact checkpoint is left in", "Run again to start over from step 0",
                          "jattn_manifest.json is missing (the save never finished)")
    assert proc.stderr.count("is damaged") == 2
    assert not (copy_of_killed / "summary.json").exists()
    assert sorted(p.name for p in (copy_of_killed / "damaged_checkpoints").iterdir()) == ["4", "8"]


def test_garbage_metrics_line_is_dropped_with_a_warning(copy_of_killed, killed_run, env):
    path = copy_of_killed / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3] + [b"{garbage\n", b'{"no_step": 1}\n', b"\xff\xfe\x00\n"] + lines[3:]))
    proc = _train(copy_of_killed, env=env)
    assert f"{path}: dropped 3 line(s) that are not metrics rows (line 4 '{{garbage\\n'" in proc.stderr, proc.stderr
    assert b"{garbage" in (copy_of_killed / "metrics.jsonl.damaged").read_bytes()
    _assert_finished_from(proc, copy_of_killed, 8, killed_run)


def test_garbage_config_json_is_a_clear_error(copy_of_killed, env):
    (copy_of_killed / "config.json").write_text('{"task": "copy", garbage')
    proc = _train(copy_of_killed, env=env)
    _assert_clean_failure(proc, f"{copy_of_killed / 'config.json'} is not valid JSON",
                          "delete it to resume with the current --config")
    assert _checkpoints(copy_of_killed) == ["4", "8"]


def test_resume_with_another_config_is_a_clear_error(copy_of_killed, env):
    proc = _train(copy_of_killed, "--config.learning_rate=0.001", env=env)
    _assert_clean_failure(proc, "holds a run of another config (fields differ: ['learning_rate']")
    assert _checkpoints(copy_of_killed) == ["4", "8"]


def _wait_for_lock(proc, workdir):
    """Wait until ``proc`` has written its pid into the workdir's lock file (it holds the lock)."""
    lock_file, deadline = workdir / workdir_lock.LOCK_FILE, time.monotonic() + TIMEOUT
    while f"pid {proc.pid} " not in (lock_file.read_text() if lock_file.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, "it never took the lock"
        time.sleep(0.2)


def test_second_run_on_a_workdir_exits_at_once_naming_the_holder(tmp_path, env):
    workdir, long = tmp_path / "run", ["--config.num_train_steps=100000", "--config.warmup_steps=0"]
    first = _start(workdir, *long, env=env)
    try:
        _wait_for_lock(first, workdir)
        second = _train(workdir, *long, env=env, timeout=120)
        _assert_clean_failure(second, f"is in use by another train_toy.py run (pid {first.pid} on host")
        assert first.poll() is None  # the first run goes on
        first.send_signal(signal.SIGINT)  # Ctrl-C: one message, and the lock is released
        done = _reap(first, TIMEOUT)
    finally:
        _kill(first)
    assert done.returncode == 130, done.stderr[-3000:]
    assert re.search(f"interrupted by SIGINT after step [0-9]+; run again with --workdir={re.escape(str(workdir))} "
                     "to resume", done.stderr), done.stderr[-3000:]
    workdir_lock.lock_workdir(str(workdir)).close()


class _SignalsItself:
    """An object whose finalizer sends ``signum`` to this process and runs on after it."""

    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):
        os.kill(os.getpid(), self.signum)
        sum(range(1000))  # Python runs the handler here, inside the finalizer


def test_a_signal_landing_in_a_finalizer_still_stops_the_run(tmp_path):
    # Python's own SIGINT handler raises KeyboardInterrupt wherever the signal lands; inside a
    # finalizer (or an event-loop callback) it is printed and swallowed, and the run would train
    # on, as it once did in CI. The trainer's handlers only record the signal.
    previous = signal.getsignal(signal.SIGTERM)
    with interrupt.StopOnSignal() as stop:
        stop.check(3, str(tmp_path))  # nothing arrived yet
        _SignalsItself(signal.SIGTERM)  # collected at once: the signal lands in its __del__
        with pytest.raises(interrupt.Interrupted, match=f"interrupted by SIGTERM after step 4; run again "
                           f"with --workdir={re.escape(str(tmp_path))} to resume") as caught:
            stop.check(4, str(tmp_path))
    assert caught.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored


SECOND_SIGNAL = """
import os, signal, time
from jattn.toy import interrupt
with interrupt.StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    print("first recorded", stop.received == signal.SIGINT, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)
"""


def test_a_second_signal_exits_at_once(env):
    proc = _reap(subprocess.Popen([sys.executable, "-c", SECOND_SIGNAL], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True), 20)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stdout == "first recorded True\n"
    assert "second SIGINT: exiting now" in proc.stderr


HOLD_LOCK = """
import sys, time
from jattn.toy.workdir_lock import lock_workdir
lock = lock_workdir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_of_a_sigkilled_holder_does_not_block(tmp_path, env):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n", holder.stderr.read()
        with pytest.raises(TrainerError, match=f"in use by another train_toy.py run \\(pid {holder.pid} "):
            workdir_lock.lock_workdir(str(tmp_path))
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=30)  # reaps it and closes its pipes
    finally:
        _kill(holder)
    assert holder.returncode == -signal.SIGKILL
    assert f"pid {holder.pid} " in (tmp_path / workdir_lock.LOCK_FILE).read_text()  # left behind
    lock = workdir_lock.lock_workdir(str(tmp_path))  # and it does not block
    lock.close()
    assert f"pid {os.getpid()} " in (tmp_path / workdir_lock.LOCK_FILE).read_text()


@pytest.mark.parametrize(
    "overrides, phrases",
    [
        (  # every problem is named in one message
            ["--config.learning_rate=inf", "--config.grad_clip_norm=nan", "--config.foo=1"],
            ["config.learning_rate: expected a finite positive number, got inf",
             "config.grad_clip_norm: expected a finite positive number, got nan",
             "config.foo: unknown field (allowed: attention_implementation,"],
        ),
        (["--config.attention_implementation=cudnn"],
         ["config.attention_implementation: 'cudnn' cannot run the model's attention on this machine"]),
        (["--config.bar.baz=1"], ["invalid config override --config.bar.baz: 'bar' is not a field"]),
    ],
    ids=["invalid_values", "cannot_run_here", "unknown_section"],
)
def test_bad_config_is_one_message_before_the_workdir_exists(tmp_path, env, overrides, phrases):
    proc = _train(tmp_path / "run", *overrides, env=env, timeout=120)
    _assert_clean_failure(proc, *phrases)
    assert proc.returncode == 2
    assert not (tmp_path / "run").exists()


def test_unwritable_workdir_is_a_clear_error(tmp_path, env):
    (tmp_path / "file").write_text("")
    proc = _train(tmp_path / "file" / "run", env=env, timeout=120)
    _assert_clean_failure(proc, f"cannot write to --workdir '{tmp_path / 'file' / 'run'}'")


def test_diverging_run_stops_before_checkpointing_the_broken_state(tmp_path, env):
    # A finite but absurd learning rate: the parameters overflow within a few steps. Rows are
    # logged rarely, so the flag is caught at a checkpoint boundary, before the save.
    workdir = tmp_path / "run"
    proc = _train(workdir, "--config.learning_rate=1e30", "--config.checkpoint_every_steps=2",
                  "--config.log_every_steps=100", env=env)
    _assert_clean_failure(proc, "training diverged: step ", "stopped before writing any checkpoint of it")
    bad = int(re.search(r"training diverged: step (\d+)", proc.stderr).group(1))
    saved = [int(s) for s in _checkpoints(workdir)]
    assert saved and max(saved) < bad, (saved, bad)
    assert f"newest checkpoint: step {max(saved)}" in proc.stderr
    assert not (workdir / "summary.json").exists()


SIGTERM_DURING_SAVE = """
import os, signal, sys
import jax.numpy as jnp
from jattn.toy import checkpoint

real, sent = checkpoint._file_digests, []
def digests_then_sigterm(step_dir):  # first call: after orbax committed the step, before the manifest
    if not sent:
        sent.append(os.kill(os.getpid(), signal.SIGTERM))
        print("still saving", flush=True)
    return real(step_dir)

checkpoint._file_digests = digests_then_sigterm
ckpt = checkpoint.Checkpointer(sys.argv[1], max_to_keep=2)
ckpt.save(1, {"w": jnp.arange(5.0)})
print("not reached", flush=True)
"""


def test_sigterm_during_a_save_is_delivered_after_the_checkpoint_is_complete(tmp_path, env):
    directory = tmp_path / "checkpoints"
    proc = _reap(subprocess.Popen([sys.executable, "-c", SIGTERM_DURING_SAVE, str(directory)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), 120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-3000:]
    assert proc.stdout == "still saving\n"
    from jattn.toy import checkpoint
    import jax.numpy as jnp

    ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=2)
    try:
        step, state = ckpt.restore_latest(like={"w": jnp.zeros(5)})  # verified against its manifest
    finally:
        ckpt.close()
    assert step == 1
    np.testing.assert_array_equal(state["w"], np.arange(5.0))


def test_unverified_checkpoint_never_rotates_out_the_last_good_one(tmp_path, monkeypatch):
    import jax.numpy as jnp
    from jattn.toy import checkpoint

    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=1)
    try:
        ckpt.save(1, {"w": jnp.arange(3.0)})
        ckpt.save(2, {"w": jnp.arange(3.0) + 1})
        assert ckpt.complete_steps() == [2]  # rotation after a verified save

        def bad_read_back(step, like):
            raise checkpoint.DamagedCheckpoint("simulated read-back mismatch")

        monkeypatch.setattr(ckpt, "restore", bad_read_back)
        with pytest.raises(TrainerError, match="differs from the state just saved .*older checkpoints were kept"):
            ckpt.save(3, {"w": jnp.arange(3.0) + 2})
        assert ckpt.complete_steps() == [2, 3]  # step 2 survives the unverified step 3
        with pytest.raises(TrainerError, match=r"refusing to checkpoint step 4: non-finite values in \['w'\]"):
            ckpt.save(4, {"w": jnp.array([0.0, jnp.nan, 1.0])})
        assert ckpt.complete_steps() == [2, 3]
    finally:
        ckpt.close()


FULL_DISK_DURING_SAVE = """
import resource, signal, sys
import jax.numpy as jnp
from jattn.toy import checkpoint
from jattn.toy.errors import TrainerError

ckpt = checkpoint.Checkpointer(sys.argv[1], max_to_keep=2)
ckpt.save(1, {"w": jnp.arange(5.0)})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
try:
    ckpt.save(2, {"w": jnp.arange(100_000.0)})  # 800 kB: orbax's data file cannot be written
except TrainerError as e:
    print(e, flush=True)
"""


def test_failed_checkpoint_write_is_a_clear_error_and_keeps_the_older_ones(tmp_path, env):
    directory = tmp_path / "checkpoints"
    proc = _reap(subprocess.Popen([sys.executable, "-c", FULL_DISK_DURING_SAVE, str(directory)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message = proc.stdout.strip()
    assert message.startswith(f"could not write checkpoint {directory / '2'} "), message
    assert "File too large" in message and "the older checkpoints are intact" in message, message
    assert sorted(p.name for p in directory.iterdir()) == ["1"]  # no half-written step 2 left
    from jattn.toy import checkpoint
    import jax.numpy as jnp

    ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=2)
    try:
        step, state = ckpt.restore_latest(like={"w": jnp.zeros(5)})
    finally:
        ckpt.close()
    assert step == 1
    np.testing.assert_array_equal(state["w"], np.arange(5.0))


def test_full_disk_while_logging_is_a_clear_error(tmp_path, monkeypatch):
    import errno

    from jattn.toy import metrics

    log = metrics.MetricsLog(str(tmp_path / "metrics.jsonl"), resume_step=0)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(TrainerError, match=r"cannot append to .*metrics.jsonl \(No space left on device\); "
                                           "the newest checkpoint is intact"):
        log.append({"step": 1, "loss": 1.0})
