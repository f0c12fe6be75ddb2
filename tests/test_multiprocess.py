"""Real multi-process runs: 2 processes x 4 CPU devices on localhost (``jax.distributed`` with
gloo collectives), launched from here with a free port, bounded time, and both processes
always reaped (each in its own process group, killed in ``finally``). The work itself is in
tests/multiprocess_worker.py: ring and Ulysses parity, the toy trainer's steps on a data x
sequence mesh across both processes, and a process that dies mid-run; and ``train_toy.py``
itself as two processes, SIGKILLed and resumed."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "multiprocess_worker.py")
# The config of the train_toy.py runs (configs/tiny.py plus these), also the worker's reference.
TOY_OVERRIDES = {"num_train_steps": 4, "warmup_steps": 2, "batch_size": 8, "num_layers": 1}
TOY_FLAGS = [  # appended to README's command (tests/multiprocess_worker.py computes the reference)
    *(f"--config.{k}={v}" for k, v in TOY_OVERRIDES.items()),
    "--config.checkpoint_every_steps=2", "--config.log_every_steps=1", "--config.eval_every_steps=100",
    "--config.num_eval_sequences=8", "--config.num_samples_to_print=1", "--config.check_grads=False",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(what: str, command, env: dict, timeout: float):
    """Start ``command(i, port)`` for i = 0, 1 (each in its own process group, output to files),
    wait (bounded) for both, kill both groups whatever happens; returns
    [(returncode, stdout, stderr, time.time() when it ended)] for process 0 and 1."""
    port = _free_port()
    env = dict(env, PYTHONUNBUFFERED="1")
    procs, files = [], []
    try:
        for i in range(2):
            out, err = (open(os.path.join(env["JATTN_TEST_LOGS"], f"{what}-{i}.{s}"), "w+") for s in ("out", "err"))
            files += [out, err]
            procs.append(subprocess.Popen(command(i, port), env=env, stdout=out, stderr=err, text=True,
                                          cwd=ROOT, start_new_session=True))
        results = [None, None]
        deadline = time.time() + timeout
        while any(r is None for r in results):
            for i, p in enumerate(procs):
                if results[i] is None and p.poll() is not None:
                    results[i] = (p.returncode, time.time())
            if time.time() > deadline:
                pytest.fail(f"{what}: the processes did not finish within {timeout} s: {results}")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the process and anything it started
            p.wait(timeout=30)
    texts = []
    for f in files:
        f.seek(0)
        texts.append(f.read())
        f.close()
    return [(code, texts[2 * i], texts[2 * i + 1], ended) for i, (code, ended) in enumerate(results)]


def _launch(mode: str, out_dir, *extra: str, timeout: float = 240):
    """Both worker processes in ``mode``; [(returncode, stderr, time it ended)] for process 0 and 1."""
    env = dict(os.environ, JATTN_TEST_LOGS=str(out_dir))
    env.pop("XLA_FLAGS", None)  # the worker sets 4 devices per process itself
    results = _run_pair(mode, lambda i, port: [sys.executable, WORKER, mode, str(i), "2", str(port), str(out_dir),
                                               *extra], env, timeout)
    return [(code, err, ended) for code, _, err, ended in results]


def _readme_command() -> tuple[dict, list[str]]:
    """(environment, arguments of train_toy.py) of README's two-process trainer command, with
    ``$i`` left in place."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = text.split("<!-- test: tests/test_multiprocess.py::test_readme_two_process_trainer_command -->")[1]
    block = block.split("```bash\n")[1].split("```")[0].replace("\\\n", " ")
    line = next(part for part in block.split(";") if "train_toy.py" in part).split("&")[0]  # "do ... &"
    words = shlex.split(line)[1:]  # without "do"
    start = words.index("python")
    env = dict(w.split("=", 1) for w in words[:start] if "=" in w)
    assert words[start + 1] == "train_toy.py", words
    return env, words[start + 2:]


