"""metrics.jsonl (one JSON object per logged step) and summary.json."""

from __future__ import annotations

import json
import os


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Appends rows to ``metrics.jsonl``; a resumed run first drops rows after its checkpoint.

    The steps after the checkpoint are trained again, so their rows would otherwise appear
    twice. Rows are flushed as they are written, so a killed run loses at most the line
    being written (an unterminated last line is dropped on resume too).
    """

    def __init__(self, path: str, *, resume_step: int):
        self.path = path
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                lines = [line for line in f if line.endswith("\n")]
            kept = [line for line in lines if json.loads(line)["step"] <= resume_step]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)  # atomic: a kill here cannot lose the kept rows

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return read_jsonl(self.path)


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` as JSON via a temporary file and a rename, so readers never see half of it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
