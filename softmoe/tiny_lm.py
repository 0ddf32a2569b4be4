"""A small byte-level decoder-only transformer whose FFNs are SoftMoE layers (or a baseline), and
the text data it trains on. Shared by examples/train_lm.py and benchmarks/quality.py."""
import gzip
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

import softmoe
from softmoe.baselines import TopKMoE

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "python_docs.txt.gz")


# ---- data -----------------------------------------------------------------------------------


def load_bytes(path: str = DEFAULT_DATA) -> torch.Tensor:
    """The file's bytes as a uint8 tensor (``.gz`` files are decompressed)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 10_000:
        raise ValueError(f"--data {path}: need at least 10 kB of text, got {len(data)} bytes")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def split(data: torch.Tensor, held_out: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Train / held-out split: the held-out part is the end of the text (never trained on)."""
    cut = int(len(data) * (1 - held_out))
    return data[:cut], data[cut:]


def batches(data: torch.Tensor, batch: int, context: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows: inputs ``[batch, context]`` and next-byte targets, both int64."""
    while True:
        start = torch.randint(0, len(data) - context - 1, (batch,), generator=generator)
        window = torch.stack([data[s : s + context + 1] for s in start.tolist()]).long()
        yield window[:, :-1], window[:, 1:]


def fixed_batches(data: torch.Tensor, count: int, batch: int, context: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Evenly spaced held-out windows, the same every evaluation."""
    total = count * batch
    step = max(1, (len(data) - context - 1) // total)
    starts = [i * step for i in range(total)]
    window = torch.stack([data[s : s + context + 1] for s in starts]).long()
    return [(window[i * batch : (i + 1) * batch, :-1], window[i * batch : (i + 1) * batch, 1:]) for i in range(count)]


# ---- model ----------------------------------------------------------------------------------


@dataclass
class LMConfig:
    ffn: str = "softmoe"  # softmoe | topk | dense
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    context: int = 128
    experts: int = 8
    d_hidden: int = 128  # per expert (dense: the same hidden width as one expert)
    mean_active: float | None = 1.5  # softmoe: realised mean active experts per token and layer (budget)
    mean_k: float | None = None  # softmoe: instead, a budget in mean soft count per layer
    k_min: float = 1.0  # floor of a layer's soft count (mean_k) or target (mean_active)
    lb_coef: float = 0.01  # softmoe: load-balancing loss weight
    max_active: int = 4
    top_k: int = 2  # topk baseline
    alpha: float = 1.0
    eps: float = 1e-2
    combine: str | None = None  # softmoe: the layer's default (normalized; scaled with mean_active)
    z_coef: float | None = None  # softmoe: router z-loss weight (None: the layer's default)
    router_init_std: float | None = None  # softmoe: None: the layer's default
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, expert_group=None) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        if cfg.ffn == "softmoe":
            self.ffn = softmoe.SoftMoELayer(
                cfg.d_model, cfg.d_hidden, cfg.experts, k=cfg.mean_k, active=cfg.mean_active, alpha=cfg.alpha,
                eps=cfg.eps, max_active=cfg.max_active, combine=cfg.combine, lb_coef=cfg.lb_coef, z_coef=cfg.z_coef,
                router_init_std=cfg.router_init_std,
                expert_group=expert_group,
            )
        elif cfg.ffn == "topk":
            self.ffn = TopKMoE(cfg.d_model, cfg.d_hidden, cfg.experts, top_k=cfg.top_k)
        elif cfg.ffn == "dense":
            self.ffn = DenseFFN(cfg.d_model, cfg.d_hidden)
        else:
            raise ValueError(f"ffn must be 'softmoe', 'topk' or 'dense', got {cfg.ffn!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.ffn(self.norm2(x))


class TinyLM(nn.Module):
    """Byte-level causal LM: ``forward(idx[B, T]) -> logits[B, T, 256]``. ``expert_group`` makes the
    SoftMoE layers expert-parallel over that process group (softmoe/parallel.py)."""

    def __init__(self, cfg: LMConfig, expert_group=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(256, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(cfg.context, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg, expert_group) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.budget = None
        if cfg.ffn == "softmoe":
            moe = [blk.ffn for blk in self.blocks]
            if cfg.mean_active is not None:
                self.budget = softmoe.GlobalBudget(moe, mean_active=cfg.mean_active, active_min=cfg.k_min)
            else:
                self.budget = softmoe.GlobalBudget(moe, mean_k=cfg.mean_k, k_min=cfg.k_min)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x) @ self.embed.weight.t()

    def aux_loss(self) -> torch.Tensor:
        """The MoE layers' auxiliary losses (load balancing; top-k also the router z-loss) of the last
        forward, summed (zero for dense)."""
        terms = [blk.ffn.aux_loss for blk in self.blocks if isinstance(blk.ffn, (TopKMoE, softmoe.SoftMoELayer))]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def moe_layers(self) -> list[softmoe.SoftMoELayer]:
        return [blk.ffn for blk in self.blocks if isinstance(blk.ffn, softmoe.SoftMoELayer)]

    def active_experts(self) -> list[float]:
        """Realised mean active experts per token of each MoE layer at the last forward."""
        out = []
        for blk in self.blocks:
            if isinstance(blk.ffn, softmoe.SoftMoELayer):
                out.append(float(blk.ffn.last_stats["active_per_token"]))
            elif isinstance(blk.ffn, TopKMoE):
                out.append(float(blk.ffn.top_k))
        return out

    @torch.no_grad()
    def generate(self, prompt: bytes, length: int, temperature: float = 0.8, generator: torch.Generator | None = None) -> bytes:
        device = self.embed.weight.device
        idx = torch.tensor(list(prompt), dtype=torch.long, device=device)[None]
        for _ in range(length):
            logits = self(idx[:, -self.cfg.context :])[:, -1] / temperature
            # sampled on the CPU so that a CPU generator also drives a model on a GPU
            nxt = torch.multinomial(torch.softmax(logits.float().cpu(), -1), 1, generator=generator)
            idx = torch.cat([idx, nxt.to(device)], dim=1)
        return bytes(idx[0].tolist())


def bits_per_byte(model: TinyLM, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Held-out cross-entropy in bits per byte."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for x, y in data:
            total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    model.train(was_training)
    return total / len(data) / math.log(2)


def make_optimizer(model: TinyLM, lr: float, budget_lr: float, weight_decay: float = 0.1) -> torch.optim.Optimizer:
    """AdamW; the budget logits get their own learning rate and no weight decay."""
    budget = {id(p) for p in model.budget.parameters()} if model.budget is not None else set()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and id(p) not in budget and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and id(p) not in budget and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if budget:
        groups.append({"params": list(model.budget.parameters()), "weight_decay": 0.0, "lr": budget_lr, "base_lr": budget_lr})
    for g in groups:
        g.setdefault("base_lr", lr)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def set_lr(optimizer: torch.optim.Optimizer, step: int, steps: int, warmup: int) -> None:
    """Linear warm-up, then cosine decay to 10% of each group's base rate."""
    if step < warmup:
        scale = (step + 1) / warmup
    else:
        progress = (step - warmup) / max(1, steps - warmup)
        scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * scale