def _train_toy(workdir, logs, what: str, *, timeout: float = 300, **env_extra):
    """README's two-process ``train_toy.py`` command (2 processes x 4 CPU devices) on ``workdir``,
    shortened by ``TOY_FLAGS`` and on a free port: [(returncode, stdout, stderr, _)] per process.

    The runs of one test share a JAX compilation cache in ``logs`` (process 0 writes it), so a
    resumed run loads the training step instead of compiling it again."""
    readme_env, readme_args = _readme_command()
    env = dict(os.environ, JATTN_TEST_LOGS=str(logs), PYTHONPATH=ROOT, **readme_env,
               JAX_COMPILATION_CACHE_DIR=os.path.join(logs, "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1", **env_extra)

    def command(i, port):  # later flags win: the README's, then the test's
        args = [a.replace("$i", str(i)) for a in readme_args]
        return [sys.executable, os.path.join(ROOT, "train_toy.py"), *args, *TOY_FLAGS, f"--workdir={workdir}",
                f"--coordinator_address=127.0.0.1:{port}"]

    return _run_pair(what, command, env, timeout)


def test_readme_two_process_trainer_command():
    """The README command that the trainer test runs is the one the README describes."""
    env, args = _readme_command()
    assert env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}, env
    for flag in ("--config=configs/tiny.py", "--config.mesh.data=2", "--config.mesh.sequence=4",
                 "--num_processes=2", "--process_id=$i"):
        assert flag in args, (flag, args)
    assert any(a.startswith("--coordinator_address=127.0.0.1:") for a in args), args
    assert not {a.split("=")[0] for a in args} & {f.split("=")[0] for f in TOY_FLAGS}, args  # not overridden


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    """One 2-process launch for attention parity and the trainer's steps (saves a start-up)."""
    out = tmp_path_factory.mktemp("parity")
    results = _launch("parity", out, timeout=420)
    for code, err, _ in results:
        assert code == 0, err[-3000:]
    return out


def test_two_processes_match_one_device(parity_run):
    for pid in range(2):
        r = json.loads((parity_run / f"parity_{pid}.json").read_text())
        assert (r["process_count"], r["device_count"], r["local_devices"]) == (2, 8, 4), r
        for strategy in ("ring", "ulysses"):
            assert r[strategy]["shards_here"] == 4, r  # each process holds half of the sequence
            assert r[strategy]["forward"] < 1e-5, (pid, strategy, r[strategy])
            assert max(r[strategy]["grads"]) < 1e-4, (pid, strategy, r[strategy])


def test_toy_training_steps_across_two_processes_match_one_device(parity_run):
    reports = [json.loads((parity_run / f"trainer_{pid}.json").read_text()) for pid in range(2)]
    for r in reports:
        assert r["row_processes"] == [[0, 0, 1, 1], [0, 0, 1, 1]], r  # each sequence row spans both
        assert r["config"] == TOY_OVERRIDES, r  # the config of the train_toy.py runs below
        assert len(r["two_processes"]) == 4 and r["two_processes"] == reports[0]["two_processes"], reports
        for a, b in zip(r["two_processes"], r["one_device"]):
            assert abs(a - b) <= 1e-5 * abs(b), r


@pytest.mark.parametrize("victim", [1, 0], ids=["worker_dies", "coordinator_dies"])
def test_a_dying_process_stops_the_other(tmp_path, victim):
    results = _launch("die", tmp_path, str(victim), timeout=180)
    survivor = 1 - victim
    assert results[victim][0] == -9, results[victim]  # it SIGKILLed itself
    code, err, ended = results[survivor]
    died = float((tmp_path / "died_at").read_text())
    assert code != 0, err[-3000:]  # an error, not a clean exit
    # Heartbeat timeout 10 s (tests/multiprocess_worker.py): bounded, nowhere near a hang.
    assert ended - died < 60, (ended - died, err[-3000:])
    clear = ("another task died", "stopped sending heartbeats", "UNAVAILABLE", "Connection", "coordination")
    assert any(c.lower() in err.lower() for c in clear), err[-3000:]


