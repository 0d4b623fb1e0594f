"""Packaging (issue 11): the distribution name is not the unrelated PyPI placeholder ``fastsae``,
and the README says how to install it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fastsae

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "fastsae-lab"


def test_distribution_name_is_ours_and_the_import_name_stays():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION  # `fastsae` on PyPI is someone else's placeholder
    assert "filelock>=3.12" in project["dependencies"]
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "fastsae" in packages["packages"]
    assert fastsae.__version__ == project["version"]


def test_readme_install_section_names_the_distribution():
    readme = (ROOT / "README.md").read_text()
    # the first two commands stay first
    first = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines()
    assert first[0].startswith("make train") and first[1].startswith("make test")
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert f"pip install {DISTRIBUTION}" in install
    assert "download.pytorch.org/whl/cpu" in install  # the CPU torch first
    assert "pip install -e '.[dev]'" in install
    commands = [line.strip() for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
                for line in block.splitlines()]  # fmt: skip
    assert "pip install fastsae" not in commands


def test_every_subpackage_ships_in_the_distribution():
    # setuptools' explicit package list: a subpackage missing here works in an editable install
    # but is absent from `pip install fastsae-lab` (fastsae.parallel once was).
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(("fastsae", *p.parent.relative_to(ROOT / "fastsae").parts))
        for p in (ROOT / "fastsae").rglob("__init__.py")
    }
    on_disk.add("fastsae.kernels")  # kernels/ is installed as fastsae.kernels
    assert on_disk <= listed, sorted(on_disk - listed)


def test_the_kernels_directory_does_not_shadow_a_top_level_kernels_package(tmp_path):
    """From the repository root (on sys.path under ``python -m`` and pytest), ``import kernels``
    must reach Hugging Face's ``kernels`` (which transformers >= 5.25 imports) or fail as it would
    without this checkout; it must never load fastsae's kernels/ under that name."""
    import os
    import subprocess
    import sys

    root = ROOT
    # an installed "kernels" of its own, so the test does not depend on what pip resolved
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARK = 'installed'\n")
    probe = (
        "import kernels, fastsae.kernels as ours; "
        "print(getattr(kernels, 'MARK', None), kernels.__file__ != ours.__file__)"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(root), str(tmp_path / "site")]), "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["installed", "True"]
    # without one of its own: the environment's kernels (transformers >= 5.25 installs it), or,
    # without one, an empty module that imports cleanly (transformers < 5.25 imports it to look
    # for a version and must not fail)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import kernels; print(kernels.__file__, hasattr(kernels, '_here'))",
        ],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    file, searched = done.stdout.split()
    if Path(file).resolve().is_relative_to(root / "kernels"):
        assert searched == "True"  # this file under the bare name: it looked, and found none
