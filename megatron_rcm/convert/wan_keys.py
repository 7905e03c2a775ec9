"""Key tables between megatron_rcm's Wan model and the three public layouts.

* ``original``: the Wan2.1 release (``WanModel``: ``blocks.N.self_attn.q``, ``modulation``, ``head.head``).
* ``diffusers``: ``WanTransformer3DModel`` (``blocks.N.attn1.to_q``, ``scale_shift_table``, ``proj_out``).
* ``rcm``: the students the rCM release and TurboDiffusion publish (``rcm/networks/wan2pt1.py``): a
  ``torch.save`` dict of the original names under ``net.`` (the EMA: ``net_ema.``), the patch embedding a
  Linear ``[D, C*pt*ph*pw]`` fed by ``rearrange("b c (t kt) (h kh) (w kw) -> b (t h w) (c kt kh kw)")``:
  the row-major flattening of the Conv3d weight ``[D, C, pt, ph, pw]``, i.e. our linear as it is.

Each table maps an external regex to our key template. Tensors keep their values; the only reshape is
the patch embedding (Conv3d weight [D, C, pt, ph, pw] <-> our linear [D, C*pt*ph*pw]).
"""

from __future__ import annotations

import re

_BLOCK = r"blocks\.(\d+)\."

DIFFUSERS_TO_OURS: list[tuple[str, str]] = [
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"condition_embedder\.time_embedder\.linear_(1|2)\.(weight|bias)", r"time_embedding.linear_\1.\2"),
    (r"condition_embedder\.time_proj\.(weight|bias)", r"time_projection.\1"),
    (r"condition_embedder\.text_embedder\.linear_(1|2)\.(weight|bias)", r"text_embedding.linear_\1.\2"),
    (r"condition_embedder\.image_embedder\.norm(1|2)\.(weight|bias)", r"img_emb.norm\1.\2"),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.(weight|bias)", r"img_emb.mlp.linear_1.\1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2\.(weight|bias)", r"img_emb.mlp.linear_2.\1"),
    (_BLOCK + r"scale_shift_table", r"blocks.\1.modulation"),
    (_BLOCK + r"attn1\.to_(q|k|v)\.(weight|bias)", r"blocks.\1.self_attn.linear_\2.\3"),
    (_BLOCK + r"attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.self_attn.linear_proj.\2"),
    (_BLOCK + r"attn1\.norm_(q|k)\.weight", r"blocks.\1.self_attn.\2_norm.weight"),
    (_BLOCK + r"attn2\.to_(q|k|v)\.(weight|bias)", r"blocks.\1.cross_attn.linear_\2.\3"),
    (_BLOCK + r"attn2\.to_out\.0\.(weight|bias)", r"blocks.\1.cross_attn.linear_proj.\2"),
    (_BLOCK + r"attn2\.norm_(q|k)\.weight", r"blocks.\1.cross_attn.\2_norm.weight"),
    (_BLOCK + r"attn2\.add_(k|v)_proj\.(weight|bias)", r"blocks.\1.cross_attn.linear_\2_img.\3"),
    (_BLOCK + r"attn2\.norm_added_k\.weight", r"blocks.\1.cross_attn.k_img_norm.weight"),
    (_BLOCK + r"norm2\.(weight|bias)", r"blocks.\1.norm3.\2"),
    (_BLOCK + r"ffn\.net\.0\.proj\.(weight|bias)", r"blocks.\1.ffn.linear_fc1.\2"),
    (_BLOCK + r"ffn\.net\.2\.(weight|bias)", r"blocks.\1.ffn.linear_fc2.\2"),
    (r"scale_shift_table", r"head.modulation"),
    (r"proj_out\.(weight|bias)", r"head.linear.\1"),
]

