"""The README's Python examples run as written (in order, in one namespace, as a reader would paste them)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
#: examples that need several processes run as ``torchrun -m foveal.examples.context_parallel`` (tests/test_distributed.py)
MULTI_PROCESS = ("cp.init(", "torchrun")


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 4


def test_every_single_process_example_runs_as_written(capsys):
    namespace = {}
    ran = 0
    for i, block in enumerate(BLOCKS):
        if any(marker in block for marker in MULTI_PROCESS):
            continue
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block that failed
            pytest.fail(f"README python block {i + 1} raised {type(e).__name__}: {e}\n{block}")
        ran += 1
    assert ran >= 4
