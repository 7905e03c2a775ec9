"""Cosmos converter: original (``net.``) and diffusers layouts <-> Megatron checkpoint, bit-exact round
trips, --verify against diffusers' own model and key conversion, and the clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_rcm.convert import cosmos_keys
from megatron_rcm.convert.cosmos import diffusers_config, export_cosmos, import_cosmos
from megatron_rcm.convert.cosmos_keys import from_ours, map_key, to_external, to_ours
from megatron_rcm.convert.errors import (
    ConversionError,
    KeyMismatchError,
    ShapeMismatchError,
    VerificationError,
)
from tests.cosmos_helpers import diffusers_config as helper_config
from tests.cosmos_helpers import make_diffusers

PRESET = {"t2i": "cosmos-tiny-t2i", "v2w": "cosmos-tiny-v2w"}
EXTRAS = {  # non-parameter entries of an original checkpoint, dropped on import
    "net.accum_video_sample_counter": torch.tensor(3),
    "net.accum_iteration": torch.tensor(7),
    "net.pos_embedder.seq": torch.arange(8.0),
    "net.pos_embedder.dim_spatial_range": torch.arange(4.0),
    "net.blocks.0.self_attn.attn_op._extra_state": torch.tensor([]),
}


def _original_sd(kind):
    ours = to_ours(make_diffusers(kind).state_dict(), "diffusers")
    return to_external(ours, "original") | EXTRAS


def test_key_tables_invert_each_other():
    ours = to_ours(make_diffusers("t2i").state_dict(), "diffusers")
    for layout in ("original", "diffusers"):
        for k in ours:
            assert map_key(from_ours(k, layout), layout) == k


def test_preset_diffusers_config_matches_the_oracle_config():
    for kind, preset in PRESET.items():
        want = helper_config(kind)
        got = diffusers_config(preset)
        for k, v in want.items():
            assert (list(got[k]) if isinstance(v, tuple) else got[k]) == (
                list(v) if isinstance(v, tuple) else v
            ), k


@pytest.mark.parametrize("kind", ["t2i", "v2w"])
def test_original_round_trip_bit_exact_and_verified(tmp_path, kind):
    sd = _original_sd(kind)
    torch.save(sd, tmp_path / "model.pt")
    rep = import_cosmos(
        tmp_path / "model.pt", tmp_path / "ckpt", PRESET[kind], verify=True, log=lambda *a: None
    )
    assert sorted(rep["dropped"]) == sorted(EXTRAS)
    assert rep["verify"]["rel_err_diffusers"] <= 1e-5  # measured ~3e-7: float32 round-off
    export_cosmos(tmp_path / "ckpt", tmp_path / "orig", "original", log=lambda *a: None)
    back = torch.load(tmp_path / "orig" / "model.pt", weights_only=True)
    params = {k: v for k, v in sd.items() if k not in EXTRAS}
    assert back.keys() == params.keys()
    for k in params:
        assert torch.equal(back[k], params[k]), k


def test_diffusers_round_trip_bit_exact_bf16(tmp_path):
    ref = make_diffusers("t2i").to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "src")
    import_cosmos(tmp_path / "src", tmp_path / "ckpt", "cosmos-tiny-t2i", verify=True, log=lambda *a: None)
    export_cosmos(tmp_path / "ckpt", tmp_path / "out", "diffusers", log=lambda *a: None)
    src = load_file(tmp_path / "src" / "diffusion_pytorch_model.safetensors")
    out = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    assert src.keys() == out.keys()
    for k in src:
        assert out[k].dtype == torch.bfloat16 and torch.equal(out[k], src[k]), k
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    from diffusers import CosmosTransformer3DModel

    CosmosTransformer3DModel.from_config(cfg)  # diffusers accepts the written config


def test_broken_key_table_fails_verify(tmp_path, monkeypatch):
    """A deliberately broken mapping (q and k projections exchanged on import) is caught by --verify,
    whose oracle is diffusers' own conversion of the original checkpoint; OUT is not written."""
    torch.save(_original_sd("t2i"), tmp_path / "model.pt")
    self_qkv = r"blocks\.(\d+)\.self_attn\.(q|k|v)_proj\.weight"
    broken = []
    for p, t in cosmos_keys.ORIGINAL_TO_OURS:
        if p == self_qkv:  # self-attention q <-> k: same shapes, so only the numbers can tell
            for a, b in (("q", "k"), ("k", "q"), ("v", "v")):
                broken.append((p.replace("(q|k|v)", a), rf"blocks.\1.self_attn.linear_{b}.weight"))
        else:
            broken.append((p, t))
    assert len(broken) == len(cosmos_keys.ORIGINAL_TO_OURS) + 2
    monkeypatch.setitem(cosmos_keys.TABLES, "original", broken)
    with pytest.raises(VerificationError, match="differs beyond tol"):
        import_cosmos(
            tmp_path / "model.pt", tmp_path / "ckpt", "cosmos-tiny-t2i", verify=True, log=lambda *a: None
        )
    assert not (tmp_path / "ckpt").exists()


