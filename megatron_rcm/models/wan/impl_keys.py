"""Parameter names across the two linear implementations (``transformer_impl``): checkpoints load into either.

Megatron's local linears and Transformer Engine's share ``weight`` / ``bias``; TE modules add ``_extra_state``
(its FP8 metadata: no state across steps for the current-scaling and MXFP8 recipes used here, so checkpoints
do not keep it), and TE's fused LayerNorm + linear holds Wan's norm3 as the cross-attention query's
parameters:

    local (canonical, what checkpoints and tools/convert.py write)   transformer_engine
    blocks.{i}.norm3.weight                                          blocks.{i}.cross_attn.linear_q.layer_norm_weight
    blocks.{i}.norm3.bias                                            blocks.{i}.cross_attn.linear_q.layer_norm_bias
"""

from __future__ import annotations

import re

import torch

EXTRA_STATE = "_extra_state"
_LOCAL = re.compile(r"^(.*blocks\.\d+\.)norm3\.(weight|bias)$")
_TE = re.compile(r"^(.*blocks\.\d+\.)cross_attn\.linear_q\.layer_norm_(weight|bias)$")


def to_local_name(key: str) -> str:
    """The canonical (local-implementation) name of a state-dict key of either implementation."""
    m = _TE.match(key)
    return f"{m[1]}norm3.{m[2]}" if m else key


def to_te_name(key: str) -> str:
    """The Transformer Engine name of a canonical key."""
    m = _LOCAL.match(key)
    return f"{m[1]}cross_attn.linear_q.layer_norm_{m[2]}" if m else key


def is_extra_state(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == EXTRA_STATE


def adapt_state_dict(state_dict: dict, target_keys) -> dict:
    """``state_dict`` (either implementation's names) renamed to the implementation whose keys are
    ``target_keys``: fused-norm names mapped, ``_extra_state`` entries the target lacks dropped, those it
    has but ``state_dict`` lacks filled with an empty tensor (TE's ``set_extra_state`` ignores it). Other keys
    pass unchanged, so a real mismatch still fails the strict load that follows."""
    target = set(target_keys)
    te_target = any(_TE.match(k) for k in target)
    rename = to_te_name if te_target else to_local_name
    out = {}
    for k, v in state_dict.items():
        if is_extra_state(k) and k not in target:
            continue
        out[rename(k)] = v
    for k in target:
        if is_extra_state(k) and k not in out:
            out[k] = torch.empty(0, dtype=torch.uint8)
    return out


def canonical_sharded_state_dict(sharded_sd: dict) -> dict:
    """A model's sharded state dict with checkpoint keys (``ShardedTensor.key``) in canonical names and no TE
    ``_extra_state`` objects; the dict keys (the model's own state-dict names) are kept, so what
    ``dist_checkpointing.load`` returns loads into the model it came from."""
    out = {}
    for k, sh in sharded_sd.items():
        if is_extra_state(k):
            continue
        if hasattr(sh, "key"):
            sh.key = to_local_name(sh.key)
        out[k] = sh
    return out


def load_state_dict_pre_hook(module, state_dict, prefix, *args, **kwargs):
    """``nn.Module`` load pre-hook: a state dict of either implementation loads (strictly) into ``module``."""
    own = [prefix + k for k in module.state_dict().keys()]
    mine = {k: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
    state_dict.update(adapt_state_dict(mine, own))
