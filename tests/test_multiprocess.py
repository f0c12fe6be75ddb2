"""Real multi-process runs: 2 processes x 4 CPU devices on localhost (``jax.distributed`` with
gloo collectives), launched from here with a free port, bounded time, and both processes
always reaped. The work itself is in tests/multiprocess_worker.py: ring and Ulysses parity,
the toy trainer's steps on a data x sequence mesh across both processes, and a process that
dies mid-run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, out_dir, *extra: str, timeout: float = 240):
    """Start both processes, wait (bounded) for both, kill whatever is left; returns
    [(returncode, stderr, time.time() when it ended)] for process 0 and 1."""
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # the worker sets 4 devices per process itself
    start = time.time()
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, mode, str(i), "2", str(port), str(out_dir), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    results = [None, None]
    try:
        deadline = start + timeout
        while any(r is None for r in results):
            for i, p in enumerate(procs):
                if results[i] is None and p.poll() is not None:
                    results[i] = (p.returncode, p.stderr.read(), time.time())
            if time.time() > deadline:
                pytest.fail(f"{mode}: the processes did not finish within {timeout} s: {results}")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
            p.stdout.close()
            p.stderr.close()
    return results


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
        assert len(r["two_processes"]) == 3 and r["two_processes"] == reports[0]["two_processes"], reports
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