ORIGINAL_TO_OURS: list[tuple[str, str]] = [
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"time_embedding\.0\.(weight|bias)", r"time_embedding.linear_1.\1"),
    (r"time_embedding\.2\.(weight|bias)", r"time_embedding.linear_2.\1"),
    (r"time_projection\.1\.(weight|bias)", r"time_projection.\1"),
    (r"text_embedding\.0\.(weight|bias)", r"text_embedding.linear_1.\1"),
    (r"text_embedding\.2\.(weight|bias)", r"text_embedding.linear_2.\1"),
    (r"img_emb\.proj\.0\.(weight|bias)", r"img_emb.norm1.\1"),
    (r"img_emb\.proj\.1\.(weight|bias)", r"img_emb.mlp.linear_1.\1"),
    (r"img_emb\.proj\.3\.(weight|bias)", r"img_emb.mlp.linear_2.\1"),
    (r"img_emb\.proj\.4\.(weight|bias)", r"img_emb.norm2.\1"),
    (_BLOCK + r"modulation", r"blocks.\1.modulation"),
    (_BLOCK + r"self_attn\.(q|k|v)\.(weight|bias)", r"blocks.\1.self_attn.linear_\2.\3"),
    (_BLOCK + r"self_attn\.o\.(weight|bias)", r"blocks.\1.self_attn.linear_proj.\2"),
    (_BLOCK + r"self_attn\.norm_(q|k)\.weight", r"blocks.\1.self_attn.\2_norm.weight"),
    (_BLOCK + r"cross_attn\.(q|k|v)\.(weight|bias)", r"blocks.\1.cross_attn.linear_\2.\3"),
    (_BLOCK + r"cross_attn\.o\.(weight|bias)", r"blocks.\1.cross_attn.linear_proj.\2"),
    (_BLOCK + r"cross_attn\.norm_(q|k)\.weight", r"blocks.\1.cross_attn.\2_norm.weight"),
    (_BLOCK + r"cross_attn\.(k|v)_img\.(weight|bias)", r"blocks.\1.cross_attn.linear_\2_img.\3"),
    (_BLOCK + r"cross_attn\.norm_k_img\.weight", r"blocks.\1.cross_attn.k_img_norm.weight"),
    (_BLOCK + r"norm3\.(weight|bias)", r"blocks.\1.norm3.\2"),
    (_BLOCK + r"ffn\.0\.(weight|bias)", r"blocks.\1.ffn.linear_fc1.\2"),
    (_BLOCK + r"ffn\.2\.(weight|bias)", r"blocks.\1.ffn.linear_fc2.\2"),
    (r"head\.head\.(weight|bias)", r"head.linear.\1"),
    (r"head\.modulation", r"head.modulation"),
]

RCM_PREFIXES = ("net_ema.", "net.")
"""The prefixes of an rCM / TurboDiffusion student, in the order an import prefers them (the EMA first)."""
RCM_EXPORT_PREFIX = "net."
_RCM = r"(?:net_ema|net)\."

RCM_TO_OURS: list[tuple[str, str]] = [(_RCM + pattern, template) for pattern, template in ORIGINAL_TO_OURS]

TABLES = {"diffusers": DIFFUSERS_TO_OURS, "original": ORIGINAL_TO_OURS, "rcm": RCM_TO_OURS}

# The inverse tables, written out (a regex table has no mechanical inverse); tests check that
# ``from_ours(map_key(k, layout), layout) == k`` for every key of both layouts.
OURS_TO_DIFFUSERS: list[tuple[str, str]] = [
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"time_embedding\.linear_(1|2)\.(weight|bias)", r"condition_embedder.time_embedder.linear_\1.\2"),
    (r"time_projection\.(weight|bias)", r"condition_embedder.time_proj.\1"),
    (r"text_embedding\.linear_(1|2)\.(weight|bias)", r"condition_embedder.text_embedder.linear_\1.\2"),
    (r"img_emb\.norm(1|2)\.(weight|bias)", r"condition_embedder.image_embedder.norm\1.\2"),
    (r"img_emb\.mlp\.linear_1\.(weight|bias)", r"condition_embedder.image_embedder.ff.net.0.proj.\1"),
    (r"img_emb\.mlp\.linear_2\.(weight|bias)", r"condition_embedder.image_embedder.ff.net.2.\1"),
    (_BLOCK + r"modulation", r"blocks.\1.scale_shift_table"),
    (_BLOCK + r"self_attn\.linear_(q|k|v)\.(weight|bias)", r"blocks.\1.attn1.to_\2.\3"),
    (_BLOCK + r"self_attn\.linear_proj\.(weight|bias)", r"blocks.\1.attn1.to_out.0.\2"),
    (_BLOCK + r"self_attn\.(q|k)_norm\.weight", r"blocks.\1.attn1.norm_\2.weight"),
    (_BLOCK + r"cross_attn\.linear_(q|k|v)\.(weight|bias)", r"blocks.\1.attn2.to_\2.\3"),
    (_BLOCK + r"cross_attn\.linear_proj\.(weight|bias)", r"blocks.\1.attn2.to_out.0.\2"),
    (_BLOCK + r"cross_attn\.(q|k)_norm\.weight", r"blocks.\1.attn2.norm_\2.weight"),
    (_BLOCK + r"cross_attn\.linear_(k|v)_img\.(weight|bias)", r"blocks.\1.attn2.add_\2_proj.\3"),
    (_BLOCK + r"cross_attn\.k_img_norm\.weight", r"blocks.\1.attn2.norm_added_k.weight"),
    (_BLOCK + r"norm3\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_BLOCK + r"ffn\.linear_fc1\.(weight|bias)", r"blocks.\1.ffn.net.0.proj.\2"),
    (_BLOCK + r"ffn\.linear_fc2\.(weight|bias)", r"blocks.\1.ffn.net.2.\2"),
    (r"head\.modulation", r"scale_shift_table"),
    (r"head\.linear\.(weight|bias)", r"proj_out.\1"),
]

