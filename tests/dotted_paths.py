"""Resolve a documented dotted path (``jattn.core.spec.check_arrays``) to the object it names."""

import importlib


def resolve(path: str):
    """The object at ``path``: the longest importable module prefix, then attributes.

    Raises ImportError when no prefix imports and AttributeError when an attribute is missing.
    """
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)
