"""Checkpoint names across ``transformer_impl`` (local <-> transformer_engine) without TE: the key mapping
against the local model's real key set and a TE key set built from its description (fused norm3 + query,
``_extra_state`` per TE linear); tests/test_te_gpu.py checks the same against real TE modules."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from megatron_rcm.models.wan import impl_keys
from megatron_rcm.parallel.state import initialize_parallel
from tests.wan_helpers import make_ours

TE_LINEAR = re.compile(r"^(blocks\.\d+\.(self_attn|cross_attn)\.linear_(q|k|v|proj|k_img|v_img)|"
                       r"blocks\.\d+\.ffn\.linear_fc[12])\.weight$")


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


def fake_te_keys(local_keys) -> list[str]:
    """The TE model's state-dict keys as described by its spec: every block linear is a TE module (adds
    ``_extra_state``); norm3's affine parameters live in the cross-attention query (``layer_norm_*``)."""
    out = []
    for k in local_keys:
        m = re.match(r"^(blocks\.\d+\.)norm3\.(weight|bias)$", k)
        out.append(f"{m[1]}cross_attn.linear_q.layer_norm_{m[2]}" if m else k)
        extra = k.removesuffix("weight") + "_extra_state"
        if TE_LINEAR.match(k) and extra not in local_keys:
            out.append(extra)
    return out


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_mapping_round_trip_on_real_local_keys(kind):
    local = make_ours(kind).state_dict()
    te_keys = fake_te_keys(local)
    n_blocks = len({k.split(".")[1] for k in local if k.startswith("blocks.")})
    per_block = 12 if kind == "i2v" else 10  # q k v proj (self), q k v proj [k_img v_img] (cross), fc1 fc2
    assert sum(bool(TE_LINEAR.match(k)) for k in local) == n_blocks * per_block
    assert all(k.removesuffix("weight") + "_extra_state" in te_keys for k in local if TE_LINEAR.match(k))

    as_te = impl_keys.adapt_state_dict(local, te_keys)
    assert set(as_te) == set(te_keys)
    assert all(as_te[k] is None or as_te[k].numel() == 0 for k in te_keys if impl_keys.is_extra_state(k))
    assert torch.equal(as_te["blocks.1.cross_attn.linear_q.layer_norm_weight"], local["blocks.1.norm3.weight"])

    back = impl_keys.adapt_state_dict(as_te, local.keys())
    assert set(back) == set(local)
    assert all(torch.equal(back[k], local[k]) for k in local if local[k] is not None)
    assert {impl_keys.to_local_name(k) for k in te_keys} == set(local)
    assert [impl_keys.to_te_name(impl_keys.to_local_name(k)) for k in te_keys] == te_keys


def test_te_named_state_dict_loads_strictly_into_local_model():
    src, dst = make_ours("t2v", seed=1), make_ours("t2v", seed=2)
    sd = src.state_dict()
    te_sd = impl_keys.adapt_state_dict(sd, fake_te_keys(sd))  # what a TE model's state_dict() holds
    dst.load_state_dict(te_sd, strict=True)  # the model's load pre-hook maps the names back
    assert all(torch.equal(v, sd[k]) for k, v in dst.state_dict().items() if v is not None)


def test_broken_mapping_fails_the_strict_load():
    """A mapping that loses norm3 (a key renamed to a name neither implementation has) must not load."""
    src, dst = make_ours("t2v", seed=1), make_ours("t2v", seed=2)
    te_sd = impl_keys.adapt_state_dict(src.state_dict(), fake_te_keys(src.state_dict()))
    broken = {k.replace("linear_q.layer_norm_weight", "linear_q.norm_weight"): v for k, v in te_sd.items()}
    with pytest.raises(RuntimeError, match="norm3.weight"):
        dst.load_state_dict(broken, strict=True)


def test_checkpoint_keys_are_canonical():
    sharded = {
        "student.blocks.0.cross_attn.linear_q.layer_norm_weight": SimpleNamespace(
            key="student.blocks.3.cross_attn.linear_q.layer_norm_weight"),
        "student.blocks.0.cross_attn.linear_q._extra_state": SimpleNamespace(
            key="student.blocks.3.cross_attn.linear_q._extra_state"),
        "student.blocks.0.cross_attn.linear_q.weight": SimpleNamespace(key="student.blocks.3.cross_attn.linear_q.weight"),
    }
    out = impl_keys.canonical_sharded_state_dict(sharded)
    assert list(out) == ["student.blocks.0.cross_attn.linear_q.layer_norm_weight",
                         "student.blocks.0.cross_attn.linear_q.weight"]  # dict keys: the model's own names
    assert [v.key for v in out.values()] == ["student.blocks.3.norm3.weight", "student.blocks.3.cross_attn.linear_q.weight"]
    local_keys = {v.key for v in make_ours("t2v").sharded_state_dict().values() if hasattr(v, "key")}
    assert "blocks.0.norm3.weight" in local_keys  # the local model's checkpoint names are unchanged
