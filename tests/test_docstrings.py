"""One docstring convention for the public API: every object the API reference renders
(``::: jattn.x`` in docs/api/*.md, and the public members of a module rendered whole) has a
Google-style docstring with ``Args:`` and ``Returns:`` (functions) or ``Attributes:`` /
``Args:`` (classes), so that mkdocstrings shows parameters and shapes the same way everywhere."""

import inspect
import pathlib
import re

import pytest
from dotted_paths import resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _documented():
    """(name, object) of everything the API reference renders."""
    found = {}
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        for path in re.findall(r"^::: (\S+)", page.read_text(), flags=re.M):
            obj = resolve(path)
            if inspect.ismodule(obj):
                names = getattr(obj, "__all__", None) or [n for n in vars(obj) if not n.startswith("_")]
                for n in names:
                    member = getattr(obj, n)
                    if (inspect.isfunction(member) or inspect.isclass(member)) and member.__module__ == obj.__name__:
                        found[f"{path}.{n}"] = member
            else:
                found[path] = obj
    return sorted(found.items())


DOCUMENTED = _documented()


def test_the_reference_renders_the_public_api():
    names = {n for n, _ in DOCUMENTED}
    for expected in ("jattn.dot_product_attention", "jattn.decode_attention", "jattn.flex_attention",
                     "jattn.ring_attention", "jattn.core.masks.causal_mask", "jattn.kernels.paged.append",
                     "jattn.flex.mods.alibi", "jattn.nnx.MultiHeadAttention"):
        assert expected in names


@pytest.mark.parametrize("name, obj", DOCUMENTED, ids=[n for n, _ in DOCUMENTED])
def test_google_style_docstring(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"{name}: no docstring"
    if inspect.isclass(obj):
        assert "Attributes:" in doc or "Args:" in doc, f"{name}: expected an Attributes: or Args: section"
        return
    params = [p for p in inspect.signature(obj).parameters.values()]
    if params:
        assert "\nArgs:\n" in doc, f"{name}: expected an Args: section"
        args = doc.split("\nArgs:\n", 1)[1]
        for p in params:  # every parameter is described (``*masks`` as written; ``a, b:`` names several)
            star = "*" * (p.kind == p.VAR_POSITIONAL) + "**" * (p.kind == p.VAR_KEYWORD)
            entry = rf"^\s+([\w*]+, )*{re.escape(star + p.name)}(, [\w*]+)*:"
            assert re.search(entry, args, flags=re.M), f"{name}: {p.name} undocumented"
    assert "\nReturns:\n" in doc, f"{name}: expected a Returns: section"
