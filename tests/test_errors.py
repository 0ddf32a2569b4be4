"""Bad arguments raise the exception type of the contract, with a message naming the argument.

Contract: messages start with "soft_topk: <argument>", e.g.
"soft_topk: k must satisfy 0 < k < max_active (= 8), got 9.0".
"""
import math

import pytest
import torch

import softmoe

F64 = torch.float64
E = 8


def scores(*shape, dtype=F64):
    return torch.randn(*(shape or (3, E)), dtype=dtype)


def names(arg):
    """Regex: the message starts with the function and then names `arg`."""
    return rf"^soft_topk: {arg}\b"


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_scores_bad_dtype(dtype):
    s = torch.zeros(3, E, dtype=dtype)
    with pytest.raises(TypeError, match=names("scores")):
        softmoe.soft_topk(s, 2.0)


@pytest.mark.parametrize("bad", [[[0.1, 0.2, 0.3]], 1.5, None])
def test_scores_not_a_tensor(bad):
    with pytest.raises(TypeError, match=names("scores")):
        softmoe.soft_topk(bad, 1.0)


def test_scores_zero_dim():
    with pytest.raises(ValueError, match=names("scores")):
        softmoe.soft_topk(torch.tensor(1.0, dtype=F64), 0.5)


@pytest.mark.parametrize("shape, dim", [((3, 0), -1), ((0, 4), 0), ((2, 0, 3), 1)])
def test_zero_experts(shape, dim):
    with pytest.raises(ValueError, match=names("scores")):
        softmoe.soft_topk(torch.empty(shape, dtype=F64), 0.5, dim=dim)


@pytest.mark.parametrize("k", [0, 0.0, E, float(E), -1, -0.5, E + 1, 9.0, math.nan, math.inf, -math.inf])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match=names("k")):
        softmoe.soft_topk(scores(), k)


def test_k_message_states_rule():
    with pytest.raises(ValueError, match=r"^soft_topk: k must satisfy 0 < k < max_active \(= 8"):
        softmoe.soft_topk(scores(), 9.0)


@pytest.mark.parametrize("k, max_active", [(3.0, 3), (2.5, 2), (1.0, 1)])
def test_k_not_below_max_active(k, max_active):
    """k must be < max_active (= the number of candidates); ceil(k) <= max_active alone is not enough."""
    with pytest.raises(ValueError, match=r"^soft_topk: (k|max_active)\b"):
        softmoe.soft_topk(scores(), k, max_active=max_active)


@pytest.mark.parametrize("k", [math.nan, math.inf, -math.inf, 1e300])
def test_k_non_finite_with_max_active(k):
    with pytest.raises(ValueError, match=r"^soft_topk: (k|max_active)\b"):
        softmoe.soft_topk(scores(), k, max_active=4)


@pytest.mark.parametrize("k", [True, "2", [2.0], None, 2 + 0j])
def test_k_bad_type(k):
    with pytest.raises(TypeError, match=names("k")):
        softmoe.soft_topk(scores(), k)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_k_tensor_integer_dtype(dtype):
    with pytest.raises(TypeError, match=names("k")):
        softmoe.soft_topk(scores(), torch.tensor(2, dtype=dtype))
    with pytest.raises(TypeError, match=names("k")):
        softmoe.soft_topk(scores(), torch.full((3,), 2, dtype=dtype))


@pytest.mark.parametrize("shape", [(2,), (4,), (3, 1), (1, 3), (3, E), (2, 2)])
def test_k_tensor_shape_mismatch(shape):
    with pytest.raises(ValueError, match=names("k")):
        softmoe.soft_topk(scores(), torch.full(shape, 2.0, dtype=F64))


def test_k_tensor_shape_mismatch_other_dim():
    s = scores(4, E, 5)
    softmoe.soft_topk(s, torch.full((4, 5), 2.0, dtype=F64), dim=1)  # fine
    with pytest.raises(ValueError, match=names("k")):
        softmoe.soft_topk(s, torch.full((4, E), 2.0, dtype=F64), dim=1)
    with pytest.raises(ValueError, match=names("k")):
        softmoe.soft_topk(s, torch.full((5, 4), 2.0, dtype=F64), dim=1)


@pytest.mark.parametrize("alpha", [0, 0.0, -1, -1.0, -1e-300, math.inf, -math.inf, math.nan])
def test_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match=names("alpha")):
        softmoe.soft_topk(scores(), 2.0, alpha)


@pytest.mark.parametrize("alpha", [True, "1", None, [1.0]])
def test_alpha_bad_type(alpha):
    with pytest.raises(TypeError, match=names("alpha")):
        softmoe.soft_topk(scores(), 2.0, alpha)


