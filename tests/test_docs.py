"""The documentation runs: every Python block of docs/api.md, docs/design.md and the README's
library example is executed (each file's blocks in order, as one script, in a temporary
directory), and the docstring examples of the public API modules pass as doctests."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown file, in order."""
    return python_blocks_of(path.read_text())


def python_blocks_of(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


@pytest.fixture
def run_blocks(tmp_path, monkeypatch, capsys):
    """Run blocks as one script (a notebook's cells) in ``tmp_path``; return what they print.

    Components the blocks register are removed afterwards, so other tests see only the
    built-in ones.
    """
    from mtlcv.registry import ALL

    monkeypatch.chdir(tmp_path)
    for reg in ALL.values():
        reg.names()  # load the built-ins first, so they are part of what is restored
    saved = {kind: dict(reg._entries) for kind, reg in ALL.items()}

    def run(blocks: list[str], name: str) -> str:
        namespace: dict = {"__name__": f"docs_{name}"}
        for i, code in enumerate(blocks):
            exec(compile(code, f"{name} block {i + 1}", "exec"), namespace)  # noqa: S102
        return capsys.readouterr().out

    yield run
    for kind, reg in ALL.items():
        reg._entries.clear()
        reg._entries.update(saved[kind])


def test_api_md_examples_run(run_blocks, tmp_path):
    blocks = python_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) >= 5
    out = run_blocks(blocks, "api_md")
    # the whole-experiment example wrote a real, resumed run directory
    assert (tmp_path / "runs" / "api-example" / "results.json").is_file()
    assert "config key 'optim.lr'" in out


def test_readme_library_example_runs_and_is_short(run_blocks):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in python_blocks_of(section) if "create_balancer" in b]
    assert len(blocks) == 1, "the README shows one training-loop example"
    code = [line for line in blocks[0].splitlines() if line.strip()]
    assert len(code) <= 20, f"the README's example has {len(code)} lines"
    out = run_blocks(blocks, "readme")
    assert "'semseg'" in out and "'miou'" in out

def test_design_md_worked_examples_run(run_blocks):
    from mtlcv.registry import ARCHS, BALANCERS

    blocks = python_blocks(ROOT / "docs" / "design.md")
    assert len(blocks) >= 4
    out = run_blocks(blocks, "design_md")
    assert "'brightness': {'mae'" in out
    assert "hps-adapters" in ARCHS and "equal-norm" in BALANCERS  # registered while it ran


def test_worked_examples_leave_the_registries_as_they_were():
    from mtlcv.registry import ARCHS, BALANCERS, DATASETS, TASKS

    for reg, name in ((TASKS, "brightness"), (DATASETS, "blobs"), (ARCHS, "hps-adapters"),
                      (BALANCERS, "inverse-loss")):
        assert name not in reg


@pytest.mark.parametrize("module", ["mtlcv.api", "mtlcv.config_docs"])
def test_docstring_examples(module):
    import importlib

    mod = importlib.import_module(module)
    result = doctest.testmod(mod)
    assert result.attempted >= 2 and result.failed == 0


def test_no_docstring_points_to_a_missing_guide():
    """Docstrings point to docs/ in the repository, not to a GUIDE.md it does not hold."""
    for path in (ROOT / "src").rglob("*.py"):
        assert "GUIDE.md" not in path.read_text(), path
    for ref in ("docs/design.md", "docs/api.md"):
        assert (ROOT / ref).is_file()
