"""Fused QKV projection (``config.fused_qkv``): one column-parallel linear for the self-attention's q, k and v.

Legend: D hidden, tp tensor-parallel size, r this TP rank, D_tp = D / tp; ``W_q``, ``W_k``, ``W_v`` [D, D] the
unfused weights (rows = output features), ``W_q[r]`` their rows of rank r (its heads), likewise the biases.

    linear_qkv on rank r:  [q_r | k_r | v_r] = x W_r^T + b_r,   W_r = [W_q[r]; W_k[r]; W_v[r]]  [3 D_tp, D]

One GEMM per call (primal; the tangent is the same GEMM, ``models.jvp.linear_jvp_split``) and, under sequence
parallelism, one all-gather of x instead of three. Each rank's local rows are [q_r; k_r; v_r], so its output
splits locally into its own heads' q, k, v (``split_qkv``); the *global* fused weight (the TP shards stacked,
as Megatron would store a column linear) is therefore interleaved [W_q[0]; W_k[0]; W_v[0]; W_q[1]; ...], not
[W_q; W_k; W_v].

Checkpoints never see the fused layout: the module's ``state_dict`` names q, k, v as the unfused linears do
(``linear_q.weight`` ... row slices of this rank's fused weight), its load accepts either layout, and its
``sharded_state_dict`` holds one ``ShardedTensorFactory`` per fused tensor whose build gives three ShardedTensors
``linear_{q,k,v}.{weight,bias}`` with the unfused global shapes and offsets (and whose merge concatenates them
back on load: Megatron's own mechanism for its fused SwiGLU fc1, which optimizer states follow too). A checkpoint
saved fused therefore resumes unfused and vice versa, at any TP size, and ``tools/convert.py`` output loads into
either. Full (unsharded) state dicts (``parallel.sharding``) keep the q/k/v names as well (``unfuse_full``,
``fuse_full``).
"""

from __future__ import annotations

import re

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

FUSED = "linear_qkv"
UNFUSED = ("linear_q", "linear_k", "linear_v")
_TENSORS = ("weight", "bias")
_FULL = re.compile(rf"^(.*\.)?{FUSED}\.(weight|bias)$")


def split_qkv(y, t_y, b):
    """The fused output [.., 3 D_tp] (and its tangent; bias ``b`` [3 D_tp] un-added or None) -> this rank's
    ((q, t_q, b_q), (k, t_k, b_k), (v, t_v, b_v)), each [.., D_tp]: views of the fused tensors."""
    ys = y.chunk(3, dim=-1)
    ts = (None,) * 3 if t_y is None else t_y.chunk(3, dim=-1)
    bs = (None,) * 3 if b is None else b.chunk(3, dim=-1)
    return tuple(zip(ys, ts, bs))


def _unfused_key(key: str, name: str) -> str:
    """``...linear_qkv.weight`` -> ``...linear_q.weight`` (the last occurrence: optimizer keys prefix the model's)."""
    head, sep, tail = key.rpartition(f"{FUSED}.")
    if not sep:
        raise KeyError(f"fused QKV key {key!r} does not contain {FUSED!r}")
    return f"{head}{name}.{tail}"


def state_dict_hook(module, state_dict, prefix, local_metadata):
    """``nn.Module`` state-dict hook of a module holding ``linear_qkv``: its weight and bias appear as the
    unfused ``linear_{q,k,v}.{weight,bias}`` (this rank's row slices, views of the fused tensors)."""
    for t in _TENSORS:
        key = f"{prefix}{FUSED}.{t}"
        if key not in state_dict:
            continue
        fused = state_dict.pop(key)
        for name, part in zip(UNFUSED, fused.chunk(3, dim=0)):
            state_dict[f"{prefix}{name}.{t}"] = part
    return state_dict


def load_state_dict_pre_hook(module, state_dict, prefix, *args, **kwargs):
    """``nn.Module`` load pre-hook: this rank's unfused ``linear_{q,k,v}.{weight,bias}`` are concatenated into
    ``linear_qkv`` (a fused ``linear_qkv.*`` entry, as ``dist_checkpointing.load`` returns it, passes as is)."""
    for t in _TENSORS:
        keys = [f"{prefix}{name}.{t}" for name in UNFUSED]
        present = [k for k in keys if k in state_dict]
        if not present:
            continue
        if len(present) != 3:
            missing = sorted(set(keys) - set(present))
            raise KeyError(f"fused QKV load: {missing} missing beside {present} (q, k and v come together)")
        parts = [state_dict.pop(k) for k in keys]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"fused QKV load: {keys} have shapes {[tuple(p.shape) for p in parts]}; expected one")
        state_dict[f"{prefix}{FUSED}.{t}"] = torch.cat(parts, dim=0)


