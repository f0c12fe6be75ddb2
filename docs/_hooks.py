"""MkDocs hook: publish the committed benchmark plots (``benchmarks/results/*.png``) with the
site under ``results/``, so the pages show the files the benchmark scripts wrote, not copies."""

from __future__ import annotations

import pathlib

from mkdocs.structure.files import File

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def on_files(files, config):
    for png in sorted(RESULTS.rglob("*.png")):
        rel = png.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, f"results/{rel}", abs_src_path=str(png)))
    return files
