"""Converter building blocks: key tables, streaming safetensors I/O, architecture reading. Also the
fixtures the other ``test_convert_*`` files build their tiny checkpoints with.

The original-layout files are written from the Wan2.1 release's key names, listed here by hand
(``original_keys``), with tensors taken from a diffusers model through diffusers' own
``convert_wan_transformer_to_diffusers``: nothing in them comes from our key tables.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_rcm.convert.arch import (
    from_diffusers_config,
    from_original_config,
    match_preset,
    to_diffusers_config,
    to_original_config,
)
from megatron_rcm.convert.errors import CorruptFileError
from megatron_rcm.convert.safetensors_io import SafetensorsFile, TensorSpec, write_file, write_sharded
from megatron_rcm.convert.wan_keys import from_ours, map_key
from tests.wan_helpers import diffusers_config, make_diffusers

# ---------------------------------------------------------------------------------------------------
# fixtures shared by the converter tests


def original_keys(num_layers: int, i2v: bool) -> list[str]:
    """The parameter names of the original ``WanModel`` (wan/modules/model.py of the Wan2.1 release)."""
    keys = [f"{m}.{p}" for m in ("patch_embedding", "head.head") for p in ("weight", "bias")]
    keys += [
        f"{m}.{i}.{p}"
        for m in ("text_embedding", "time_embedding")
        for i in (0, 2)
        for p in ("weight", "bias")
    ]
    keys += ["time_projection.1.weight", "time_projection.1.bias", "head.modulation"]
    if i2v:
        keys += [f"img_emb.proj.{i}.{p}" for i in (0, 1, 3, 4) for p in ("weight", "bias")]
    for n in range(num_layers):
        b = f"blocks.{n}."
        keys.append(b + "modulation")
        for attn in ("self_attn", "cross_attn"):
            keys += [f"{b}{attn}.{x}.{p}" for x in "qkvo" for p in ("weight", "bias")]
            keys += [f"{b}{attn}.norm_q.weight", f"{b}{attn}.norm_k.weight"]
        if i2v:
            keys += [f"{b}cross_attn.{x}_img.{p}" for x in "kv" for p in ("weight", "bias")]
            keys.append(f"{b}cross_attn.norm_k_img.weight")
        keys += [f"{b}norm3.weight", f"{b}norm3.bias"]
        keys += [f"{b}ffn.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    return keys


def original_state_dict(diffusers_model, i2v: bool) -> dict:
    """The diffusers model's tensors under the original names (mapped by diffusers, not by us)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd = diffusers_model.state_dict()
    out, used = {}, set()
    for key in original_keys(diffusers_model.config.num_layers, i2v):
        ((name, _),) = convert_wan_transformer_to_diffusers({key: None}).items()
        out[key] = sd[name].clone()
        used.add(name)
    assert used == set(sd), f"original key list misses {sorted(set(sd) - used)}"
    return out


def original_config(diffusers_model, i2v: bool) -> dict:
    """config.json as the Wan2.1 release writes it (``WanModel`` fields)."""
    c = diffusers_model.config
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "dim": c.num_attention_heads * c.attention_head_dim,
        "eps": c.eps,
        "ffn_dim": c.ffn_dim,
        "freq_dim": c.freq_dim,
        "in_dim": c.in_channels,
        "model_type": "i2v" if i2v else "t2v",
        "num_heads": c.num_attention_heads,
        "num_layers": c.num_layers,
        "out_dim": c.out_channels,
        "text_dim": c.text_dim,
        "text_len": 512,
    }