def _rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_toy_trainer_as_two_processes_resumes_after_both_are_killed(parity_run, tmp_path):
    """train_toy.py on a 2 (data) x 4 (sequence) mesh, one row per process: both processes are
    SIGKILLed after step 3 (checkpoint of step 2 written), then resumed; the losses equal the
    uninterrupted run's and the 2-process / one-device losses of the parity run."""
    workdir, logs = tmp_path / "run", tmp_path
    killed = _train_toy(workdir, logs, "killed", JATTN_TOY_SIGKILL_AFTER_STEP="3")
    assert [r[0] for r in killed] == [-signal.SIGKILL] * 2, [r[2][-2000:] for r in killed]
    step_dir = workdir / "checkpoints" / "2"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
    assert (step_dir / "jattn_manifest.json").is_file()
    # orbax wrote the shards of both processes
    assert {p.name for p in (step_dir / "default").glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}
    assert (workdir / "train.lock").is_file() and (workdir / "train.lock.process-1").is_file()  # one lock each
    before = _rows(workdir)
    assert [r["step"] for r in before] == [1, 2, 3]  # process 0 alone writes metrics.jsonl

    resumed = _train_toy(workdir, logs, "resumed")
    for code, out, err, _ in resumed:
        assert code == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    assert "resumed from checkpoint at step 2" in resumed[0][1], resumed[0][1][-2000:]
    assert "resumed from" not in resumed[1][1]  # progress is printed by process 0 only
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    losses = [r["loss"] for r in rows]
    # the restored state is the saved one: step 3 reproduces the killed (uninterrupted) run
    np.testing.assert_allclose(losses[:3], [r["loss"] for r in before], rtol=0, atol=1e-6)
    ref = json.loads((parity_run / "trainer_0.json").read_text())
    np.testing.assert_allclose(losses, ref["two_processes"], rtol=1e-5)  # rows across processes there
    np.testing.assert_allclose(losses, ref["one_device"], rtol=1e-5)
    summary = json.loads((workdir / "summary.json").read_text())
    assert (summary["num_processes"], summary["num_devices"], summary["resumed_from_step"]) == (2, 8, 2), summary
    assert sorted((p.name for p in (workdir / "checkpoints").iterdir()), key=int) == ["2", "4"]


# The agreement logic, in this process, with the other process's answers simulated.


def _two_checkpoints(directory):
    from jattn.toy import checkpoint

    ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=3)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.arange(4.0) + step})
    return ckpt


def test_a_checkpoint_damaged_in_another_process_is_set_aside_in_all(tmp_path, monkeypatch, capsys):
    from jattn.toy import processes

    ckpt = _two_checkpoints(tmp_path / "checkpoints")
    verdicts = iter([1, 0, 0])  # process 1: step 2's files are damaged; then step 1 is fine there
    monkeypatch.setattr(processes, "gather", lambda code: [code, next(verdicts)])
    step, state = ckpt.restore_latest(like={"w": jnp.zeros(4)})
    ckpt.close()
    assert step == 1 and np.asarray(state["w"]).tolist() == [1.0, 2.0, 3.0, 4.0]  # the same choice as process 1
    assert (tmp_path / "damaged_checkpoints" / "2").is_dir()  # moved aside by process 0 (this one)
    assert "process(es) [1] found it damaged" in capsys.readouterr().err


def test_a_reading_failure_in_another_process_stops_this_one(tmp_path, monkeypatch):
    from jattn.toy import processes
    from jattn.toy.errors import TrainerError

    ckpt = _two_checkpoints(tmp_path / "checkpoints")
    monkeypatch.setattr(processes, "gather", lambda code: [code, 2])  # process 1 cannot go on
    with pytest.raises(TrainerError, match=r"reading checkpoint .*2 failed in process\(es\) \[1\]"):
        ckpt.restore_latest(like={"w": jnp.zeros(4)})
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]  # nothing moved


def test_a_failure_in_another_process_stops_all(monkeypatch):
    from jattn.toy import processes
    from jattn.toy.errors import TrainerError

    monkeypatch.setattr(processes, "gather", lambda code: [code, 0])
    with pytest.raises(TrainerError, match=r"locking the workdir failed in process\(es\) \[1\]"):
        processes.everywhere("locking the workdir", lambda: "locked")
    monkeypatch.setattr(processes, "gather", lambda code: [code, 1])
    assert processes.everywhere("locking the workdir", lambda: "locked") == "locked"


def test_one_workdir_lock_per_process_index(tmp_path):
    from jattn.toy import workdir_lock
    from jattn.toy.errors import TrainerError

    first, second = workdir_lock.lock_workdir(str(tmp_path), 0), workdir_lock.lock_workdir(str(tmp_path), 1)
    try:  # the processes of one run do not block each other; a second run's process 1 is blocked
        with pytest.raises(TrainerError, match=r"in use by another train_toy.py run \(pid \d+ on host .*, process 1"):
            workdir_lock.lock_workdir(str(tmp_path), 1)
    finally:
        first.close()
        second.close()
    assert (tmp_path / "train.lock.process-1").is_file()
