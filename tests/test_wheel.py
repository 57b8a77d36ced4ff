"""The package as users get it from an index: the wheel holds every module and the data the
code reads at run time (the digits classifier behind the default's digits_fd)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "diffusion_jax"


def test_the_wheel_holds_every_module_and_the_package_data(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("diffusion_jax-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert "diffusion_jax/evaluation/digits_classifier.msgpack" in names
    data = zipfile.ZipFile(wheel).read("diffusion_jax/evaluation/digits_classifier.msgpack")
    assert data == (PACKAGE / "evaluation" / "digits_classifier.msgpack").read_bytes()
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]
