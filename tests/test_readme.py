"""The README's "use it from your own JAX code" example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README lost its Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["logits"].shape[0] == 1 and namespace["y"].shape == (2, 16, 8)


def test_readme_first_lines_are_the_setup_commands():
    head = README.read_text().splitlines()[:8]
    assert any('pip install -e ".[dev]"' in line for line in head)
    assert any("python scripts/pretrain.py --preset smoke" in line for line in head)
    assert any(line.startswith("pytest") for line in head)


def test_readme_stays_short():
    # Under 12,000 characters: install, use and results first; the history lives in benchmarks/.
    assert len(README.read_bytes()) < 12_000
