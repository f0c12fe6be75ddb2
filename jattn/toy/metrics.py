"""metrics.jsonl (one JSON object per logged step) and summary.json."""

from __future__ import annotations

import json
import os
import shutil

from jattn.toy.errors import TrainerError, warn


def _parse_row(line: str) -> dict | None:
    """The metrics row on ``line``, or None if it is not a JSON object with an int ``step``."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        return None
    return row


def read_jsonl(path: str) -> list[dict]:
    """Every row of a metrics file; raises ``TrainerError`` naming the first bad line."""
    rows = []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = _parse_row(line)
            if row is None:
                raise TrainerError(f"{path} line {number} is not a metrics row: {line[:80]!r}")
            rows.append(row)
    return rows


class MetricsLog:
    """Appends rows to ``metrics.jsonl``; a resumed run first drops rows after its checkpoint.

    The steps after the checkpoint are trained again, so their rows would otherwise appear
    twice. Rows are flushed as they are written, so a killed run loses at most the line
    being written (an unterminated last line is dropped on resume too). A line that is not a
    metrics row (a damaged file) is dropped with a warning; the file as it was is kept as
    ``metrics.jsonl.damaged``.
    """

    def __init__(self, path: str, *, resume_step: int):
        self.path = path
        kept, bad = [], []
        if os.path.exists(path):
            with open(path, errors="replace") as f:  # undecodable bytes make a bad line, not a crash
                lines = [line for line in f if line.endswith("\n")]
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                row = _parse_row(line)
                if row is None:
                    bad.append(f"line {number} {line[:60]!r}")
                elif row["step"] <= resume_step:
                    kept.append(line)
        if bad:
            shutil.copyfile(path, path + ".damaged")
            warn(f"{path}: dropped {len(bad)} line(s) that are not metrics rows ({'; '.join(bad[:3])}); "
                 f"the file as it was is kept as {path}.damaged")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)  # atomic: a kill here cannot lose the kept rows

    def append(self, row: dict) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise TrainerError(
                f"cannot append to {self.path} ({e.strerror or e}); the newest checkpoint is intact: "
                "free disk space (or fix the file's permissions) and run again to resume"
            ) from None

    def rows(self) -> list[dict]:
        return read_jsonl(self.path)


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` as JSON via a temporary file and a rename, so readers never see half of it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json_object(path: str, what: str) -> dict:
    """The JSON object in ``path``; raises ``TrainerError`` naming the file and ``what`` to do."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise TrainerError(f"{path} is not valid JSON ({e}); {what}") from None
    if not isinstance(obj, dict):
        raise TrainerError(f"{path} does not hold a JSON object (got {type(obj).__name__}); {what}")
    return obj
