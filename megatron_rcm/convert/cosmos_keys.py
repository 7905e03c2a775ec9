"""Key tables between megatron_rcm's Cosmos-Predict2 model and the two public layouts.

* ``original``: the Cosmos-Predict2 release (``net.``-prefixed ``MiniTrainDIT`` keys: ``x_embedder.proj.1``,
  ``blocks.N.self_attn.q_proj``, ``adaln_modulation_self_attn.1``, ``final_layer.linear``). Its
  non-parameter entries are dropped on import: ``accum_*`` training counters, the RoPE buffers
  ``pos_embedder.{seq,dim_spatial_range,dim_temporal_range}`` (recomputed from the config) and
  Transformer Engine ``*_extra_state`` (as diffusers' ``convert_cosmos_transformer_checkpoint_to_diffusers``).
* ``diffusers``: ``CosmosTransformer3DModel`` (``patch_embed.proj``, ``transformer_blocks.N.attn1.to_q``,
  ``norm1.linear_1``, ``proj_out``).

Every tensor keeps its value and shape (the patch embedding is a Linear in all three layouts).
"""

from __future__ import annotations

import re

ORIGINAL_PREFIXES = ("net.", "net_ema.")
_DROPPED = re.compile(r"(accum_.*|pos_embedder\.(seq|dim_spatial_range|dim_temporal_range)|.*_extra_state)")

_B = r"blocks\.(\d+)\."
_TB = r"transformer_blocks\.(\d+)\."
_ADALN = {"self_attn": "1", "cross_attn": "2", "mlp": "3"}  # diffusers norm1/2/3
_ATTN = {"self_attn": "attn1", "cross_attn": "attn2"}

DIFFUSERS_TO_OURS: list[tuple[str, str]] = [
    (r"patch_embed\.proj\.weight", r"patch_embedding.weight"),
    (r"learnable_pos_embed\.pos_emb_(t|h|w)", r"pos_embedding.pos_emb_\1"),
    (r"time_embed\.t_embedder\.linear_(1|2)\.weight", r"time_embedding.linear_\1.weight"),
    (r"time_embed\.norm\.weight", r"time_embedding.norm_weight"),
    *[
        (_TB + rf"norm{n}\.linear_(1|2)\.weight", rf"blocks.\1.adaln_{sub}.linear_\2.weight")
        for sub, n in _ADALN.items()
    ],
    *[(_TB + rf"{a}\.to_(q|k|v)\.weight", rf"blocks.\1.{sub}.linear_\2.weight") for sub, a in _ATTN.items()],
    *[(_TB + rf"{a}\.to_out\.0\.weight", rf"blocks.\1.{sub}.linear_proj.weight") for sub, a in _ATTN.items()],
    *[(_TB + rf"{a}\.norm_(q|k)\.weight", rf"blocks.\1.{sub}.\2_norm.weight") for sub, a in _ATTN.items()],
    (_TB + r"ff\.net\.0\.proj\.weight", r"blocks.\1.mlp.linear_fc1.weight"),
    (_TB + r"ff\.net\.2\.weight", r"blocks.\1.mlp.linear_fc2.weight"),
    (r"norm_out\.linear_(1|2)\.weight", r"head.adaln.linear_\1.weight"),
    (r"proj_out\.weight", r"head.linear.weight"),
]

ORIGINAL_TO_OURS: list[tuple[str, str]] = [
    (r"x_embedder\.proj\.1\.weight", r"patch_embedding.weight"),
    (r"extra_pos_embedder\.pos_emb_(t|h|w)", r"pos_embedding.pos_emb_\1"),
    (r"t_embedder\.1\.linear_(1|2)\.weight", r"time_embedding.linear_\1.weight"),
    (r"t_embedding_norm\.weight", r"time_embedding.norm_weight"),
    *[
        (_B + rf"adaln_modulation_{sub}\.(1|2)\.weight", rf"blocks.\1.adaln_{sub}.linear_\2.weight")
        for sub in _ADALN
    ],
    *[(_B + rf"{sub}\.(q|k|v)_proj\.weight", rf"blocks.\1.{sub}.linear_\2.weight") for sub in _ATTN],
    *[(_B + rf"{sub}\.output_proj\.weight", rf"blocks.\1.{sub}.linear_proj.weight") for sub in _ATTN],
    *[(_B + rf"{sub}\.(q|k)_norm\.weight", rf"blocks.\1.{sub}.\2_norm.weight") for sub in _ATTN],
    (_B + r"mlp\.layer1\.weight", r"blocks.\1.mlp.linear_fc1.weight"),
    (_B + r"mlp\.layer2\.weight", r"blocks.\1.mlp.linear_fc2.weight"),
    (r"final_layer\.adaln_modulation\.(1|2)\.weight", r"head.adaln.linear_\1.weight"),
    (r"final_layer\.linear\.weight", r"head.linear.weight"),
]

