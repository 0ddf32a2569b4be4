"""Memory errors under valgrind (tests/memcheck/run.py): the training loop and every compiled op run
clean with respect to softmoe's extension. The full run takes ~3 CPU-minutes, on one core whatever
the machine (valgrind serialises threads), so it is marked slow. The filter that decides what
counts as ours is also checked on its own on a hand-made report: a filter that matched nothing
would make the full run pass vacuously."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_PY = os.path.join(HERE, "memcheck", "run.py")
# loaded by path under its own name: "run" on sys.path could shadow or be shadowed by another module
_spec = importlib.util.spec_from_file_location("softmoe_memcheck_run", RUN_PY)
memcheck = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memcheck)

EXT = "/pkg/softmoe/_C.cpython-311-x86_64-linux-gnu.so"


def _error(kind: str, frames: str, what: str = "x") -> str:
    tag = "xwhat><text" if kind.startswith("Leak_") else "what"
    close = "text></xwhat" if kind.startswith("Leak_") else "what"
    return f"<error><unique>0x1</unique><kind>{kind}</kind><{tag}>{what}</{close}><stack>{frames}</stack></error>"


def _frame(obj: str, fn: str, d: str = "", f: str = "") -> str:
    return f"<frame><ip>0x1</ip><obj>{obj}</obj><fn>{fn}</fn><dir>{d}</dir><file>{f}</file><line>1</line></frame>"


def test_filter_keeps_errors_in_our_code_and_drops_the_rest(tmp_path):
    libc = "/usr/lib/x86_64-linux-gnu/libc.so.6"
    torch_lib = "/site-packages/torch/lib/libtorch_cpu.so"
    errors = [
        # ours: top frame in the extension (an OOB write in a C core loop)
        _error("InvalidWrite", _frame(EXT, "smoe_gather_rows", "/src/csrc/core", "route.c")),
        # ours: torch reads out of bounds but our op called it (frame further down)
        _error("InvalidRead", _frame(torch_lib, "at::mm_out") + _frame(EXT, "grouped_mm_impl")),
        # ours: a block allocated by the core and never freed
        _error("Leak_DefinitelyLost", _frame(libc, "malloc") + _frame(EXT, "smoe_topk_fwd")),
        # ours by source directory even without the object name (inlined into another object)
        _error("UninitCondition", _frame("/other.so", "smoe_combine_row", "/src/csrc/core", "route_row.h")),
        # not ours: CPython / ld.so noise and torch's deliberate leaks
        _error("UninitValue", _frame("/usr/lib/libpython3.11.so", "Py_INCREF")),
        _error("Leak_DefinitelyLost", _frame(libc, "malloc") + _frame(torch_lib, "c10::Registry")),
        # "possibly lost" through our code: torch/CPython interior pointers, not counted
        _error("Leak_PossiblyLost", _frame(libc, "malloc") + _frame(EXT, "soft_topk_impl")),
    ]
    xml = tmp_path / "v.xml"
    xml.write_text("<?xml version='1.0'?><valgrindoutput>" + "".join(errors) + "</valgrindoutput>")
    found = memcheck.classify(str(xml), EXT, ["/src/csrc"])
    assert [e.findtext("kind") for e in found["ours"]] == [
        "InvalidWrite", "InvalidRead", "Leak_DefinitelyLost", "UninitCondition"]
    assert len(found["other"]) == 1 and len(found["other_leaks"]) == 2
    assert "smoe_gather_rows" in memcheck.describe(found["ours"][0])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None,
                    reason="valgrind is not installed (Debian/Ubuntu: apt-get install valgrind)")
def test_training_loop_and_ops_are_valgrind_clean():
    res = subprocess.run([sys.executable, RUN_PY], capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert "0 error(s) in softmoe's extension" in res.stdout