def test_clear_errors(tmp_path):
    sd = _original_sd("t2i")
    renamed = dict(sd)
    renamed["net.blocks.0.mlp.layer9.weight"] = renamed.pop("net.blocks.0.mlp.layer1.weight")
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(KeyMismatchError) as e:
        import_cosmos(tmp_path / "renamed.pt", tmp_path / "o1", "cosmos-tiny-t2i", log=lambda *a: None)
    assert "blocks.0.mlp.layer1.weight" in str(e.value) and "net.blocks.0.mlp.layer9.weight" in str(e.value)

    wrong = dict(sd)
    wrong["net.final_layer.linear.weight"] = torch.zeros(3, 128)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ShapeMismatchError, match=r"final_layer\.linear\.weight"):
        import_cosmos(tmp_path / "wrong.pt", tmp_path / "o2", "cosmos-tiny-t2i", log=lambda *a: None)

    torch.save(sd, tmp_path / "model.pt")
    with pytest.raises(KeyMismatchError, match="pos_emb"):  # v2w preset has no learnable position embedding
        import_cosmos(tmp_path / "model.pt", tmp_path / "o3", "cosmos-tiny-v2w", log=lambda *a: None)
    with pytest.raises(ConversionError, match="not a Cosmos preset"):
        import_cosmos(tmp_path / "model.pt", tmp_path / "o4", "wan2.1-t2v-1.3b", log=lambda *a: None)
    with pytest.raises(ConversionError, match="not a Cosmos-Predict2 checkpoint"):
        torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "foo.pt")
        import_cosmos(tmp_path / "foo.pt", tmp_path / "o5", "cosmos-tiny-t2i", log=lambda *a: None)

    make_diffusers("t2i").save_pretrained(tmp_path / "dsrc")
    cfg = json.loads((tmp_path / "dsrc" / "config.json").read_text())
    (tmp_path / "dsrc" / "config.json").write_text(json.dumps(cfg | {"rope_scale": [1.0, 4.0, 4.0]}))
    with pytest.raises(ConversionError, match=r"rope_scale: \[1.0, 4.0, 4.0\]"):
        import_cosmos(tmp_path / "dsrc", tmp_path / "o6", "cosmos-tiny-t2i", log=lambda *a: None)
    with pytest.raises(ConversionError, match="inside|source"):
        import_cosmos(tmp_path / "model.pt", tmp_path, "cosmos-tiny-t2i", log=lambda *a: None)


def test_cli_round_trip_and_exit_code(tmp_path):
    from megatron_rcm.convert.cosmos import main

    sd = _original_sd("v2w")
    torch.save(sd, tmp_path / "model.pt")
    assert (
        main(["import", str(tmp_path / "model.pt"), str(tmp_path / "ckpt"), "--preset", "cosmos-tiny-v2w"])
        == 0
    )
    out = tmp_path / "ema"
    assert (
        main(
            [
                "export",
                str(tmp_path / "ckpt"),
                str(out),
                "--format",
                "original",
                "--original-prefix",
                "net_ema.",
            ]
        )
        == 0
    )
    back = torch.load(out / "model.pt", weights_only=True)
    assert all(k.startswith("net_ema.") for k in back)
    assert torch.equal(back["net_ema.final_layer.linear.weight"], sd["net.final_layer.linear.weight"])
    # the net_ema. copy imports too (a released student's EMA weights)
    assert (
        main(["import", str(out / "model.pt"), str(tmp_path / "ckpt2"), "--preset", "cosmos-tiny-v2w"]) == 0
    )
    assert (
        main(["import", str(tmp_path / "model.pt"), str(tmp_path / "ckpt3"), "--preset", "cosmos-tiny-t2i"])
        == 2
    )
