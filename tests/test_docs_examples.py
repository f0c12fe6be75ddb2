"""The documentation cannot rot: every ```python block of README.md and docs/*.md runs, and the
site builds with ``mkdocs build --strict``.

The blocks of one file run in order in one namespace (a later block may use an earlier one's
names), like a reader following the page. A block preceded by ``<!-- test: devices=8 -->`` runs
on its own (a fresh namespace) with 8 simulated CPU devices (sequence parallelism); the
8-device blocks of a page share one interpreter, started once for them;
``<!-- test: skip (reason) -->`` skips one, and only a block that truly cannot run on a CPU
should carry it.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
_BLOCK = re.compile(r"(?:<!--\s*test:\s*(?P<opts>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)^```", re.S | re.M)


def blocks(page: pathlib.Path) -> list[tuple[int, str, str]]:
    """``(line, options, code)`` of every python block of ``page``."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start("code")) + 1, m.group("opts") or "", m.group("code"))
            for m in _BLOCK.finditer(text)]


def test_blocks_are_found():
    assert len(blocks(ROOT / "README.md")) >= 3
    found = blocks(ROOT / "README.md")
    assert all(code.strip() for _, _, code in found)
    assert len(PAGES) >= 8, PAGES  # README and the docs pages


# Runs each 8-device block (argv: where, code, where, code, ...) in a fresh namespace.
_RUN_EACH = """
import sys
args = sys.argv[1:]
for where, code in zip(args[::2], args[1::2]):
    exec(compile(code, where, "exec"), {"__name__": "__docs__"})
"""


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace = {"__name__": "__docs__"}
    on_8_devices = []
    for line, opts, code in blocks(page):
        where = f"{page.relative_to(ROOT)}:{line}"
        if opts.startswith("skip"):
            assert "(" in opts, f"{where}: a skipped block must say why: <!-- test: skip (reason) -->"
            continue
        if opts == "devices=8":
            on_8_devices += [where, code]
            continue
        assert opts == "", f"{where}: unknown test option {opts!r}"
        exec(compile(code, where, "exec"), namespace)  # noqa: S102 -- the examples are ours
    if on_8_devices:
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
                   PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, "-c", _RUN_EACH, *on_8_devices], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, f"{page.relative_to(ROOT)}: a block failed on 8 devices:\n{proc.stderr[-4000:]}"


def test_mkdocs_build_strict(tmp_path):
    """The site builds without a warning (broken links, bad docstrings, missing pages); offline."""
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    site = tmp_path / "site"
    for page in ("index.html", "api/core/index.html", "benchmarks/index.html"):
        assert (site / page).exists(), page
    api = (site / "api" / "core" / "index.html").read_text()
    assert "dot_product_attention" in api and "Returns" in api  # rendered from the docstrings
