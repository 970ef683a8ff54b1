"""The README stays true: its Python examples run, and every flag it names exists."""
import re
from pathlib import Path

import pytest

from rlaux_fast.config import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
# Flags of other commands the README shows (compare, report, torchrun, pip, pytest).
OTHER_FLAGS = {"--methods", "--seeds", "--standalone", "--nproc_per_node", "--nnodes", "--rdzv_backend",
               "--rdzv_endpoint", "--rdzv_id", "--benchmark-only", "--no-deps", "--paper-subset", "--no-compiled",
               "--help"}


@pytest.mark.parametrize("index", range(len(re.findall(r"```python\n", README))))
def test_python_examples_run(index):
    code = re.findall(r"```python\n(.*?)```", README, re.S)[index]
    exec(compile(code, f"README.md python example {index + 1}", "exec"), {})


def test_every_flag_the_readme_names_exists():
    known = {option for action in build_parser()._actions for option in action.option_strings}
    known |= {"--no-" + o[2:] for o in known}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", README))
    assert named - known - OTHER_FLAGS == set()
