"""Wall time and accuracy of ``train_toy.py`` runs, as the README reports them.

    python benchmarks/toy_timings.py                 # copy task, seeds 0-3, configs/reverse.py,
                                                     # configs/tiny.py on 8 simulated devices

Each run is a fresh process (``python train_toy.py --workdir=<tmp> ...``): its wall time is
measured around the whole process (imports, compilation, the start-up gradient check,
training, evaluations, plots), and its ``summary.json`` and evaluation rows of
``metrics.jsonl`` are kept. Writes ``benchmarks/results/toy_timings.json`` and the first run's
console output to ``benchmarks/results/toy_copy.log``. On a shared machine the wall times
include waiting for the CPU: the JSON records the load average at the start of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def run(name: str, flags: list[str], workdir: str, devices: int = 0) -> tuple[dict, str]:
    env = dict(os.environ)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_toy.py"), f"--workdir={workdir}", *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [{k: v for k, v in row.items() if k == "step" or k.startswith("eval/")}
                 for row in map(json.loads, f) if "eval/seq_accuracy" in row]
    record = {"name": name, "flags": flags, "simulated_devices": devices, "process_wall_seconds": round(wall, 1),
              "load_average_at_start": round(load, 2), "summary": summary, "evaluations": evals}
    print(f"{name:24s} process wall {wall:6.1f} s  run {summary['wall_seconds']:6.1f} s  "
          f"seq_accuracy {summary['seq_accuracy']:.4f}  (load {load:.1f})", flush=True)
    return record, proc.stdout + proc.stderr


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--no-reverse", action="store_true")
    p.add_argument("--no-mesh", action="store_true", help="skip configs/tiny.py on 8 simulated devices")
    args = p.parse_args()
    seeds = [(f"copy seed {s}", [f"--config.seed={s}"] if s else [], 0) for s in args.seeds]
    jobs = seeds[:1]
    if not args.no_reverse:
        jobs.append(("reverse seed 0", [f"--config={os.path.join(ROOT, 'configs', 'reverse.py')}"], 0))
    if not args.no_mesh:
        tiny = f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}"
        jobs.append(("tiny 2x4 data x sequence", [tiny, "--config.mesh.data=2", "--config.mesh.sequence=4"], 8))
        jobs.append(("tiny 8x1 data parallel", [tiny, "--config.mesh.data=8", "--config.mesh.sequence=1"], 8))
    jobs += seeds[1:]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, flags, devices) in enumerate(jobs):
            record, console = run(name, flags, os.path.join(tmp, f"run{i}"), devices)
            records.append(record)
            if i == 0:
                with open(os.path.join(RESULTS, "toy_copy.log"), "w") as f:
                    f.write(console)
            with open(os.path.join(RESULTS, "toy_timings.json"), "w") as f:  # after every run
                json.dump({"cpu_count": os.cpu_count(), "complete": i == len(jobs) - 1, "runs": records}, f, indent=1)
    print(f"wrote {os.path.join(RESULTS, 'toy_timings.json')}")


if __name__ == "__main__":
    main()