def qkv_factory(sh: ShardedTensor, prepend_axis_num: int) -> ShardedTensorFactory:
    """The column linear's ShardedTensor of its fused weight/bias (TP-split along its first own axis, global
    [3 D(, D)]) -> a factory building ``linear_{q,k,v}.*`` ShardedTensors, each [D(, D)] globally with this
    rank's slice at the same TP offset (merged back by concatenation on load)."""
    axis = prepend_axis_num  # the tensor's own axis 0 (out features), after the prepended (PP/expert) axes
    local = sh.local_shape[0]
    if local % 3 or sh.global_offset[axis] % local:
        raise ValueError(f"{sh.key}: local shape {tuple(sh.local_shape)} at offset {sh.global_offset} is not a "
                         "fused [q; k; v] TP shard")
    rank, frags = sh.global_offset[axis] // local, sh.axis_fragmentations[axis]
    prepended = [(i, sh.global_offset[i], sh.axis_fragmentations[i]) for i in range(prepend_axis_num)]

    @torch.no_grad()
    def build(key, data, replica_id, flattened_range):
        if flattened_range is not None:
            raise NotImplementedError(
                f"{key}: fused QKV checkpoints of flattened (fully sharded model-space) optimizer states are not "
                "implemented; use optimizer checkpoint sharding dp_reshardable or fully_reshardable"
            )
        return [
            ShardedTensor.from_rank_offsets(_unfused_key(key, name), part, *prepended, (axis, rank, frags),
                                            replica_id=replica_id, prepend_axis_num=prepend_axis_num)
            for name, part in zip(UNFUSED, data.chunk(3, dim=0))
        ]

    def merge(parts):
        with torch.no_grad():
            return torch.cat(parts, dim=0)

    return ShardedTensorFactory(sh.key, sh.data, build, merge, sh.replica_id)


def fused_sharded_state_dict(sharded_sd: dict, prefix: str, prepend_axis_num: int) -> dict:
    """``sharded_sd`` of a module holding ``linear_qkv`` with its weight/bias ShardedTensors swapped for
    ``qkv_factory`` factories (in place; returned)."""
    for t in _TENSORS:
        k = f"{prefix}{FUSED}.{t}"
        if k in sharded_sd:
            sharded_sd[k] = qkv_factory(sharded_sd[k], prepend_axis_num)
    return sharded_sd


def checkpoint_tensors(sharded_sd: dict) -> list[ShardedTensor]:
    """The ShardedTensors a sharded state dict saves: its own, and those its fused-QKV factories build (the
    unfused ``linear_{q,k,v}`` keys and global shapes a checkpoint holds)."""
    out = []
    for v in sharded_sd.values():
        if isinstance(v, ShardedTensorFactory):
            out.extend(t for t in v.build() if isinstance(t, ShardedTensor))
        elif isinstance(v, ShardedTensor):
            out.append(v)
    return out


def fuse_full(parts, tp: int) -> torch.Tensor:
    """Full unfused q, k, v tensors [D(, D)] -> the full fused tensor in TP-shard order: rank r's chunk of
    ``chunk(tp)`` is [q[r]; k[r]; v[r]]."""
    per_rank = [p.chunk(tp, dim=0) for p in parts]
    return torch.cat([torch.cat([pr[r] for pr in per_rank], dim=0) for r in range(tp)], dim=0)


def unfuse_full(fused: torch.Tensor, tp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_full``: the full fused tensor (TP shards stacked) -> the full q, k, v tensors."""
    ranks = [r.chunk(3, dim=0) for r in fused.chunk(tp, dim=0)]
    return tuple(torch.cat([ranks[r][i] for r in range(tp)], dim=0) for i in range(3))


def fuse_full_state_dict(full: dict, fused_names, tp: int) -> dict:
    """A full state dict with unfused q/k/v names -> one with ``linear_qkv`` wherever ``fused_names`` (the
    model's parameter names) has it; other entries pass unchanged (a copy; ``full`` is not modified)."""
    out = dict(full)
    for name in fused_names:
        m = _FULL.match(name)
        if m is None or name in out:
            continue
        keys = [f"{m[1] or ''}{u}.{m[2]}" for u in UNFUSED]
        if all(k in out for k in keys):
            out[name] = fuse_full([out.pop(k) for k in keys], tp)
    return out


def unfuse_full_state_dict(full: dict, tp: int) -> dict:
    """A full state dict with ``linear_qkv`` entries (TP shards stacked) -> the unfused q/k/v names."""
    out = {}
    for name, value in full.items():
        m = _FULL.match(name)
        if m is None:
            out[name] = value
            continue
        for u, part in zip(UNFUSED, unfuse_full(value, tp)):
            out[f"{m[1] or ''}{u}.{m[2]}"] = part
    return out
