"""Wan2.2: the TI2V-5B preset against diffusers' ``WanTransformer3DModel`` built from the 5B config's shape
at a tiny width (every parameter random, float32), with one timestep per sample and per token (TI2V's
clean first frame at t = 0; tangents against float64 torch.func.jvp), and the A14B
two-expert presets (their configs and import; the experts' switch, distillation and sampling:
tests/test_wan22_experts.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_rcm.convert.arch import preset_arch, to_diffusers_config
from megatron_rcm.convert.importer import run_import
from megatron_rcm.convert.wan_keys import to_ours
from megatron_rcm.models.wan import WanModel, wan_config
from megatron_rcm.models.wan.config import WAN22_BOUNDARY, WAN22_VAE_STRIDE
from megatron_rcm.parallel.sharding import load_full_state_dict
from megatron_rcm.parallel.state import initialize_parallel
from tests.test_convert_common import write_diffusers
from tests.wan_helpers import randomize_, rel_err

TOL = 1e-5  # float32 round-off between two implementations of the same math (measured ~3e-7)
QUIET = dict(progress=False, log=lambda *_: None)

# diffusers scripts/convert_wan_to_diffusers.py, get_transformer_config("Wan2.2-TI2V-5B") / ("Wan2.2-T2V-A14B")
# / ("Wan2.2-I2V-14B-720p"), typed here from that file (not derived from our presets)
TI2V_5B = dict(
    added_kv_proj_dim=None, attention_head_dim=128, cross_attn_norm=True, eps=1e-06, ffn_dim=14336,
    freq_dim=256, in_channels=48, num_attention_heads=24, num_layers=30, out_channels=48,
    patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads", text_dim=4096,
)  # fmt: skip
A14B = dict(TI2V_5B, ffn_dim=13824, in_channels=16, num_attention_heads=40, num_layers=40, out_channels=16)
I2V_A14B = dict(A14B, in_channels=36)
TINY = dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=256, num_layers=2, text_dim=32, freq_dim=32)


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(tensor_parallel=1)
    yield


@pytest.mark.parametrize(
    "preset,theirs", [("wan2.2-ti2v-5b", TI2V_5B), ("wan2.2-t2v-a14b", A14B), ("wan2.2-i2v-a14b", I2V_A14B)]
)
def test_presets_are_the_released_configs(preset, theirs):
    ours = to_diffusers_config(preset_arch(preset))
    assert {k: ours[k] for k in theirs} == theirs
    assert ours["image_dim"] is None  # no CLIP branch in any Wan2.2 model


def test_boundaries_and_vae_stride():
    assert WAN22_BOUNDARY == {"wan2.2-t2v-a14b": 0.875, "wan2.2-i2v-a14b": 0.900}
    assert WAN22_VAE_STRIDE["wan2.2-ti2v-5b"] == (4, 16, 16)


def _tiny_pair(seed: int = 0):
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel(**(TI2V_5B | TINY)).eval()
    randomize_(ref, seed)
    cfg = wan_config(
        "wan2.2-ti2v-5b", params_dtype=torch.float32, num_layers=2, hidden_size=128, ffn_hidden_size=256,
        num_attention_heads=4, text_dim=32, freq_dim=32,
    )  # fmt: skip
    ours = WanModel(cfg).eval()
    load_full_state_dict(ours, to_ours(ref.state_dict(), "diffusers"))
    return ref, ours


def _inputs(batch=2, frames=3, size=8):
    gen = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(batch, 48, frames, size, size, generator=gen),
        timestep=torch.rand(batch, generator=gen) * 1000,
        context=torch.randn(batch, 12, 32, generator=gen),
    )


def test_ti2v_5b_matches_diffusers_in_float32():
    ref, ours = _tiny_pair()
    assert ours.config.in_channels == 48 and ours.config.out_channels == 48
    inp = _inputs()
    with torch.no_grad():
        v = ours(inp["x"], inp["timestep"], inp["context"])
        v_ref = ref(inp["x"], inp["timestep"], inp["context"], return_dict=False)[0]
        # the TI2V pipeline's text-to-video call: the same timestep on every token ([B, S])
        S = 3 * 4 * 4
        v_tok = ref(inp["x"], inp["timestep"][:, None].expand(-1, S), inp["context"], return_dict=False)[0]
    assert v.shape == v_ref.shape == inp["x"].shape
    assert rel_err(v, v_ref) <= TOL and rel_err(v, v_tok) <= TOL


def test_ti2v_5b_tangent_matches_float64_jvp():
    """The 48-channel model's tangent path against torch.func.jvp of its own float64 forward."""
    _, ours = _tiny_pair(seed=3)
    ours = ours.double()
    inp = {k: v.double() for k, v in _inputs(batch=1, frames=2, size=4).items()}
    gen = torch.Generator().manual_seed(2)
    t_x = torch.randn(inp["x"].shape, generator=gen, dtype=torch.float64)
    t_ts = torch.randn(1, generator=gen, dtype=torch.float64) * 100
    from tests.test_wan_parity import plain_linears

    with torch.no_grad():
        v, t_v = ours.forward_jvp(inp["x"], t_x, inp["timestep"], t_ts, inp["context"])
    with plain_linears():
        v_ref, t_v_ref = torch.func.jvp(
            lambda x, ts: ours(x, ts, inp["context"]), (inp["x"], inp["timestep"]), (t_x, t_ts)
        )
    assert rel_err(v, v_ref) <= 1e-12 and rel_err(t_v, t_v_ref) <= 1e-6  # as tests/test_wan_parity.py


