"""Loads softmoe's compiled extension, ``softmoe._C`` (importing it runs the TORCH_LIBRARY
registrations of ``torch.ops.softmoe.*``), and says plainly what to do when it cannot.

Three cases get their own advice: a source tree that was never built; a source tree that shadows an
installed copy (Python puts the current or the script's directory first on ``sys.path``, so running
from a checkout imports the checkout, not the installed package); and a built library that does not
load (typically built against another torch than the one running).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from typing import Iterable, List, Optional

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_STANDARD_FINDERS = (
    importlib.machinery.BuiltinImporter,
    importlib.machinery.FrozenImporter,
    importlib.machinery.PathFinder,
)


def load() -> None:
    """Imports ``softmoe._C``; raises ``ImportError`` with the cause and the fix when it cannot."""
    try:
        importlib.import_module("._C", __package__)
    except ImportError as exc:
        library = built_library(PACKAGE_DIR)
        if library is None:
            message = missing_message(PACKAGE_DIR, installed_copies(PACKAGE_DIR, sys.path, sys.meta_path))
        else:
            message = load_failure_message(library, exc)
        # from None: the chained "partially initialized module ... circular import" text of the failed
        # relative import would bury the message that matters.
        raise ImportError(message, name="softmoe._C", path=library) from None


def built_library(package_dir: str) -> Optional[str]:
    """The compiled extension file in ``package_dir`` (``_C`` plus an extension-module suffix), or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(package_dir, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def is_source_tree(package_dir: str) -> bool:
    """Whether ``package_dir`` is the ``softmoe/`` folder of a checkout (next to setup.py and csrc/)."""
    root = os.path.dirname(package_dir)
    return os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc"))


def installed_copies(package_dir: str, search_path: Iterable[str], finders: Iterable[object]) -> List[str]:
    """Other ``softmoe`` package folders with a built extension, found along ``search_path`` (as the
    path finder would) or by the non-standard import finders in ``finders`` (an editable install's)."""
    candidates: List[str] = []
    for entry in search_path:
        candidates.append(os.path.join(entry or os.getcwd(), "softmoe"))
    for finder in finders:
        if finder in _STANDARD_FINDERS or not hasattr(finder, "find_spec"):
            continue
        try:
            spec = finder.find_spec("softmoe", None)
        except Exception:  # a third-party finder may fail on a name it does not own
            continue
        if spec is not None and spec.submodule_search_locations:
            candidates.extend(spec.submodule_search_locations)
    here = os.path.realpath(package_dir)
    found: List[str] = []
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if real != here and real not in found and built_library(real) is not None:
            found.append(real)
    return found


def missing_message(package_dir: str, others: List[str]) -> str:
    """The error message for a ``package_dir`` without a compiled extension."""
    head = f"softmoe's compiled extension (softmoe/_C) is missing: softmoe was imported from {package_dir}, which holds no build of it"
    if others:
        return (
            f"{head}. That folder shadows the installed softmoe at {others[0]}: it comes earlier on "
            f"sys.path (Python puts the current directory, or the script's, first). To use the installed "
            f"copy, run Python from another directory (or take {os.path.dirname(package_dir)} off "
            f"PYTHONPATH / sys.path)."
        )
    if is_source_tree(package_dir):
        return (
            f"{head}: this source tree was never built. Build it in place from "
            f"{os.path.dirname(package_dir)}: `make setup` (a project .venv with everything), or "
            f"`pip install --no-build-isolation -e .` in an environment that has torch."
        )
    return (
        f"{head}, and it is not a source tree: this installed copy is incomplete. Reinstall it "
        f"(`pip install --force-reinstall --no-deps <the wheel, sdist or source tree you installed from>`)."
    )


def load_failure_message(library: str, exc: ImportError) -> str:
    """The error message for a compiled extension that exists but does not load."""
    import torch

    if is_source_tree(os.path.dirname(library)):
        rebuild = f"rebuild it from {os.path.dirname(os.path.dirname(library))} with `pip install --no-build-isolation -e .`"
    else:
        rebuild = "reinstall softmoe into this environment (`pip install --force-reinstall --no-deps ...`), so that it is built against this torch"
    return (
        f"softmoe's compiled extension {library} does not load: {exc}. A build loads only with the torch it "
        f"was compiled against; if that was not this one (torch {torch.__version__}), {rebuild}."
    )
