"""Every fake (meta) kernel checks that its tensors share one device, as the real kernels do
(tests/test_cuda_experts.py checks those with CPU and CUDA tensors): a call with one argument on
the meta device and the rest on the CPU reaches the fake kernel, which must raise rather than return
uninitialised memory. The forward ops' cases are in test_bad_inputs.py; these are the backward ops'."""
import pytest
import torch

import softmoe
from softmoe import ops  # noqa: F401  (registers the fake kernels)

META = "all tensor arguments must be on one device"


def _calls():
    scores = torch.randn(6, 5)
    k, alpha = torch.tensor(2.0), torch.tensor(1.0)
    p, threshold = torch.ops.softmoe.soft_topk(scores, k, alpha, 0.01, 3)
    plan = softmoe.dispatch_plan(p, 3)
    xs = torch.randn(plan.pair_token.numel(), 4)
    x, offs = torch.randn(6, 4), torch.tensor([0, 3, 6])
    w_in, w_out = torch.randn(2, 4, 8), torch.randn(2, 4, 4)
    hidden = torch.randn(6, 8)
    meta = lambda t: t.to("meta")  # noqa: E731
    sm = torch.ops.softmoe
    return {
        "soft_topk_backward": lambda: sm.soft_topk_backward(meta(torch.ones_like(p)), scores, p, threshold, k, alpha,
                                                            0.01, 3),
        "gather_rows_backward": lambda: sm.gather_rows_backward(xs, meta(plan.token_pairs)),
        "combine_rows_backward": lambda: sm.combine_rows_backward(meta(torch.ones(6, 4)), xs, p, *plan[1:]),
        "grouped_mm_weight_grad": lambda: sm.grouped_mm_weight_grad(x, meta(x), offs, 2),
        "expert_ffn_backward": lambda: sm.expert_ffn_backward(x, x, meta(hidden), w_in, w_out, offs, "swiglu",
                                                              [True, True, True]),
    }


@pytest.mark.parametrize("op", sorted(_calls()))
def test_backward_fake_kernels_check_devices(op):
    with pytest.raises(RuntimeError, match=f"softmoe: {op}: {META}"):
        _calls()[op]()