def _per_token(inp, frames=3, size=8):
    """The TI2V pipeline's timestep [B, S]: the first latent frame's tokens (image-conditioned) at t = 0, the
    others at the sample's t; its tangent [B, S] is dt on the noisy tokens and 0 on the clean ones."""
    B = inp["timestep"].shape[0]
    per_frame = (size // 2) ** 2  # patch (1, 2, 2)
    S = frames * per_frame
    noisy = torch.ones(B, S, dtype=inp["timestep"].dtype)
    noisy[:, :per_frame] = 0
    return inp["timestep"][:, None] * noisy, noisy


def test_ti2v_5b_per_token_timesteps_match_diffusers_in_float32():
    ref, ours = _tiny_pair(seed=5)
    inp = _inputs()
    ts_BS, _ = _per_token(inp)
    with torch.no_grad():
        v = ours(inp["x"], ts_BS, inp["context"])
        v_ref = ref(inp["x"], ts_BS, inp["context"], return_dict=False)[0]
        v_per_sample = ours(inp["x"], inp["timestep"], inp["context"])
    assert rel_err(v, v_ref) <= TOL
    # the clean first frame's modulation changes every token's output (attention mixes them): not vacuous
    assert rel_err(v_per_sample, v_ref) > 1e-2


def test_ti2v_5b_per_token_tangent_matches_float64_jvp():
    """Per-token time embedding, 6-way block modulation and head modulation ([s, B, D]) with their tangents
    against torch.func.jvp of the float64 forward, along the TI2V tangent (dt = 1 on noisy tokens, 0 on the
    clean first frame)."""
    _, ours = _tiny_pair(seed=6)
    ours = ours.double()
    inp = {k: v.double() for k, v in _inputs(batch=2, frames=2, size=4).items()}
    ts_BS, t_ts_BS = _per_token(inp, frames=2, size=4)
    t_ts_BS = t_ts_BS * torch.tensor([[30.0], [-70.0]], dtype=torch.float64)  # per-sample dt, 0 on frame 0
    gen = torch.Generator().manual_seed(2)
    t_x = torch.randn(inp["x"].shape, generator=gen, dtype=torch.float64)
    from tests.test_wan_parity import plain_linears

    with torch.no_grad():
        v, t_v = ours.forward_jvp(inp["x"], t_x, ts_BS, t_ts_BS, inp["context"])
        _, t_v_time = ours.forward_jvp(inp["x"], torch.zeros_like(t_x), ts_BS, t_ts_BS, inp["context"])
    with plain_linears():
        v_ref, t_v_ref = torch.func.jvp(lambda x, ts: ours(x, ts, inp["context"]), (inp["x"], ts_BS), (t_x, t_ts_BS))
        _, t_v_time_ref = torch.func.jvp(
            lambda ts: ours(inp["x"], ts, inp["context"]), (ts_BS,), (t_ts_BS,)
        )
    assert rel_err(v, v_ref) <= 1e-12 and rel_err(t_v, t_v_ref) <= 1e-6  # as tests/test_wan_parity.py
    assert rel_err(t_v_time, t_v_time_ref) <= 1e-6  # the time tangent alone (not hidden by t_x's part)


def test_timestep_and_tangent_shapes_are_checked():
    _, ours = _tiny_pair()
    inp = _inputs()
    ts_BS, t_ts_BS = _per_token(inp)
    with pytest.raises(ValueError, match=r"timestep must be \[B=2\] .* or \[B=2, S=48\].*got shape \(2, 47\)"):
        ours(inp["x"], ts_BS[:, :47], inp["context"])
    with pytest.raises(ValueError, match=r"t_timestep shape \(2,\) != timestep shape \(2, 48\)"):
        ours.forward_jvp(inp["x"], None, ts_BS, inp["timestep"], inp["context"])


def test_ti2v_5b_converts_from_diffusers(tmp_path):
    from tests.test_convert_import import _forward, _load_ours

    ref, _ = _tiny_pair(seed=4)
    report = run_import(write_diffusers(tmp_path / "pipe", ref), tmp_path / "ckpt", verify=True, **QUIET)
    assert report.plan.arch.in_channels == 48 and report.verify["rel"] <= 1e-5
    inp = _inputs() | {"clip": None}
    with torch.no_grad():
        v_ref = ref(inp["x"], inp["timestep"], inp["context"], return_dict=False)[0]
    assert rel_err(_forward(_load_ours(tmp_path / "ckpt"), inp), v_ref) <= TOL


def test_two_expert_pipeline_imports_both_experts_or_one_folder(tmp_path):
    from diffusers import WanTransformer3DModel

    high = WanTransformer3DModel(**(A14B | TINY | {"in_channels": 4, "out_channels": 4})).eval()
    low = WanTransformer3DModel(**(A14B | TINY | {"in_channels": 4, "out_channels": 4})).eval()
    randomize_(high, 1)
    randomize_(low, 2)
    root = write_diffusers(tmp_path / "pipe", high)
    low.save_pretrained(root / "transformer_2")
    report = run_import(root, tmp_path / "both", boundary_ratio=0.875, **QUIET)  # tests/test_wan22_experts.py
    assert report.tensors == 2 * len(high.state_dict())
    for name in ("transformer", "transformer_2"):
        report = run_import(root / name, tmp_path / name, **QUIET)
        assert report.tensors == len(high.state_dict())


def test_shapes_shared_by_two_presets_still_give_the_head_count():
    """Wan2.1-T2V-14B and a Wan2.2-T2V-A14B expert have the same tensors (and heads): an import without
    config.json takes the head count they agree on instead of asking for --num-heads."""
    from megatron_rcm.convert.arch import from_shapes, presets_with_shapes
    from megatron_rcm.convert.dist_ckpt import meta_sharded_state_dict, sharded_tensors

    arch = preset_arch("wan2.2-t2v-a14b")
    shapes = {k: tuple(v.global_shape) for k, v in sharded_tensors(meta_sharded_state_dict(arch)).items()}
    assert presets_with_shapes(from_shapes(shapes, num_heads=1)) == ["wan2.1-t2v-14b", "wan2.2-t2v-a14b"]
    assert from_shapes(shapes).num_attention_heads == 40
