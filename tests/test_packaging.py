"""Packaging: what importing jattn pulls in, import cycles, one version string, the wheel.

Every module of the library (everything under ``jattn/`` except the toy trainer) is imported
ALONE in a fresh interpreter: a cycle between two modules fails there even when importing the
package in the usual order hides it. Modules are discovered from the source tree, so new ones
are covered without editing this file.
"""

import email
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest
from dotted_paths import resolve

import jattn

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The toy trainer's dependencies (the `toy` extra): the library must never import them.
TRAINER_ONLY = ("optax", "orbax", "matplotlib", "tqdm", "ml_collections", "absl")

_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
top = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps(top))
"""


def _library_modules() -> list[str]:
    """Every module and subpackage under jattn/, except the toy trainer (``jattn.toy``)."""
    names = []
    for path in sorted((ROOT / "jattn").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1 and parts[1] == "toy":
            continue
        names.append(".".join(parts))
    return names


def _imports_of(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The jattn modules ``path`` imports anywhere in its body (late imports inside functions
    included: they hide a cycle, they do not remove it); a package's own ``__init__`` is not an
    edge (it imports everything by design)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules and n != "jattn" and not (path.name == "__init__.py"
                                                                              and path.parent.name == n.split(".")[-1])}
    return found


def test_no_import_cycle_between_library_modules():
    modules = set(_library_modules())
    path_of = {m: ROOT / (m.replace(".", "/") + ".py") for m in modules}
    for m in modules:
        if not path_of[m].exists():
            path_of[m] = ROOT / m.replace(".", "/") / "__init__.py"
    graph = {m: _imports_of(path_of[m], modules) for m in modules}
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for n in sorted(graph[m]):
            visit(n)
        stack.pop()
        done.add(m)

    for m in sorted(modules):
        visit(m)
    assert "jattn.dispatch" not in graph["jattn.multihead"]  # the core knows nothing of dispatch


def _top_level_imports(*modules: str) -> set[str]:
    """Top-level package names in ``sys.modules`` after importing ``modules`` in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, f"importing {modules} alone failed:\n{proc.stderr[-3000:]}"
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def flax_baseline() -> set[str]:
    """What Flax's own module systems import (Flax itself requires optax and absl)."""
    return _top_level_imports("flax.nnx", "flax.linen")


def test_library_module_list_is_complete():
    modules = _library_modules()
    for expected in ("jattn", "jattn.nnx", "jattn.linen", "jattn.multihead", "jattn.dispatch"):
        assert expected in modules
    assert not any(m.startswith("jattn.toy") for m in modules)


@pytest.mark.parametrize("module", _library_modules())
def test_module_imports_alone_without_trainer_dependencies(module, flax_baseline):
    imported = _top_level_imports(module)
    assert "jattn" in imported
    if module in ("jattn.nnx", "jattn.linen"):
        assert "flax" in imported
        extra = {m for m in TRAINER_ONLY if m in imported} - flax_baseline
        assert not extra, f"{module} imports {sorted(extra)} beyond what Flax itself imports"
    else:
        # The attention library needs JAX only: no trainer dependency and no Flax.
        unwanted = sorted(m for m in TRAINER_ONLY + ("flax",) if m in imported)
        assert not unwanted, f"{module} imports {unwanted}"


def test_flax_modules_without_flax_name_the_extra():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = "import sys; sys.modules['flax'] = None\nimport jattn.nnx"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "pip install 'jattn[flax]'" in proc.stderr


def test_one_version_string():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "jattn.__version__" }' in pyproject
    assert isinstance(jattn.__version__, str) and jattn.__version__.count(".") == 2
    assert (ROOT / "jattn" / "py.typed").exists()


def test_ci_runs_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && python -m pytest -n 2"
    assert command in readme
    assert "pip install -e '.[toy]' && python train_toy.py" in readme
    assert f"#   {command}" in ci
    for step in ("python3 -m venv .venv", ". .venv/bin/activate", "pip install -e '.[test]'", "python -m pytest -n 2"):
        assert step in ci.split("set -euo pipefail", 1)[1], step


def test_wheel_builds_with_py_typed_and_lean_requirements(tmp_path):
    """``pip wheel`` on a copy of the source (the worktree stays clean for parallel tests)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "jattn", src / "jattn", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("jattn-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(zf.read(meta_name))
    assert "jattn/py.typed" in names
    assert {"jattn/__init__.py", "jattn/multihead.py", "jattn/nnx.py", "jattn/toy/train.py"} <= names
    assert meta["Version"] == jattn.__version__
    required = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(r.split(">")[0].split("=")[0].strip() for r in required) == ["jax", "jaxlib"]
    extras = set(meta.get_all("Provides-Extra"))
    assert {"flax", "toy", "test"} <= extras


# Paths the package had before its files were grouped by layer; none may come back as an alias.
OLD_PATHS = ("attention", "masks", "_checks", "_finite", "spec", "blockwise", "chunked", "decode", "paged",
             "_score_tiles", "ring", "ulysses", "sequence_parallel", "context_parallel")


def test_every_loaded_jattn_module_is_its_own_file():
    """No module alias: every ``jattn.*`` entry of ``sys.modules`` is the module of that name, and
    the old flat paths (``jattn.ring``, ``jattn.paged``, ...) do not import."""
    import importlib

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = ("import json, sys, jattn, jattn.nnx, jattn.linen\n"
            "print(json.dumps({k: m.__name__ for k, m in sys.modules.items() if k.startswith('jattn')}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    aliases = {k: v for k, v in loaded.items() if k != v}
    assert not aliases, f"module aliases in sys.modules: {aliases}"
    for name in OLD_PATHS:
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"jattn.{name}")
    # The documented namespaces stay: the seed formula is the function, the masks the core's module.
    assert callable(jattn.attention) and jattn.masks.__name__ == "jattn.core.masks"


def _documented_paths() -> dict[str, set[str]]:
    """``jattn.a.b`` dotted names and ``jattn/a/b.py`` file paths written in README, docs/,
    examples/ and benchmarks/ (prose, code blocks, imports and mkdocstrings directives)."""
    import re

    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "examples").glob("*.py")),
             *sorted((ROOT / "benchmarks").glob("*.py"))]
    found: dict[str, set[str]] = {}
    for f in files:
        text = f.read_text()
        names = set(re.findall(r"(?<![\w/.])jattn(?:\.[A-Za-z_]\w*)+", text))
        names |= {f"{m}.{n}" for m, ns in re.findall(r"from (jattn(?:\.\w+)*) import \(?([\w ,]+)", text)
                  for n in (x.strip().split(" as ")[0] for x in ns.split(",")) if n}
        names |= set(re.findall(r"(?<![\w/.])jattn/[\w/]+\.py\b", text))
        for n in names:
            found.setdefault(n, set()).add(str(f.relative_to(ROOT)))
    return found


def _resolves(path: str) -> bool:
    if "/" in path:
        return (ROOT / path).exists()
    try:
        resolve(path)
    except (ImportError, AttributeError):
        return False
    return True


def test_documented_module_paths_import():
    """Every ``jattn.x.y`` the README, docs, examples and benchmarks name imports (or is an
    attribute of what imports), and every ``jattn/x.py`` they name exists."""
    found = _documented_paths()
    assert "jattn.parallel.ring.to_layout" in found and "jattn.dot_product_attention" in found
    labels = {"jattn.dpa"}  # a benchmark's column name (dot_product_attention), not a path
    broken = {p: sorted(w) for p, w in found.items() if p not in labels and not _resolves(p)}
    assert not broken, f"documented paths that do not import / exist: {broken}"
