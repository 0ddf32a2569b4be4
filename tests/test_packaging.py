"""Packaging metadata and the sdist, checked in seconds from this checkout (the slow flows, pip
install . / python -m build / make demo on Debian's Python, are .ci/packaging): the sdist carries
every csrc/ source and no tests, the package requires exactly the torch it was built against, the
license is an SPDX expression (no setuptools deprecation warning), and a build without torch says
how to get it."""
import os
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_SUFFIXES = (".c", ".h", ".cpp", ".cu", ".cuh")


def csrc_sources():
    found = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for name in files:
            if name.endswith(SOURCE_SUFFIXES):
                found.add(os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, "/"))
    return found


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist of this checkout, built by setup.py (no isolation: the running torch)."""
    out = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out), "sdist", "-d", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    (archive,) = out.glob("softmoe-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    members = {name.split("/", 1)[1] for name in names if "/" in name}
    return members, pkg_info, proc.stdout + proc.stderr


def test_sdist_carries_every_csrc_source_and_no_tests(sdist):
    members, _, _ = sdist
    sources = csrc_sources()
    assert sources and any(name.endswith(".cuh") for name in sources)
    assert sources <= members, sorted(sources - members)
    assert {"setup.py", "pyproject.toml", "README.md", "LICENSE", "softmoe/_extension.py"} <= members
    assert not any(name.startswith("tests/") for name in members)


def test_metadata_pins_the_build_torch_and_uses_an_spdx_license(sdist):
    _, pkg_info, output = sdist
    assert f"Requires-Dist: torch=={torch.__version__.split('+')[0]}\n" in pkg_info
    assert "Dynamic: requires-dist" in pkg_info  # a wheel built from the sdist pins its own torch
    assert "License-Expression: Apache-2.0" in pkg_info
    assert "License-File: LICENSE\n" in pkg_info  # the text, and the bundled demo text's licence
    assert "License-File: softmoe/data/LICENSE-python-docs.txt\n" in pkg_info
    assert "license" not in output.lower(), output  # setuptools' deprecation of the license table


def test_build_without_torch_says_how_to_get_it():
    code = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; exec(open('setup.py').read())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "softmoe's build needs torch in the build environment" in proc.stderr
    assert "--no-build-isolation" in proc.stderr and "pip install torch==" in proc.stderr
