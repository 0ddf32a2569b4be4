"""A worked example of softmoe.soft_topk: weights, exact zeros, and gradients to scores, k, alpha.

Run: python examples/demo_soft_topk.py
"""
import torch

import softmoe


def show(name: str, t: torch.Tensor) -> None:
    print(f"{name:<22}" + "  ".join(f"{v:8.4f}" for v in t.tolist()))


def main() -> None:
    torch.set_printoptions(precision=4)
    scores = torch.tensor([2.0, 1.2, 1.0, -0.5, 0.3, -2.0, 0.9, 0.1], requires_grad=True)
    k = torch.tensor(2.0, requires_grad=True)
    alpha = torch.tensor(0.5, requires_grad=True)

    print("8 experts, router scores for one token:")
    show("scores", scores.detach())

    print("\nPlain LapSum soft top-k (eps=0): every expert gets some weight, the weights sum to k.")
    p = softmoe.soft_topk(scores, k, alpha)
    show("p", p.detach())
    print(f"sum p = {p.sum().item():.6f}")

    print("\nTruncated (eps=1e-2, max_active=4): exact zeros outside a few experts, still sum to k.")
    p = softmoe.soft_topk(scores, k, alpha, eps=1e-2, max_active=4)
    show("p", p.detach())
    print(f"sum p = {p.sum().item():.6f}, active experts = {int((p > 0).sum())}")

    print("\nGradients of a toy loss  L = sum_i p_i * v_i  (v = value of each expert):")
    v = torch.tensor([0.1, 1.0, 0.2, 0.0, 0.5, 0.0, 2.0, 0.3])
    loss = (p * v).sum()
    loss.backward()
    show("dL/dscores", scores.grad)
    print(f"dL/dk     = {k.grad.item():.4f}   (weight per extra unit of k goes to the experts on the edge)")
    print(f"dL/dalpha = {alpha.grad.item():.4f}")
    print("The router learns to raise expert 6 (value 2.0) even though it was not in the top 2.")

    print("\nSmaller alpha approaches the hard top-k indicator:")
    for a in (2.0, 0.5, 0.05, 0.001):
        show(f"alpha={a}", softmoe.soft_topk(scores.detach(), 2.0, a))


if __name__ == "__main__":
    main()