# The inverse tables, written out; tests check from_ours(map_key(k)) == k for every key of both layouts.
OURS_TO_DIFFUSERS: list[tuple[str, str]] = [
    (r"patch_embedding\.weight", r"patch_embed.proj.weight"),
    (r"pos_embedding\.pos_emb_(t|h|w)", r"learnable_pos_embed.pos_emb_\1"),
    (r"time_embedding\.linear_(1|2)\.weight", r"time_embed.t_embedder.linear_\1.weight"),
    (r"time_embedding\.norm_weight", r"time_embed.norm.weight"),
    *[
        (_B + rf"adaln_{sub}\.linear_(1|2)\.weight", rf"transformer_blocks.\1.norm{n}.linear_\2.weight")
        for sub, n in _ADALN.items()
    ],
    *[
        (_B + rf"{sub}\.linear_(q|k|v)\.weight", rf"transformer_blocks.\1.{a}.to_\2.weight")
        for sub, a in _ATTN.items()
    ],
    *[
        (_B + rf"{sub}\.linear_proj\.weight", rf"transformer_blocks.\1.{a}.to_out.0.weight")
        for sub, a in _ATTN.items()
    ],
    *[
        (_B + rf"{sub}\.(q|k)_norm\.weight", rf"transformer_blocks.\1.{a}.norm_\2.weight")
        for sub, a in _ATTN.items()
    ],
    (_B + r"mlp\.linear_fc1\.weight", r"transformer_blocks.\1.ff.net.0.proj.weight"),
    (_B + r"mlp\.linear_fc2\.weight", r"transformer_blocks.\1.ff.net.2.weight"),
    (r"head\.adaln\.linear_(1|2)\.weight", r"norm_out.linear_\1.weight"),
    (r"head\.linear\.weight", r"proj_out.weight"),
]

OURS_TO_ORIGINAL: list[tuple[str, str]] = [
    (r"patch_embedding\.weight", r"x_embedder.proj.1.weight"),
    (r"pos_embedding\.pos_emb_(t|h|w)", r"extra_pos_embedder.pos_emb_\1"),
    (r"time_embedding\.linear_(1|2)\.weight", r"t_embedder.1.linear_\1.weight"),
    (r"time_embedding\.norm_weight", r"t_embedding_norm.weight"),
    *[
        (_B + rf"adaln_{sub}\.linear_(1|2)\.weight", rf"blocks.\1.adaln_modulation_{sub}.\2.weight")
        for sub in _ADALN
    ],
    *[(_B + rf"{sub}\.linear_(q|k|v)\.weight", rf"blocks.\1.{sub}.\2_proj.weight") for sub in _ATTN],
    *[(_B + rf"{sub}\.linear_proj\.weight", rf"blocks.\1.{sub}.output_proj.weight") for sub in _ATTN],
    *[(_B + rf"{sub}\.(q|k)_norm\.weight", rf"blocks.\1.{sub}.\2_norm.weight") for sub in _ATTN],
    (_B + r"mlp\.linear_fc1\.weight", r"blocks.\1.mlp.layer1.weight"),
    (_B + r"mlp\.linear_fc2\.weight", r"blocks.\1.mlp.layer2.weight"),
    (r"head\.adaln\.linear_(1|2)\.weight", r"final_layer.adaln_modulation.\1.weight"),
    (r"head\.linear\.weight", r"final_layer.linear.weight"),
]

TABLES = {"diffusers": DIFFUSERS_TO_OURS, "original": ORIGINAL_TO_OURS}
INVERSE_TABLES = {"diffusers": OURS_TO_DIFFUSERS, "original": OURS_TO_ORIGINAL}


def _match(table, key: str) -> str | None:
    for pattern, template in table:
        m = re.fullmatch(pattern, key)
        if m:
            return m.expand(template)
    return None


def map_key(key: str, layout: str) -> str:
    """External key (``net.`` prefix already removed) -> our key; KeyError naming the key otherwise."""
    ours = _match(TABLES[layout], key)
    if ours is None:
        raise KeyError(f"no Cosmos {layout} mapping for key {key!r}")
    return ours


def from_ours(key: str, layout: str) -> str:
    """Our key -> the external layout's key (without prefix); KeyError naming the key otherwise."""
    ext = _match(INVERSE_TABLES[layout], key)
    if ext is None:
        raise KeyError(f"no Cosmos {layout} name for our key {key!r}")
    return ext


def detect_layout_of_keys(keys) -> str | None:
    """"original" (``net.``/``net_ema.`` keys), "diffusers" (``transformer_blocks.``), or None."""
    if any(k.startswith(ORIGINAL_PREFIXES) for k in keys):
        return "original"
    if any(k.startswith(("transformer_blocks.", "patch_embed.")) for k in keys):
        return "diffusers"
    return None


def strip_original(state_dict: dict, prefix: str | None = None) -> tuple[dict, str, list[str]]:
    """Original checkpoint -> (its network tensors without prefix, the prefix used, the dropped keys).

    ``prefix`` None picks ``net.`` or, when only that is present, ``net_ema.``; keys under any other
    prefix (optimizer state, the other copy of the weights) are ignored. Dropped: see module docstring.
    """
    if prefix is None:
        present = [p for p in ORIGINAL_PREFIXES if any(k.startswith(p) for k in state_dict)]
        if not present:
            raise KeyError(
                f"no key starts with {' or '.join(ORIGINAL_PREFIXES)} (first keys: {sorted(state_dict)[:3]}); "
                "not an original Cosmos-Predict2 checkpoint"
            )
        prefix = present[0]
    out, dropped = {}, []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if _DROPPED.fullmatch(name) or _DROPPED.fullmatch(name.rsplit(".", 1)[-1]):
            dropped.append(key)
            continue
        out[name] = value
    return out, prefix, dropped


def to_ours(state_dict: dict, layout: str) -> dict:
    """Map a full external state dict to our key names ("original": ``net.`` prefix and drops handled)."""
    if layout == "original":
        state_dict = strip_original(state_dict)[0]
    return {map_key(k, layout): v for k, v in state_dict.items()}


def to_external(state_dict: dict, layout: str, prefix: str = "net.") -> dict:
    """Our full state dict -> the external layout (the original one under ``prefix``)."""
    pre = prefix if layout == "original" else ""
    return {pre + from_ours(k, layout): v for k, v in state_dict.items()}
