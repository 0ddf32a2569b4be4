"""The README's Python examples run as written, and do what their comments say."""

from __future__ import annotations

import os
import re

import pytest
import torch

import softmoe

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> dict[str, str]:
    """The README's ```python blocks, keyed by the section heading above each."""
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    blocks: dict[str, str] = {}
    heading = ""
    # fenced blocks first, so that a "# comment" inside a bash block is not taken for a heading
    for match in re.finditer(r"^```(\w*)\n(.*?)^```|^(#+ [^\n]*)$", text, flags=re.M | re.S):
        if match.group(3):
            heading = match.group(3).lstrip("# ").strip()
        elif match.group(1) == "python":
            blocks[heading] = match.group(2)
    return blocks


def block(title_start: str) -> str:
    found = [code for heading, code in python_blocks().items() if heading.startswith(title_start)]
    assert len(found) == 1, f"README: expected one python block under a heading starting {title_start!r}"
    return found[0]


def test_soft_topk_example():
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(block("`soft_topk`"), "README.md soft_topk", "exec"), scope)
    p, k, scores = scope["p"], scope["k"], scope["scores"]
    torch.testing.assert_close(p.sum(-1).detach(), torch.full((p.shape[0],), 2.0), rtol=0, atol=1e-4)
    # what the comments say it prints
    active = (p > 0).sum(-1)
    assert active[:3].tolist() == [4, 3, 4] and active[-3:].tolist() == [7, 3, 6]
    assert int(active.min()) == 3 and int(active.max()) == 8 and round(float(active.float().mean()), 1) == 5.0
    assert int((p == 0).sum(-1).min()) == 56
    assert scores.grad is not None and k.grad is not None
    # and what the paragraph after it says: at alpha = 0.5 nothing is truncated
    wide = softmoe.soft_topk(scores.detach(), 2.0, alpha=0.5, eps=1e-2, max_active=8)
    assert bool(((wide > 0).sum(-1) == 8).all())


def test_layer_in_a_transformer_block_example():
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(block("`SoftMoELayer`"), "README.md SoftMoELayer", "exec"), scope)
    blocks, budget = scope["blocks"], scope["budget"]
    batch, seq, d = 2, 16, 512
    x = torch.randn(batch, seq, d)
    mask = torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1)   # causal
    h = x
    for b in blocks:
        h = b(h, mask)
    assert h.shape == x.shape and bool(torch.isfinite(h).all())
    h.square().mean().backward()
    allocation = budget.allocation()
    torch.testing.assert_close(allocation.sum().detach(), torch.tensor(6 * 1.5), rtol=0, atol=1e-4)
    assert all(p.grad is not None for p in budget.parameters())


def test_every_python_block_is_checked():
    """A new README example needs a test here (Hugging Face needs a model, so its block is only
    compiled)."""
    checked = ("`soft_topk`", "`SoftMoELayer`", "Hugging Face")
    for heading, code in python_blocks().items():
        assert heading.startswith(checked), f"README block under {heading!r} has no test in tests/test_readme.py"
        compile(code, f"README.md {heading}", "exec")


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