def test_alpha_tensor_bad_dtype_and_shape():
    with pytest.raises(TypeError, match=names("alpha")):
        softmoe.soft_topk(scores(), 2.0, torch.tensor(1, dtype=torch.int64))
    with pytest.raises(ValueError, match=names("alpha")):
        softmoe.soft_topk(scores(), 2.0, torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match=names("alpha")):
        softmoe.soft_topk(scores(), 2.0, torch.ones(3, E, dtype=F64))


@pytest.mark.parametrize("eps", [0.5, 0.7, 1.0, -0.1, -1e-12, math.nan, math.inf])
def test_eps_out_of_range(eps):
    with pytest.raises(ValueError, match=names("eps")):
        softmoe.soft_topk(scores(), 2.0, eps=eps)


@pytest.mark.parametrize("eps", ["0.1", None, torch.tensor(0.1)])
def test_eps_bad_type(eps):
    with pytest.raises(TypeError, match=names("eps")):
        softmoe.soft_topk(scores(), 2.0, eps=eps)


@pytest.mark.parametrize("max_active, k", [(0, 0.5), (-1, 0.5), (E + 1, 2.0), (100, 2.0), (2, 2.5), (3, 3.5),
                                           (1, 1.5)])
def test_max_active_out_of_range(max_active, k):
    with pytest.raises(ValueError, match=names("max_active")):
        softmoe.soft_topk(scores(), k, max_active=max_active)


@pytest.mark.parametrize("max_active", [0, E + 1])
def test_max_active_out_of_range_tensor_k(max_active):
    with pytest.raises(ValueError, match=names("max_active")):
        softmoe.soft_topk(scores(), torch.full((3,), 0.5, dtype=F64), max_active=max_active)


@pytest.mark.parametrize("max_active", [2.0, "2", True])
def test_max_active_bad_type(max_active):
    with pytest.raises(TypeError, match=names("max_active")):
        softmoe.soft_topk(scores(), 1.5, max_active=max_active)


@pytest.mark.parametrize("dim", [2, -3, 5, 100])
def test_dim_out_of_range(dim):
    with pytest.raises(ValueError, match=names("dim")):
        softmoe.soft_topk(scores(), 2.0, dim=dim)


@pytest.mark.parametrize("dim", [1.0, "0", None, True])
def test_dim_bad_type(dim):
    with pytest.raises(TypeError, match=names("dim")):
        softmoe.soft_topk(scores(), 2.0, dim=dim)


def test_valid_boundaries_do_not_raise():
    """The edges of the valid ranges are accepted."""
    s = scores()
    softmoe.soft_topk(s, 1e-9, 1e-300)
    softmoe.soft_topk(s, E - 1e-9, 1e300)
    softmoe.soft_topk(s, 2, 1)  # python ints
    softmoe.soft_topk(s, 2.0, eps=0.4999)
    softmoe.soft_topk(s, 2.5, max_active=3)
    softmoe.soft_topk(s, 1.0, max_active=2)
    softmoe.soft_topk(s, 2.0, dim=-2)
    softmoe.soft_topk(s.t(), 1.0, dim=0)
    softmoe.soft_topk(s, torch.zeros(3, dtype=F64))  # tensor k may be exactly 0 ...
    softmoe.soft_topk(s, torch.full((3,), float(E), dtype=F64))  # ... or exactly m


def test_raw_op_rejects_bad_arguments():
    """The op itself (used by torch.compile, other frontends) checks its arguments too."""
    s = scores()
    k = torch.tensor(2.0, dtype=F64)
    a = torch.tensor(1.0, dtype=F64)
    with pytest.raises(RuntimeError, match="eps"):
        torch.ops.softmoe.soft_topk(s, k, a, 0.5, E)
    with pytest.raises(RuntimeError, match="max_active"):
        torch.ops.softmoe.soft_topk(s, k, a, 0.0, E + 1)
    with pytest.raises(RuntimeError, match="max_active"):
        torch.ops.softmoe.soft_topk(s, k, a, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"\bk\b"):
        torch.ops.softmoe.soft_topk(s, torch.ones(2, dtype=F64), a, 0.0, E)
    with pytest.raises(RuntimeError, match="alpha"):
        torch.ops.softmoe.soft_topk(s, k, torch.ones(3, E, dtype=F64), 0.0, E)
    with pytest.raises(TypeError, match="scores"):
        torch.ops.softmoe.soft_topk(torch.zeros(3, E, dtype=torch.int64), k, a, 0.0, E)
    with pytest.raises(TypeError, match=r"\bk\b"):
        torch.ops.softmoe.soft_topk(s, torch.tensor(2), a, 0.0, E)


@pytest.mark.cuda
def test_param_on_other_device():
    s = scores().cuda()
    with pytest.raises(ValueError, match=names("k")):
        softmoe.soft_topk(s, torch.full((3,), 2.0, dtype=F64))
    with pytest.raises(ValueError, match=names("alpha")):
        softmoe.soft_topk(s, 2.0, torch.tensor(1.0, dtype=F64))
