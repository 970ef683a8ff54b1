"""A regular (non-editable) install carries kernels/ as rlaux_fast.kernels and the console script.

The editable install the tests run under maps the folders in place; this builds the wheel a user gets
from `pip install .`, installs it into a folder of its own and imports from there."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILES = {p.name for p in (ROOT / "kernels").glob("*.py")}


def test_wheel_install_imports_the_kernels_and_has_the_console_script(tmp_path):
    # Built from a copy of the sources, so that no build/ folder is left in (or reused from) the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("rlaux_fast", "kernels"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    # --no-build-isolation: setuptools and wheel come with the dev extra, so no network is needed.
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("rlaux_fast-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert {f"rlaux_fast/kernels/{name}" for name in KERNEL_FILES} <= names
    assert not any(n.startswith("kernels/") for n in names)  # only under its package name
    assert "rlaux-fast = rlaux_fast.train:main" in entry_points

    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    probe = ("import rlaux_fast.kernels as k, rlaux_fast.train; "
             "print(k.__file__); print(callable(k.multihead_focal_loss) and callable(k.gae) and callable(k.ppo_clip_loss))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    where, ok = out.stdout.split()
    assert Path(where).resolve().is_relative_to(target.resolve()) and ok == "True"
