#!/usr/bin/env python3
"""Runs tests/memcheck/loop.py (a short SoftMoE training loop plus every compiled op, forward and
backward) under valgrind memcheck and fails on a memory error in softmoe's extension:

- any error (invalid read/write, use of uninitialised memory, invalid or mismatched free, overlap)
  whose stack has a frame in the extension's shared object (softmoe/_C*.so) or in csrc/;
- any definitely-lost block whose allocation stack has such a frame.

Everything else is reported as a count and ignored, on purpose. CPython and torch are not
valgrind-clean by design: CPython keeps interned objects and module state until the process dies,
torch keeps registries, thread pools and allocator caches in globals that are never freed, and
both hold pointers into the middle of their blocks ("possibly lost"); ld.so and CPython's
small-int cache also trip "uninitialised value" reports. A suppression file for those would be a
long list tied to exact torch/CPython/glibc builds and would break on every upgrade; filtering by
"does the stack pass through our code" needs no list and keeps every report that can be ours. The
price: an error inside torch caused by arguments our code passed is caught only while our frame is
still on the stack (true for every op we call: our op is the caller).

It checks the installed extension as users run it (the -O3 build in softmoe/), with no rebuild.
PYTHONMALLOC=malloc makes CPython use malloc directly, so valgrind sees Python objects as heap
blocks instead of pymalloc arenas (which valgrind cannot track and reports as uninitialised reads).

    python3 tests/memcheck/run.py                       # ~3 CPU-minutes (valgrind runs one thread at a time)
    python3 tests/memcheck/run.py --package-dir /tmp/x  # the softmoe package under /tmp/x instead
    python3 tests/memcheck/run.py --keep out/           # keep valgrind's XML and the loop's output

Exit status: 0 clean, 1 errors in our code (listed), 2 the run itself failed (the loop raised,
valgrind is missing, or the loop did not load the extension it was meant to check).
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LOOP = os.path.join(HERE, "loop.py")

# Every error kind counts when our frame is on its stack; of the leak kinds only this one: "possibly
# lost" and "indirectly lost" blocks hang off torch/CPython structures (see the docstring), and a
# block our code loses outright is reported as definitely lost.
COUNTED_LEAK = "Leak_DefinitelyLost"


def find_extension(package_dir: str) -> str:
    found = glob.glob(os.path.join(package_dir, "softmoe", "_C*.so"))
    if len(found) != 1:
        raise SystemExit(f"memcheck: expected one softmoe/_C*.so under {package_dir}, found {found}")
    return os.path.realpath(found[0])


def frames(error: ET.Element) -> List[Dict[str, str]]:
    out = []
    for stack in error.findall("stack"):
        for fr in stack.findall("frame"):
            out.append({tag: (fr.findtext(tag) or "") for tag in ("ip", "obj", "fn", "dir", "file", "line")})
    return out


def is_ours(frame: Dict[str, str], extension: str, csrc_dirs: List[str]) -> bool:
    if frame["obj"] and os.path.realpath(frame["obj"]) == extension:
        return True
    d = frame["dir"]
    return bool(d) and any(os.path.realpath(d).startswith(c) for c in csrc_dirs)


def describe(error: ET.Element) -> str:
    what = error.findtext("what") or (error.find("xwhat").findtext("text") if error.find("xwhat") is not None else "")
    lines = [f"{error.findtext('kind')}: {what}"]
    for fr in frames(error)[:25]:
        where = f"{fr['file']}:{fr['line']}" if fr["file"] else os.path.basename(fr["obj"])
        lines.append(f"    {fr['fn'] or fr['ip']}  ({where})")
    return "\n".join(lines)


def classify(xml_path: str, extension: str, csrc_dirs: List[str]) -> Dict[str, List[ET.Element]]:
    root = ET.parse(xml_path).getroot()
    ours, other, other_leaks = [], [], []
    for error in root.iter("error"):
        kind = error.findtext("kind") or ""
        mine = any(is_ours(f, extension, csrc_dirs) for f in frames(error))
        if kind.startswith("Leak_"):
            (ours if mine and kind == COUNTED_LEAK else other_leaks).append(error)
        else:
            (ours if mine else other).append(error)
    return {"ours": ours, "other": other, "other_leaks": other_leaks}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package-dir", default=ROOT,
                    help="directory holding the softmoe package to check (default: this checkout)")
    ap.add_argument("--valgrind", default=shutil.which("valgrind"), help="valgrind executable")
    ap.add_argument("--keep", help="directory to keep valgrind's XML and the loop's output in")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds before the run is abandoned")
    args = ap.parse_args(argv)
    if not args.valgrind:
        print("memcheck: valgrind not found (Debian/Ubuntu: apt-get install valgrind)", file=sys.stderr)
        return 2
    package_dir = os.path.realpath(args.package_dir)
    extension = find_extension(package_dir)
    csrc_dirs = sorted({os.path.realpath(os.path.join(d, "csrc")) for d in (package_dir, ROOT)})

    work = args.keep or tempfile.mkdtemp(prefix="softmoe-memcheck-")
    os.makedirs(work, exist_ok=True)
    xml_path = os.path.join(work, "valgrind.xml")
    env = dict(os.environ, PYTHONMALLOC="malloc", PYTHONPATH=os.pathsep.join(
        [package_dir] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    # sys.executable, not "python3": that may be a shell shim (pyenv) whose exec valgrind would not follow.
    cmd = [args.valgrind, "--tool=memcheck", "--leak-check=full", "--show-leak-kinds=definite",
           "--errors-for-leak-kinds=definite", "--num-callers=40", "--read-inline-info=yes",
           "--xml=yes", f"--xml-file={xml_path}", sys.executable, LOOP]
    print("memcheck: " + " ".join(cmd), flush=True)
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"memcheck: valgrind run exceeded {args.timeout:.0f} s", file=sys.stderr)
        return 2
    with open(os.path.join(work, "loop-output.txt"), "w") as fh:
        fh.write(res.stdout + res.stderr)
    loaded = [line.split("softmoe._C from ", 1)[1].rstrip(")") for line in res.stdout.splitlines()
              if line.startswith("memcheck loop: ok (softmoe._C from ")]
    if res.returncode != 0 or not loaded or os.path.realpath(loaded[0]) != extension:
        print(res.stdout[-4000:] + res.stderr[-4000:], file=sys.stderr)
        print(f"memcheck: the loop failed (exit {res.returncode}) or did not load {extension}; "
              f"valgrind's report is in {work}", file=sys.stderr)
        return 2
    found = classify(xml_path, extension, csrc_dirs)
    print(f"memcheck: {len(found['ours'])} error(s) in softmoe's extension; ignored: {len(found['other'])} "
          f"error(s) and {len(found['other_leaks'])} leak record(s) outside it (CPython/torch/ld.so)")
    for error in found["ours"]:
        print(describe(error))
    if found["ours"]:
        print(f"memcheck: valgrind's full report is in {xml_path}")
    elif not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if found["ours"] else 0


if __name__ == "__main__":
    sys.exit(main())