def write_original(folder: Path, sd: dict, fmt: str, shards: int = 1, config: dict | None = None) -> Path:
    """Write ``sd`` as .safetensors or .pth, in ``shards`` files with a Hugging Face style index when > 1."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = "safetensors" if fmt == "safetensors" else "pth"
    keys = list(sd)
    groups = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        name = (
            f"diffusion_pytorch_model.{ext}"
            if shards == 1
            else f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.{ext}"
        )
        part = {k: sd[k].contiguous() for k in group}
        if fmt == "safetensors":
            save_file(part, folder / name, metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
        weight_map.update({k: name for k in group})
    if shards > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in sd.values())}, "weight_map": weight_map}
        (folder / f"diffusion_pytorch_model.{ext}.index.json").write_text(json.dumps(index))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_diffusers(root: Path, model, pipeline: bool = True, max_shard_size: str | None = None) -> Path:
    """``save_pretrained`` into ``root/transformer`` (with a pipeline ``model_index.json``) or ``root``."""
    folder = root / "transformer" if pipeline else root
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    if pipeline:
        (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


def read_weights(folder: Path) -> dict:
    """Every tensor of every safetensors file in ``folder``."""
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        out.update(load_file(p))
    return out


# ---------------------------------------------------------------------------------------------------
# key tables


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_key_tables_are_inverse_bijections(kind):
    """Every diffusers and original key maps to one of ours and back to itself; both layouts reach the
    same set of our keys."""
    model = make_diffusers(kind)
    ours = {}
    for layout, keys in (
        ("diffusers", list(model.state_dict())),
        ("original", original_keys(model.config.num_layers, kind == "i2v")),
    ):
        mapped = [map_key(k, layout) for k in keys]
        assert len(set(mapped)) == len(keys)
        assert [from_ours(o, layout) for o in mapped] == keys
        ours[layout] = set(mapped)
    assert ours["diffusers"] == ours["original"]


def test_original_table_agrees_with_diffusers_converter():
    """Original -> ours -> diffusers equals diffusers' own original -> diffusers renaming, key by key."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    for key in original_keys(3, i2v=True):
        ((theirs, _),) = convert_wan_transformer_to_diffusers({key: None}).items()
        assert from_ours(map_key(key, "original"), "diffusers") == theirs, key


# ---------------------------------------------------------------------------------------------------
# safetensors streaming I/O


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=gen),
        "b.bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "c.empty": torch.zeros(0, 4),
        "d.f16": torch.randn(2, 2, 2, generator=gen).half(),
    }


def test_safetensors_writer_matches_reference_reader(tmp_path):
    ts = _tensors()
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in ts.items()]
    size = write_file(str(tmp_path / "x.safetensors"), specs, ts.__getitem__)
    assert size == os.path.getsize(tmp_path / "x.safetensors")
    back = load_file(tmp_path / "x.safetensors")  # the reference (Rust) reader validates our header
    assert back.keys() == ts.keys() and all(
        torch.equal(back[k], ts[k]) and back[k].dtype == ts[k].dtype for k in ts
    )


def test_safetensors_reader_matches_reference_writer(tmp_path):
    ts = _tensors()
    save_file(ts, tmp_path / "y.safetensors")
    f = SafetensorsFile(str(tmp_path / "y.safetensors"))
    assert sorted(f.keys()) == sorted(ts)
    for k, v in ts.items():
        got = f.read(k)
        assert got.dtype == v.dtype and torch.equal(got, v)
    f.close()


def test_sharded_writer_writes_an_index(tmp_path):
    ts = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    specs = [TensorSpec(k, (256,), torch.float32) for k in ts]
    names = write_sharded(str(tmp_path), "m", specs, ts.__getitem__, max_shard_bytes=2048)
    assert names[-1] == "m.safetensors.index.json" and len(names) == 4  # 2 + 2 + 1 tensors
    index = json.loads((tmp_path / names[-1]).read_text())
    assert index["metadata"]["total_size"] == 5 * 1024 and set(index["weight_map"]) == set(ts)
    assert all(torch.equal(read_weights(tmp_path)[k], v) for k, v in ts.items())


@pytest.mark.parametrize("cut", [1, 100, 10_000])
def test_truncated_safetensors_is_named(tmp_path, cut):
    save_file(_tensors(), tmp_path / "z.safetensors")
    data = (tmp_path / "z.safetensors").read_bytes()
    (tmp_path / "z.safetensors").write_bytes(data[: max(len(data) - cut, 3)])
    with pytest.raises(CorruptFileError, match=r"z\.safetensors.*(truncated|too short)"):
        SafetensorsFile(str(tmp_path / "z.safetensors"))


# ---------------------------------------------------------------------------------------------------
# architecture


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_arch_round_trips_through_both_config_formats(kind):
    model = make_diffusers(kind)
    arch = from_diffusers_config(dict(model.config))
    assert match_preset(arch) == f"wan-tiny-{kind}"
    cfg = to_diffusers_config(arch)
    theirs = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    ours = {k: v for k, v in cfg.items() if not k.startswith("_")}
    assert ours == {k: list(v) if isinstance(v, tuple) else v for k, v in theirs.items()}
    back = from_original_config(to_original_config(arch))
    assert back.to_json() | {"image_dim": arch.image_dim} == arch.to_json()


def test_non_preset_arch_is_recognized_as_such():
    cfg = diffusers_config("t2v") | {"num_layers": 3}
    assert match_preset(from_diffusers_config(cfg)) is None
