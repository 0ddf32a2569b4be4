"""Expert parallelism and data parallelism for SoftMoELayer over ``torch.distributed``.

Expert parallelism (EP): ``SoftMoELayer(..., expert_group=group)`` keeps only the experts
``[rank * E / W, (rank + 1) * E / W)`` of the ``W`` ranks of ``group``; the router, k and alpha are
replicated. Each rank routes its own tokens; the routed (token, expert) rows, already grouped by
destination rank in the dispatch plan's expert-then-token slot order, go to the ranks that own their
experts with one ``all_to_all_single`` (variable split sizes, exchanged first in a small int64
all-to-all), run through the local experts, and come back the same way to be combined with the local
routing weights. Only active pairs travel: a token with 1.3 active experts sends 1.3 rows on average.
The backward reverses both exchanges. Split sizes must be known on the host, so every EP forward has
one host synchronisation (the counts), inherent to variable-size all-to-all.

Data parallelism: :func:`wrap_ddp` and :func:`wrap_fsdp` wrap a model whose SoftMoE layers may be
expert-parallel so that training is the same as single-process training on the global batch
(the concatenation of the ranks' batches, mean loss), budget parameters included. The rule: the
replicated parameters get the mean of the ranks' gradients (DDP's all-reduce / FSDP2's
reduce-scatter); an expert's parameters live on one rank and already receive the gradient of every
rank's tokens through the reversed exchange, i.e. the *sum* over ranks of the per-rank mean losses,
so they are left out of DDP/FSDP and scaled by ``1 / W``. Gradient clipping must use the global norm:
:func:`clip_grad_norm_`.

Checkpoints: :func:`full_state_dict` gathers a sharded model into the single-process layout and
:func:`load_full_state_dict` loads such a state dict into an expert-parallel model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Union

import torch
import torch.distributed as dist
from torch import nn

from .experts import Activation, GroupedExperts

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.device_mesh import DeviceMesh

# What SoftMoELayer(expert_group=...) accepts (forward references: DeviceMesh is imported lazily).
ExpertGroup = Union["dist.ProcessGroup", "DeviceMesh", tuple["DeviceMesh", str]]

__all__ = [
    "ExpertGroup",
    "ExpertShard",
    "ShardedExperts",
    "clip_grad_norm_",
    "comm_stats",
    "expert_parameters",
    "full_state_dict",
    "load_full_state_dict",
    "reset_comm_stats",
    "wrap_ddp",
    "wrap_fsdp",
]


@dataclass(frozen=True)
class ExpertShard:
    """Where a SoftMoELayer's experts live (``layer.experts.shard``; ``layer.expert_shard`` is the
    same, and None for a layer that keeps all its experts).

    Attributes:
        group: the expert-parallel process group (W ranks).
        rank: this process's rank in ``group``.
        size: W.
        first: index of this rank's first expert in the full layer (``rank * count``).
        count: experts per rank, ``E / W``.
        layer_id: the layer's creation index among this process's layers on ``group`` (the same on
            every rank when all ranks build the same layers in the same order; checked).
    """

    group: "dist.ProcessGroup"
    rank: int
    size: int
    first: int
    count: int
    layer_id: int


# ---- construction --------------------------------------------------------------------------

_layer_counters: dict[int, int] = {}  # id(group) -> layers built on it by this process


def _resolve_group(fn: str, expert_group: object) -> "dist.ProcessGroup":
    if not dist.is_available():
        raise RuntimeError(f"{fn}: expert_group needs torch.distributed, which this torch build does not have")
    if not dist.is_initialized():
        raise RuntimeError(f"{fn}: expert_group needs an initialised default process group (call "
                           "torch.distributed.init_process_group first)")
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(expert_group, tuple):
        if len(expert_group) != 2 or not isinstance(expert_group[0], DeviceMesh) or not isinstance(expert_group[1], str):
            raise TypeError(f"{fn}: expert_group as a tuple must be (DeviceMesh, mesh_dim_name), got {expert_group!r}")
        mesh, dim = expert_group
        if dim not in (mesh.mesh_dim_names or ()):
            raise ValueError(f"{fn}: expert_group names mesh dimension {dim!r}, but the mesh's dimensions are "
                             f"{mesh.mesh_dim_names}")
        return mesh.get_group(dim)
    if isinstance(expert_group, DeviceMesh):
        if expert_group.ndim != 1:
            raise ValueError(f"{fn}: expert_group as a DeviceMesh must be 1-D (got {expert_group.ndim}-D); "
                             "pass (mesh, 'dim_name') to pick one dimension")
        return expert_group.get_group()
    if isinstance(expert_group, dist.ProcessGroup):
        return expert_group
    raise TypeError(f"{fn}: expert_group must be a torch.distributed.ProcessGroup, a 1-D DeviceMesh or "
                    f"(DeviceMesh, dim_name), got {type(expert_group).__name__}")


def _check_same_config(fn: str, group: "dist.ProcessGroup", config: dict) -> None:
    """All ranks of ``group`` must pass equal ``config`` dicts: else every rank raises the same
    ValueError (no rank is left waiting in a later collective)."""
    size = dist.get_world_size(group)
    gathered: list = [None] * size
    try:
        dist.all_gather_object(gathered, config, group=group)
    except Exception as exc:  # timeouts and peers that died surface as backend errors
        raise RuntimeError(
            f"{fn}: the configuration check across the {size} ranks of expert_group did not complete "
            f"({type(exc).__name__}: {exc}). Every rank of the group must construct the same SoftMoE "
            "layers in the same order; a rank that failed earlier leaves the others waiting until the "
            "process group's timeout."
        ) from exc
    for key in config:
        values = [g.get(key) if isinstance(g, dict) else None for g in gathered]
        if any(v != values[0] for v in values):
            detail = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise ValueError(f"{fn}: the ranks of expert_group disagree on {key} ({detail}); every rank must "
                             "build the layer with the same configuration")


def shard_experts(
    layer: nn.Module,
    expert_group: "ExpertGroup",
    *,
    d_hidden: int,
    activation: Activation,
    k: float,
    alpha: float,
    learn_k: bool,
    learn_alpha: bool,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> "ShardedExperts":
    """Called by ``SoftMoELayer.__init__`` for ``expert_group is not None`` (``layer`` is the layer
    being built: its routing settings are read): checks that every rank of the group builds the same
    layer (a collective; ValueError naming the field and the ranks otherwise) and returns this rank's
    ``E / W`` experts, the layer's ``experts`` module.

    The full expert weights are drawn first and then sliced, so a sharded layer built after
    ``torch.manual_seed(s)`` holds exactly the experts of the single-process layer built after the
    same seed (its full weights are allocated for a moment; to avoid that, build on
    ``device="meta"``, then ``model.to_empty(device=...)`` and :func:`load_full_state_dict`).
    """
    fn = "SoftMoELayer"
    group = _resolve_group(fn, expert_group)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(f"{fn}: this process (global rank {dist.get_rank()}) is not a member of expert_group")
    layer_id = _layer_counters.get(id(group), 0)
    _layer_counters[id(group)] = layer_id + 1
    num_experts = layer.num_experts
    param_dtype = dtype if dtype is not None else torch.get_default_dtype()
    config = {
        "layer_id": layer_id, "group_size": size, "num_experts": num_experts, "d_model": layer.d_model,
        "d_hidden": d_hidden, "activation": activation, "max_active": layer.max_active, "eps": layer.eps,
        "combine": layer.combine, "k": k, "active": layer.active, "alpha": alpha, "k_min": layer.k_min, "k_max": layer.k_max,
        "learn_k": learn_k, "learn_alpha": learn_alpha, "dtype": str(param_dtype),
        "device_type": torch.device(device).type if device is not None else "default",
    }
    # Checked before the divisibility rule, which depends on num_experts: ranks that disagree on E
    # must all fail here rather than some raising early and the rest waiting in the collective.
    _check_same_config(fn, group, config)
    if num_experts % size:
        raise ValueError(f"{fn}: num_experts (= {num_experts}) must be divisible by the size of expert_group "
                         f"(= {size}) so that every rank owns the same number of experts")
    count = num_experts // size
    shard = ExpertShard(group, rank, size, rank * count, count, layer_id)
    return ShardedExperts(shard, num_experts, layer.d_model, d_hidden, activation, device=device, dtype=dtype)


# ---- communication -------------------------------------------------------------------------

_stats = {"exchanges": 0, "rows_sent": 0, "bytes_sent": 0, "bytes_sent_remote": 0, "count_bytes_sent": 0}


def comm_stats() -> dict[str, int]:
    """What this process has sent through expert-parallel exchanges since the last
    :func:`reset_comm_stats` (forward and backward):

    - ``exchanges``: row all-to-alls (2 per layer forward, 2 per layer backward);
    - ``rows_sent``: rows sent, to itself included; ``bytes_sent``: their bytes;
    - ``bytes_sent_remote``: the bytes sent to other ranks (what crosses the network);
    - ``count_bytes_sent``: bytes of the split-size exchange (int64 counts and a 3-value header per
      destination rank, once per layer forward), to itself included.
    """
    return dict(_stats)


def reset_comm_stats() -> None:
    for key in _stats:
        _stats[key] = 0


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, rank: int) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    try:
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    except Exception as exc:
        raise RuntimeError(
            f"SoftMoELayer (expert parallel): the all-to-all exchange failed ({type(exc).__name__}: {exc}). "
            "Every rank of expert_group must run each expert-parallel layer's forward and backward the "
            "same number of times, in the same order."
        ) from exc
    row_bytes = x.element_size() * math.prod(x.shape[1:])
    _stats["exchanges"] += 1
    _stats["rows_sent"] += sum(in_splits)
    _stats["bytes_sent"] += sum(in_splits) * row_bytes
    _stats["bytes_sent_remote"] += (sum(in_splits) - in_splits[rank]) * row_bytes
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable variable-split all_to_all_single: the backward sends the gradients back along
    the reversed splits, as this function again, so that a backward taken with create_graph=True stays
    differentiable (the exchange is linear). (torch.distributed.nn.functional.all_to_all_single does
    the same but is deprecated in torch 2.13 and not counted in comm_stats.)"""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, rank):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.rank = out_splits, in_splits, group, rank
        return _exchange(x, out_splits, in_splits, group, rank)

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.in_splits, ctx.out_splits, ctx.group, ctx.rank), None, None, None, None


_DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.bfloat16: 3, torch.float16: 4}
_HEADER = ("layer_id", "dtype", "width", "requires_grad (input * 2 + experts)")


class ShardedExperts(GroupedExperts):
    """This rank's ``E / W`` experts of an expert-parallel SoftMoELayer, with the contract of
    :class:`~softmoe.GroupedExperts` for the layer's ``E`` experts: ``forward(xs, offsets)`` runs
    expert ``e`` on rows ``offsets[e]:offsets[e + 1]`` of ``xs``, for every ``e``, by sending each row
    to the rank that owns its expert and back (a collective over ``shard.group``: every rank of the
    group must call it the same number of times, in the same order). Weights ``w_in`` / ``w_out``
    hold the local experts ``[shard.first, shard.first + shard.count)``; ``num_experts`` is
    ``shard.count``. Built by :func:`shard_experts`.
    """

    def __init__(self, shard: ExpertShard, num_experts: int, d_model: int, d_hidden: int,
                 activation: Activation = "swiglu", *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        # The full layer's weights, drawn as a single-process layer draws them, then this rank's slice.
        super().__init__(num_experts, d_model, d_hidden, activation, device=device, dtype=dtype)
        with torch.no_grad():
            self.w_in = nn.Parameter(self.w_in[shard.first : shard.first + shard.count].clone())
            self.w_out = nn.Parameter(self.w_out[shard.first : shard.first + shard.count].clone())
        self.num_experts = shard.count
        self.shard = shard

    def forward(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The expert step of an expert-parallel SoftMoELayer forward.

        Args:
            xs: ``[P, d_model]`` this rank's routed rows in the plan's slot order (expert, then token);
                rows from ``offsets[E]`` on are padding (P may be the routed count N or T * max_active).
            offsets: ``[E + 1]`` int64 slot bounds per expert (``DispatchPlan.offsets``, all E experts).

        Returns:
            ``[P, d_model]``: row s is expert ``pair_expert[s]`` applied to ``xs[s]``, computed on the
            rank that owns the expert; zero rows from ``offsets[E]`` on. Differentiable in xs and in the
            local experts' weights (which receive the gradient of every rank's rows).
        """
        if torch.compiler.is_compiling():
            raise RuntimeError("SoftMoELayer (expert parallel): expert parallelism runs in eager mode only (its "
                               "split sizes are read on the host); compile the rest of the model, not the "
                               "expert-parallel layers")
        shard = self.shard
        group, size, count, rank = shard.group, shard.size, shard.count, shard.rank
        width = xs.shape[1]
        # Split-size exchange: for every destination rank, a header (checked equal everywhere so that
        # a mismatch raises on every rank instead of deadlocking a later exchange) and the counts of
        # the destination's experts.
        counts = (offsets[1:] - offsets[:-1]).view(size, count)
        # Which exchanges will have a backward: the dispatch one if xs requires grad, the return one if
        # the local experts do (grad mode on); ranks must agree, or the backward exchanges would pair up
        # wrongly.
        grad_mode = int(xs.requires_grad) * 2 + int(torch.is_grad_enabled() and any(
            p.requires_grad for p in self.parameters()))
        header = torch.tensor([shard.layer_id, _DTYPE_CODES.get(xs.dtype, 0), width, grad_mode],
                              dtype=torch.int64, device=offsets.device)
        send_meta = torch.cat([header.expand(size, len(_HEADER)), counts], dim=1).reshape(-1)
        recv_meta = torch.empty_like(send_meta)
        try:
            dist.all_to_all_single(recv_meta, send_meta, group=group)
        except Exception as exc:
            raise RuntimeError(
                f"SoftMoELayer (expert parallel): the split-size exchange of layer {shard.layer_id} failed "
                f"({type(exc).__name__}: {exc}). Every rank of expert_group must call the layer's forward "
                "the same number of times, in the same order."
            ) from exc
        _stats["count_bytes_sent"] += send_meta.numel() * send_meta.element_size()
        recv_rows = recv_meta.view(size, len(_HEADER) + count)
        # The one host sync: all_to_all_single needs the split sizes on the host.
        sent_host, host = torch.stack([send_meta, recv_meta]).view(2, size, len(_HEADER) + count).tolist()
        mine = sent_host[0][: len(_HEADER)]
        for source, row in enumerate(host):
            if row[: len(_HEADER)] != mine:
                diff = ", ".join(f"{name}: rank {source} {theirs} vs rank {rank} {ours}"
                                 for name, theirs, ours in zip(_HEADER, row, mine) if theirs != ours)
                raise RuntimeError(
                    f"SoftMoELayer (expert parallel): the ranks of expert_group called different layers or with "
                    f"different inputs ({diff}); every rank must run the same layers in the same order, with "
                    "the same dtype and the same autograd mode (all with or all without gradients)"
                )
        send_counts = [sum(row[len(_HEADER):]) for row in sent_host]  # rows for each destination rank
        recv_matrix = [row[len(_HEADER):] for row in host]  # [source rank][local expert]
        recv_splits = [sum(row) for row in recv_matrix]
        routed = sum(send_counts)
        received = sum(recv_splits)

        send = xs.narrow(0, 0, routed)
        recv = _AllToAll.apply(send, recv_splits, send_counts, group, rank)
        local_counts = recv_rows[:, len(_HEADER):]  # [W, count] on the device
        local_offsets = torch.zeros(count + 1, dtype=torch.int64, device=offsets.device)
        torch.cumsum(local_counts.sum(0), 0, out=local_offsets[1:])
        if count > 1 and size > 1:
            # Rows arrive grouped by source rank, then local expert; the experts need them grouped by
            # local expert, then source rank (a fixed permutation: deterministic, and its backward is
            # a scatter without collisions).
            flat = local_counts.reshape(-1)  # (source, expert) order
            source_start = torch.cumsum(flat, 0) - flat
            by_expert = local_counts.t().reshape(-1)  # (expert, source) order
            start_of_group = source_start.view(size, count).t().reshape(-1)
            expert_start = torch.cumsum(by_expert, 0) - by_expert
            group_of_row = torch.repeat_interleave(torch.arange(size * count, device=offsets.device), by_expert,
                                                   output_size=received)
            rows = torch.arange(received, device=offsets.device)
            perm = start_of_group[group_of_row] + rows - expert_start[group_of_row]
            inverse = torch.empty_like(perm)
            inverse[perm] = rows
            ys_local = super().forward(recv.index_select(0, perm), local_offsets).index_select(0, inverse)
        else:
            ys_local = super().forward(recv, local_offsets)
        ys = _AllToAll.apply(ys_local, send_counts, recv_splits, group, rank)
        if xs.shape[0] > routed:
            ys = torch.cat([ys, ys.new_zeros((xs.shape[0] - routed, width))])
        return ys


# ---- data parallelism ----------------------------------------------------------------------


def _sharded_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs of the expert-parallel layers of ``module``: those whose ``experts``
    are a :class:`ShardedExperts` (the layer holds the routing and its ``_extra_state``)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(getattr(m, "experts", None), ShardedExperts)]


def expert_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that are sharded by expert parallelism (the local experts of its
    expert-parallel SoftMoE layers): they differ across ranks and must not be averaged by DDP or
    sharded by FSDP."""
    return [p for _, layer in _sharded_layers(module) for p in layer.experts.parameters()]


def _expert_group_of(fn: str, module: nn.Module) -> "dist.ProcessGroup | None":
    groups = {id(layer.experts.shard.group): layer.experts.shard.group for _, layer in _sharded_layers(module)}
    if len(groups) > 1:
        raise ValueError(f"{fn}: the model's SoftMoE layers use {len(groups)} different expert groups; "
                         "all expert-parallel layers of one model must share one expert_group")
    return next(iter(groups.values()), None)


def _scale_expert_grads(fn: str, module: nn.Module, world: int, dp_ranks: list[int]) -> None:
    group = _expert_group_of(fn, module)
    if group is None:
        return
    ep_ranks = dist.get_process_group_ranks(group)
    if sorted(ep_ranks) != sorted(dp_ranks):
        raise ValueError(
            f"{fn}: the expert-parallel group (global ranks {ep_ranks}) must be the data-parallel group "
            f"(global ranks {dp_ranks}): with another layout the expert shards would also need an "
            "all-reduce over their replicas, which this helper does not do"
        )
    scale = 1.0 / world
    for p in expert_parameters(module):
        if getattr(p, "_softmoe_grad_scale", None) is not None:
            continue  # registered once: wrapping twice must not scale twice
        # A hook on the gradient (not on .grad after accumulation) so that gradient accumulation over
        # several backward passes scales each contribution once.
        p.register_hook(lambda g, s=scale: g * s)
        p._softmoe_grad_scale = scale


def wrap_ddp(model: nn.Module, process_group: "dist.ProcessGroup | None" = None, **ddp_kwargs):
    """Wraps ``model`` in ``DistributedDataParallel`` so that training it on W ranks (each with its
    own batch, loss = mean over its batch) equals single-process training on the concatenated batch.

    Replicated parameters (router, budget, everything that is not an expert of an expert-parallel
    layer) are broadcast from rank 0 at wrap time and their gradients averaged by DDP. The experts of
    expert-parallel layers are left out of DDP (they are different on every rank) and their gradients
    are multiplied by ``1 / W`` (they already sum the contributions of all W ranks' tokens). For
    expert-parallel layers, ``expert_group`` must be the DDP group (default: the world).

    Args:
        model: the unwrapped model (on its device).
        process_group: DDP's group (default: the default group).
        **ddp_kwargs: passed to ``DistributedDataParallel``.

    Returns:
        The ``DistributedDataParallel`` module (``.module`` is ``model``).
    """
    from torch.nn.parallel import DistributedDataParallel

    fn = "wrap_ddp"
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    _scale_expert_grads(fn, model, world, dist.get_process_group_ranks(group))
    expert_ids = {id(p) for p in expert_parameters(model)}
    ignore = [name for name, p in model.named_parameters() if id(p) in expert_ids]
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return DistributedDataParallel(model, process_group=process_group, **ddp_kwargs)


def _mean_over(grad: torch.Tensor, group, world: int) -> torch.Tensor:
    grad = grad.clone()
    dist.all_reduce(grad, group=group)
    return grad / world


def wrap_fsdp(model: nn.Module, mesh: "DeviceMesh | None" = None, submodules: Iterable[nn.Module] = (),
              **fsdp_kwargs) -> nn.Module:
    """Applies FSDP2 (``torch.distributed.fsdp.fully_shard``) to each of ``submodules`` and then to
    ``model``, leaving the experts of expert-parallel layers unsharded (``ignored_params``) and
    scaling their gradients by ``1 / W``; the other parameters become DTensors sharded over ``mesh``
    whose gradients FSDP2 averages over the W ranks. 0-d parameters (``k_logit``, ``log_alpha``),
    which ``fully_shard`` rejects, stay replicated and their gradients are averaged by a hook. Training
    then equals single-process training on the concatenated batch, like :func:`wrap_ddp`; FSDP2 does
    not broadcast, so build the model identically on every rank (same seed) or load a checkpoint.

    Load checkpoints before wrapping (:func:`load_full_state_dict`); :func:`full_state_dict` gathers
    a wrapped model. Modules that read parameters outside their own forward (``GlobalBudget``: the
    layers read its ``theta``) must not be given in ``submodules`` on their own: keep them in
    ``model``'s unit, which is unsharded for the whole forward.

    Args:
        model: the model (modified in place: FSDP2 changes its class).
        mesh: a 1-D DeviceMesh (default: the world on the default device type).
        submodules: modules to shard as their own units first (e.g. transformer blocks).
        **fsdp_kwargs: passed to every ``fully_shard`` call.

    Returns:
        ``model``.
    """
    from torch.distributed.fsdp import fully_shard

    fn = "wrap_fsdp"
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if mesh.ndim != 1:
        raise ValueError(f"{fn}: mesh must be a 1-D DeviceMesh, got {mesh.ndim}-D")
    group = mesh.get_group()
    _scale_expert_grads(fn, model, dist.get_world_size(group), dist.get_process_group_ranks(group))
    ignored = set(expert_parameters(model)) | set(fsdp_kwargs.pop("ignored_params", None) or ())
    # fully_shard rejects 0-d parameters (a SoftMoELayer's k_logit, log_alpha): they stay replicated
    # outside FSDP, and the trained ones get their gradient averaged over the mesh here.
    world = dist.get_world_size(group)
    for p in model.parameters():
        if p.dim() == 0 and p not in ignored:
            ignored.add(p)
            if p.requires_grad and not hasattr(p, "_softmoe_grad_mean"):
                p.register_hook(lambda g, grp=group: _mean_over(g, grp, world))
                p._softmoe_grad_mean = True
    for sub in submodules:
        fully_shard(sub, mesh=mesh, ignored_params=ignored, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, ignored_params=ignored, **fsdp_kwargs)
    return model


def clip_grad_norm_(parameters: nn.Module | Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) with the norm of the *whole* model's gradient:
    the expert shards of expert-parallel layers add their squared norms over their expert group, and
    FSDP2's sharded (DTensor) gradients over their mesh, so every rank computes the same norm and
    the same clipping factor as single-process training. Call it with the unwrapped model (or
    ``ddp.module``) on every rank.

    Returns:
        The total 2-norm (0-d, in the gradients' dtype, on their device; the same on every rank),
        accumulated in float64.
    """
    if not isinstance(parameters, nn.Module):
        raise TypeError("clip_grad_norm_: pass the model (an nn.Module), so that its expert-parallel "
                        f"shards can be found; got {type(parameters).__name__}")
    from torch.distributed.tensor import DTensor

    model = parameters
    fn = "clip_grad_norm_"
    expert_ids = {id(p) for p in expert_parameters(model)}
    params = [p for p in model.parameters() if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    experts = torch.zeros((), dtype=torch.float64, device=device)
    sharded: dict = {}
    for p in params:
        g = p.grad
        if isinstance(g, DTensor):
            key = id(g.device_mesh)
            mesh_total = sharded.setdefault(key, [g.device_mesh, torch.zeros((), dtype=torch.float64, device=device)])
            mesh_total[1] += g.to_local().double().square().sum()
        elif id(p) in expert_ids:
            experts += g.double().square().sum()
        else:
            replicated += g.double().square().sum()
    total = replicated
    group = _expert_group_of(fn, model)
    if group is not None:
        dist.all_reduce(experts, group=group)
        total = total + experts
    for mesh, value in sharded.values():
        for dim in range(mesh.ndim):
            dist.all_reduce(value, group=mesh.get_group(dim))
        total = total + value
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype) if not isinstance(p.grad, DTensor) else coef.item())
    return norm.to(params[0].grad.dtype) if params else norm.float()


# ---- checkpoints -----------------------------------------------------------------------------


def full_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` in the single-process layout: expert shards gathered from every rank of
    their expert group (a collective: call it on every rank) and FSDP2 DTensors made whole. The
    result loads into the same model built without ``expert_group`` (or into a sharded one with
    :func:`load_full_state_dict`)."""
    from torch.distributed.tensor import DTensor

    state = model.state_dict()
    for name, layer in _sharded_layers(model):
        prefix = f"{name}." if name else ""
        shard = layer.experts.shard
        for key in ("w_in", "w_out"):
            local = getattr(layer.experts, key).detach()
            parts = [torch.empty_like(local) for _ in range(shard.size)]
            dist.all_gather(parts, local.contiguous(), group=shard.group)
            state[f"{prefix}experts.{key}"] = torch.cat(parts)
        extra = dict(state[f"{prefix}_extra_state"])
        extra.pop("expert_shard", None)
        state[f"{prefix}_extra_state"] = extra
    for key, value in state.items():
        if isinstance(value, DTensor):
            state[key] = value.full_tensor()
    return state


def load_full_state_dict(model: nn.Module, state_dict: dict, strict: bool = True):
    """Loads a single-process state dict (all experts) into ``model`` whose SoftMoE layers may be
    expert-parallel: each rank keeps its own experts' slice. Load before wrapping with
    :func:`wrap_fsdp`. Returns what ``load_state_dict`` returns."""
    state = dict(state_dict)
    for name, layer in _sharded_layers(model):
        prefix = f"{name}." if name else ""
        shard = layer.experts.shard
        for key in ("w_in", "w_out"):
            full_key = f"{prefix}experts.{key}"
            if full_key not in state:
                continue  # strict loading reports it
            value = state[full_key]
            if value.shape[0] != shard.size * shard.count:
                raise ValueError(f"load_full_state_dict: {full_key} must hold all {shard.size * shard.count} experts "
                                 f"(the single-process layout), got shape {tuple(value.shape)}")
            state[full_key] = value[shard.first : shard.first + shard.count]
        extra_key = f"{prefix}_extra_state"
        if isinstance(state.get(extra_key), dict):
            state[extra_key] = dict(state[extra_key], expert_shard=(shard.first, shard.count))
    return model.load_state_dict(state, strict=strict)
