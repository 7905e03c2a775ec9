"""Transformer Engine switch without TE (CPU): config validation, the clear errors, the tangent rules the TE
layers use (checked against torch.func.jvp in float64), and that the tangent of a linear gets its own call
inside an FP8 region."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_rcm.config import ConfigError, load_config
from megatron_rcm.models import jvp
from megatron_rcm.models.te_support import DELAYED_REFUSED, TE_INSTALL_HINT, TEMissingError, fp8_mode_fields
from megatron_rcm.models.wan import wan_config
from megatron_rcm.models.wan.spec import get_wan_block_spec
from megatron_rcm.training.models import build_wan_config


def _model_cfg(*sets):
    return load_config(None, ["data.source=mock", *sets]).model


def test_model_section_maps_onto_megatron_fields():
    cfg = build_wan_config(_model_cfg("model.transformer_impl=transformer_engine", "model.fp8=current"))
    assert (cfg.transformer_impl, cfg.fp8, cfg.fp8_recipe) == ("transformer_engine", "hybrid", "tensorwise")
    cfg = build_wan_config(_model_cfg("model.transformer_impl=transformer_engine", "model.fp8=mxfp8"))
    assert (cfg.fp8, cfg.fp8_recipe) == ("e4m3", "mxfp8")
    cfg = build_wan_config(_model_cfg())
    assert (cfg.transformer_impl, cfg.fp8) == ("local", None)  # Megatron's default would be transformer_engine
    assert cfg.disable_parameter_transpose_cache  # TE re-casts weights every call (no stale FP8 weight cache)


@pytest.mark.parametrize(
    "sets, words",
    [
        (["model.transformer_impl=te"], ["model.transformer_impl", "local, transformer_engine"]),
        (["model.transformer_impl=transformer_engine", "model.fp8=delayed"], ["delayed", "twice"]),
        (["model.transformer_impl=transformer_engine", "model.fp8=e4m3"], ["model.fp8", "current, mxfp8"]),
        (["model.fp8=current"], ["model.fp8", "transformer_engine"]),
        (["model.transformer_impl=transformer_engine", "model.fp8=current", "model.params_dtype=fp32"],
         ["params_dtype=bf16"]),
    ],
)
def test_model_section_errors(sets, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.source=mock", *sets])
    for w in words:
        assert w in str(err.value)


def test_wan_config_refuses_unimplemented_settings():
    with pytest.raises(ValueError, match="several times per step"):
        wan_config("wan-tiny-t2v", transformer_impl="transformer_engine", fp8="hybrid", fp8_recipe="delayed")
    with pytest.raises(ValueError, match="blockwise.*not implemented"):
        wan_config("wan-tiny-t2v", transformer_impl="transformer_engine", fp8="hybrid", fp8_recipe="blockwise")
    with pytest.raises(ValueError, match="needs transformer_impl='transformer_engine'"):
        wan_config("wan-tiny-t2v", fp8="hybrid", fp8_recipe="tensorwise")
    with pytest.raises(ValueError, match="inference_optimized"):
        wan_config("wan-tiny-t2v", transformer_impl="inference_optimized")
    with pytest.raises(ValueError, match="use_te.*removed.*transformer_impl"):
        wan_config("wan-tiny-t2v", use_te=True)
    with pytest.raises(ValueError, match="delayed"):
        fp8_mode_fields("delayed")
    assert "amax" in DELAYED_REFUSED


def test_cosmos_refuses_transformer_engine():
    from megatron_rcm.models.cosmos import cosmos_config

    with pytest.raises(NotImplementedError, match="Wan DiT only"):
        cosmos_config("cosmos-tiny-t2i", transformer_impl="transformer_engine")


def test_missing_te_gives_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import fails as without TE installed
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    with pytest.raises(TEMissingError) as err:
        get_wan_block_spec("transformer_engine")
    assert TE_INSTALL_HINT in str(err.value) and 'pip install -e ".[te]"' in str(err.value)
    with pytest.raises(ValueError, match="expected one of local, transformer_engine"):
        get_wan_block_spec("te")


def test_import_without_te_does_not_import_it():
    code = ("import sys; sys.modules['transformer_engine'] = None; import megatron_rcm, megatron_rcm.models.wan, "
            "megatron_rcm.training.trainer; from megatron_rcm.models.wan.spec import get_wan_block_spec; "
            "get_wan_block_spec('local'); print('ok')")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_layer_norm_tangent_matches_autodiff_float64():
    g = torch.Generator().manual_seed(0)
    x, t_x = torch.randn(5, 3, 16, generator=g, dtype=torch.float64), torch.randn(5, 3, 16, generator=g,
                                                                                   dtype=torch.float64)
    w, b = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    _, ref = torch.func.jvp(lambda z: F.layer_norm(z, (16,), w, b, eps=1e-6), (x,), (t_x,))
    t_y = jvp.layer_norm_tangent(x, t_x, 1e-6, w)
    assert torch.allclose(t_y, ref, atol=1e-12, rtol=1e-10)
    _, t_y2 = jvp.layer_norm_jvp(x, t_x, 1e-6, w, b)
    assert torch.equal(t_y, t_y2)


class _FusedNormLinear(torch.nn.Module):
    """What TE's LayerNormLinear (Megatron wrapper, skip_bias_add) looks like to ``norm_linear_jvp``."""

    def __init__(self, d_in, d_out, zero_centered_gamma=False):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.weight = torch.nn.Parameter(torch.randn(d_out, d_in, generator=g, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(d_out, generator=g, dtype=torch.float64))
        self.layer_norm_weight = torch.nn.Parameter(torch.randn(d_in, generator=g, dtype=torch.float64))
        self.layer_norm_bias = torch.nn.Parameter(torch.randn(d_in, generator=g, dtype=torch.float64))
        self.eps, self.zero_centered_gamma = 1e-6, zero_centered_gamma
        self.calls = []

    def gamma(self):
        return self.layer_norm_weight + 1 if self.zero_centered_gamma else self.layer_norm_weight

    def reference(self, x):
        return F.linear(F.layer_norm(x, x.shape[-1:], self.gamma(), self.layer_norm_bias, self.eps), self.weight,
                        self.bias)

    def forward(self, x):
        self.calls.append(x)
        h = F.layer_norm(x, x.shape[-1:], self.gamma(), self.layer_norm_bias, self.eps)
        return F.linear(h, self.weight), self.bias


@pytest.mark.parametrize("zero_centered", [False, True])
def test_norm_linear_jvp_matches_autodiff_float64(zero_centered):
    layer = _FusedNormLinear(16, 8, zero_centered)
    gemm_inputs = []

    def tangent_gemm(t):
        gemm_inputs.append(t)
        return F.linear(t, layer.weight), None

    g = torch.Generator().manual_seed(2)
    x, t_x = (torch.randn(6, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    x.requires_grad_(True)
    y, t_y = jvp.norm_linear_jvp(layer, tangent_gemm, x, t_x)
    ref_y, ref_t = torch.func.jvp(layer.reference, (x.detach(),), (t_x,))
    assert torch.allclose(y, ref_y, atol=1e-12) and torch.allclose(t_y, ref_t, atol=1e-10, rtol=1e-10)
    assert len(layer.calls) == 1 and len(gemm_inputs) == 1  # the fused LN never sees the tangent
    assert y.requires_grad and not t_y.requires_grad
    y.sum().backward()  # weight gradient from the primal only
    ref_w = torch.autograd.grad(layer.reference(x.detach()).sum(), layer.weight)[0]
    assert torch.allclose(layer.weight.grad, ref_w, atol=1e-10)


class _RecordingLinear(torch.nn.Module):
    """A Megatron-style linear (returns ``(x W^T, b)``) that records the amax of every input it quantizes."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 8, dtype=torch.float64))
        self.bias = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
        self.amaxes = []

    def forward(self, x):
        self.amaxes.append(float(x.abs().max()))
        return F.linear(x, self.weight), self.bias


@pytest.mark.parametrize("fp8", [False, True])
def test_linear_tangent_own_call_under_fp8(monkeypatch, fp8):
    """No grad, no FP8: primal and tangent share one GEMM (stacked). Inside an FP8 region: two calls, so the
    tangent (here 1000x smaller than the primal) is quantized with its own amax."""
    monkeypatch.setattr(jvp, "fp8_active", lambda: fp8)
    layer = _RecordingLinear()
    x = torch.randn(3, 2, 8, dtype=torch.float64) * 10
    t_x = torch.randn(3, 2, 8, dtype=torch.float64) * 1e-2
    with torch.no_grad():
        y, t_y = jvp.linear_jvp(layer, x, t_x)
    assert torch.allclose(y, F.linear(x, layer.weight, layer.bias)) and torch.allclose(t_y, F.linear(t_x, layer.weight))
    if fp8:
        assert layer.amaxes == [float(x.abs().max()), float(t_x.abs().max())]
    else:
        assert layer.amaxes == [float(x.abs().max())]  # one stacked call: the tangent shares the primal's scale


def test_autocast_net_wraps_each_call():
    from megatron_rcm.training.autocast_net import AutocastNet

    events = []

    class Ctx:
        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append("exit")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            events.append("forward")
            return x

        def forward_jvp(self, x, t):
            events.append("jvp")
            return x, t

    net = AutocastNet(Net(), Ctx)
    net(1)
    net.forward_jvp(1, 2)
    assert events == ["enter", "forward", "exit", "enter", "jvp", "exit"]
    assert next(net.parameters()).shape == (1,)


def test_fp8_curves_tool_config_and_plot(tmp_path):
    """tools/fp8_curves.py: its configs are valid (FP8-friendly token counts), the curve metric and the PNG."""
    from PIL import Image

    sys.path.insert(0, "tools")
    try:
        import fp8_curves
    finally:
        sys.path.remove("tools")
    for fp8 in (None, "current"):
        cfg = load_config(None, fp8_curves._overrides(200, fp8, str(tmp_path)))
        wan = build_wan_config(cfg.model, cfg.data)
        C, F_, H, W = cfg.data.latent_shape
        tokens = F_ * H * W // 4 * cfg.data.micro_batch_size
        assert tokens % 16 == 0 and (cfg.data.text_len * cfg.data.micro_batch_size) % 16 == 0
        assert wan.hidden_size // wan.num_attention_heads == 128
    d = fp8_curves.curve_difference([1.0, 2.0, 4.0], [1.1, 2.0, 3.0])
    assert d["max_rel_diff"] == pytest.approx(0.25) and d["mean_rel_diff"] == pytest.approx(0.35 / 3)
    png = tmp_path / "c.png"
    fp8_curves.plot({"a": [1.0, 0.5, 0.2], "b": [1.1, 0.4, 0.25]}, png, "t")
    assert Image.open(png).size == (900, 500)
