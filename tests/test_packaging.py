"""What an installed shrink needs ships in its wheel: every file the kernel and runtime builds read (found by
following the build code's own includes, not a hand list) and the built-in task's data."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from shrink.evaluate import builtin_task
from shrink.quant.kernels import native

pytestmark = pytest.mark.slow  # subprocesses, real models or builds: run by CI, not the fast loop

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def _needed() -> set[str]:
    builds = [[native.SOURCE, native.VNNI_SOURCE, native.DECODER_SOURCE]]  # the one extension module
    files = {p for sources in builds for p in native.build_inputs(sources)}
    files |= {SRC / "shrink" / "data" / name for name in builtin_task.DATA_FILES}
    return {p.resolve().relative_to(SRC).as_posix() for p in files}


def test_build_inputs_follow_includes_and_name_a_missing_one(tmp_path):
    needed = _needed()
    # the tiled loops are only reached through two levels of includes: the case a hand list once missed
    assert "shrink/quant/kernels/tiled_core.inc" in needed and "shrink/quant/kernels/qgemm_avx2.h" in needed
    (tmp_path / "a.cpp").write_text('#include "b.h"\n#include <vector>\n')
    (tmp_path / "b.h").write_text('  # include "gone.inc"\n')
    with pytest.raises(FileNotFoundError, match=r"b\.h: includes 'gone\.inc'"):
        native.build_inputs([tmp_path / "a.cpp"])


def test_the_wheel_holds_every_file_the_builds_read(tmp_path):
    # built from a clean copy: an editable install's egg-info lists files the package data may not name
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                              "__pycache__", "results"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(tree)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("shrink-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_needed() - names)
    assert not missing, f"{wheel.name} lacks {missing}"