OURS_TO_ORIGINAL: list[tuple[str, str]] = [
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"time_embedding\.linear_1\.(weight|bias)", r"time_embedding.0.\1"),
    (r"time_embedding\.linear_2\.(weight|bias)", r"time_embedding.2.\1"),
    (r"time_projection\.(weight|bias)", r"time_projection.1.\1"),
    (r"text_embedding\.linear_1\.(weight|bias)", r"text_embedding.0.\1"),
    (r"text_embedding\.linear_2\.(weight|bias)", r"text_embedding.2.\1"),
    (r"img_emb\.norm1\.(weight|bias)", r"img_emb.proj.0.\1"),
    (r"img_emb\.mlp\.linear_1\.(weight|bias)", r"img_emb.proj.1.\1"),
    (r"img_emb\.mlp\.linear_2\.(weight|bias)", r"img_emb.proj.3.\1"),
    (r"img_emb\.norm2\.(weight|bias)", r"img_emb.proj.4.\1"),
    (_BLOCK + r"modulation", r"blocks.\1.modulation"),
    (_BLOCK + r"self_attn\.linear_(q|k|v)\.(weight|bias)", r"blocks.\1.self_attn.\2.\3"),
    (_BLOCK + r"self_attn\.linear_proj\.(weight|bias)", r"blocks.\1.self_attn.o.\2"),
    (_BLOCK + r"self_attn\.(q|k)_norm\.weight", r"blocks.\1.self_attn.norm_\2.weight"),
    (_BLOCK + r"cross_attn\.linear_(q|k|v)\.(weight|bias)", r"blocks.\1.cross_attn.\2.\3"),
    (_BLOCK + r"cross_attn\.linear_proj\.(weight|bias)", r"blocks.\1.cross_attn.o.\2"),
    (_BLOCK + r"cross_attn\.(q|k)_norm\.weight", r"blocks.\1.cross_attn.norm_\2.weight"),
    (_BLOCK + r"cross_attn\.linear_(k|v)_img\.(weight|bias)", r"blocks.\1.cross_attn.\2_img.\3"),
    (_BLOCK + r"cross_attn\.k_img_norm\.weight", r"blocks.\1.cross_attn.norm_k_img.weight"),
    (_BLOCK + r"norm3\.(weight|bias)", r"blocks.\1.norm3.\2"),
    (_BLOCK + r"ffn\.linear_fc1\.(weight|bias)", r"blocks.\1.ffn.0.\2"),
    (_BLOCK + r"ffn\.linear_fc2\.(weight|bias)", r"blocks.\1.ffn.2.\2"),
    (r"head\.linear\.(weight|bias)", r"head.head.\1"),
    (r"head\.modulation", r"head.modulation"),
]

OURS_TO_RCM: list[tuple[str, str]] = [(p, RCM_EXPORT_PREFIX + t) for p, t in OURS_TO_ORIGINAL]

INVERSE_TABLES = {"diffusers": OURS_TO_DIFFUSERS, "original": OURS_TO_ORIGINAL, "rcm": OURS_TO_RCM}


def rcm_prefix(keys) -> str | None:
    """The prefix an rCM import reads: ``net_ema.`` (the EMA) when any key has it, else ``net.``; None when
    no key has either."""
    for prefix in RCM_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return None


def map_key(key: str, layout: str) -> str:
    """External key -> our key. Raises KeyError naming the key if no rule matches."""
    for pattern, template in TABLES[layout]:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template)
    raise KeyError(f"no {layout} mapping for key {key!r}")


def to_ours(state_dict: dict, layout: str) -> dict:
    """Map a full (unsharded) external state dict to our key names and shapes."""
    out = {}
    for key, value in state_dict.items():
        ours = map_key(key, layout)
        out[ours] = patch_weight_to_ours(value, ours)
    return out


def from_ours(key: str, layout: str) -> str:
    """Our key -> the external layout's key. Raises KeyError naming the key if no rule matches."""
    for pattern, template in INVERSE_TABLES[layout]:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template)
    raise KeyError(f"no {layout} name for our key {key!r}")


def patch_weight_to_ours(value, key: str):
    """The Conv3d patch-embedding weight [D, C, pt, ph, pw] -> our linear [D, C*pt*ph*pw] (a view)."""
    if key == "patch_embedding.weight" and value.ndim == 5:
        return value.reshape(value.shape[0], -1)
    return value


def external_shape(key: str, shape: tuple, in_channels: int, patch_size: tuple, layout: str = "original") -> tuple:
    """The shape a tensor of ours has in ``layout`` (only the patch embedding differs: a Conv3d weight in
    the original and diffusers layouts, our linear in the rcm one)."""
    if key == "patch_embedding.weight" and layout != "rcm":
        return (shape[0], in_channels, *patch_size)
    return tuple(shape)
