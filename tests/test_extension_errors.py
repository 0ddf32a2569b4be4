"""A missing or unloadable compiled extension is reported plainly, with the advice for its case:
a source tree that was never built, a folder that shadows an installed copy, an incomplete
installed copy, a library that does not load. Each case imports a copy of softmoe's Python files
in a fresh interpreter that sees no other softmoe than the ones the test puts on its path."""
import importlib.machinery
import os
import shutil
import subprocess
import sys

from softmoe import _extension

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
# Only the standard finders (an editable install's finder would find the real build) and only the
# sys.path entries that hold no softmoe package, then the test's own folders.
IMPORT = """
import importlib.machinery as m, os, sys
sys.meta_path[:] = [f for f in sys.meta_path if f in (m.BuiltinImporter, m.FrozenImporter, m.PathFinder)]
sys.path[:] = sys.argv[1:] + [p for p in sys.path if p and not os.path.isdir(os.path.join(p, "softmoe"))]
import softmoe
"""


def copy_package(root):
    """softmoe's Python files (no build) in root/softmoe."""
    package = root / "softmoe"
    package.mkdir(parents=True)
    for name in os.listdir(_extension.PACKAGE_DIR):
        if name.endswith(".py"):
            shutil.copy(os.path.join(_extension.PACKAGE_DIR, name), package / name)
    return package


def make_source_tree(root):
    package = copy_package(root)
    (root / "setup.py").write_text("")
    (root / "csrc").mkdir()
    return package


def fake_installed_copy(site):
    """A folder the import system would take for an installed softmoe with a build (never loaded)."""
    package = site / "softmoe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / f"_C{SUFFIX}").write_bytes(b"")
    return package


def import_error(*path):
    proc = subprocess.run([sys.executable, "-c", IMPORT, *map(str, path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: "), proc.stderr
    assert "circular import" not in proc.stderr and "partially initialized" not in proc.stderr
    return last


def test_source_tree_without_a_build(tmp_path):
    make_source_tree(tmp_path / "tree")
    msg = import_error(tmp_path / "tree")
    assert "this source tree was never built" in msg and "make setup" in msg
    assert "pip install --no-build-isolation -e ." in msg and str(tmp_path / "tree") in msg


def test_source_tree_shadowing_an_installed_copy(tmp_path):
    make_source_tree(tmp_path / "tree")
    installed = fake_installed_copy(tmp_path / "site")
    msg = import_error(tmp_path / "tree", tmp_path / "site")
    assert f"shadows the installed softmoe at {installed}" in msg
    assert "run Python from another directory" in msg
    assert "-e ." not in msg  # an editable install would replace the installed copy: not the advice


def test_incomplete_installed_copy(tmp_path):
    copy_package(tmp_path / "site")
    msg = import_error(tmp_path / "site")
    assert "not a source tree" in msg and "Reinstall it" in msg


def test_library_that_does_not_load(tmp_path):
    package = make_source_tree(tmp_path / "tree")
    (package / f"_C{SUFFIX}").write_bytes(b"not a shared library")
    msg = import_error(tmp_path / "tree")
    assert f"compiled extension {package / ('_C' + SUFFIX)} does not load" in msg
    assert "compiled against" in msg and "pip install --no-build-isolation -e ." in msg


def test_installed_copies_sees_path_entries_and_other_finders(tmp_path):
    ours = copy_package(tmp_path / "ours")
    installed = fake_installed_copy(tmp_path / "site")
    editable = fake_installed_copy(tmp_path / "editable")
    unbuilt = copy_package(tmp_path / "unbuilt")

    class EditableFinder:  # what setuptools' editable install adds to sys.meta_path
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "softmoe":
                return None
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(editable)]
            return spec

    search = [str(tmp_path / "ours"), str(tmp_path / "site"), str(unbuilt.parent), str(tmp_path / "missing")]
    found = _extension.installed_copies(str(ours), search, [importlib.machinery.PathFinder, EditableFinder])
    assert found == [os.path.realpath(installed), os.path.realpath(editable)]

