"""The built wheel imports whole on its own (an editable install finds subpackages in the
source tree whatever pyproject.toml lists; a wheel holds only what it lists)."""

import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

IMPORTS = """
import fastpbn, fastpbn.precise, fastpbn.bench, fastpbn.demo, fastpbn.kernels, fastpbn._csrc
import fastpbn.cli, fastpbn.models
assert fastpbn.__file__.startswith(WHEEL_DIR), fastpbn.__file__
assert fastpbn.kernels.__file__.startswith(WHEEL_DIR), fastpbn.kernels.__file__
from importlib import resources
assert resources.files("fastpbn._csrc").joinpath("stats.cu").is_file()
print("ok")
"""


def _clean_tree(dst: pathlib.Path) -> pathlib.Path:
    """The tracked files only: a checkout's build/ and *.egg-info (left by the editable
    install) would put files in the wheel that its configuration does not."""
    try:
        files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                               check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def test_wheel_imports_whole(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    # --no-build-isolation builds with this environment's setuptools: the build-system table
    # wants >= 77 (PEP 639 license fields), which pip's isolated builds fetch themselves
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 here (pyproject's build-system)")
    tree = _clean_tree(tmp_path / "src")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(tree)],
        capture_output=True, text=True, timeout=300,
    )
    # only a missing build tool (setuptools, wheel) skips; fastpbn's own errors fail
    if out.returncode != 0 and re.search(
            r"No module named '(setuptools|wheel)|invalid command 'bdist_wheel'", out.stderr):
        pytest.skip(f"cannot build a wheel here: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    wheel = next(tmp_path.glob("fastpbn-*.whl"))
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    meta = next(unpacked.glob("fastpbn-*.dist-info"))
    assert "License-Expression: Apache-2.0" in (meta / "METADATA").read_text()
    assert (meta / "licenses" / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    # -S: no site processing, so the editable install's path hook cannot serve the source
    # tree; the wheel's directory first, then where torch lives
    path = [str(unpacked), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    code = f"WHEEL_DIR = {str(unpacked)!r}\n" + IMPORTS
    run = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": ":".join(path)}, timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
