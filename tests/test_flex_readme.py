"""The README's flex_attention examples run as written (one namespace, top to bottom)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_flex_examples_run():
    text = README.read_text()
    section = text.split("## Programmable attention", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["d_slopes"].shape == (4,)
    assert float(abs(namespace["d_slopes"]).max()) > 0
