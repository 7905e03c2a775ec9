"""Kernel classes of a profiled step (``megatron_rcm.training.kernel_profile``): real kernel names from H100 /
H200 profiles of cuBLAS, cuDNN, FlashAttention, PyTorch, NCCL and this project's Triton / Gluon kernels."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_rcm.training.kernel_profile import (
    KERNEL_CLASSES,
    PROJECT_ATTENTION_KERNELS,
    classify_kernel,
    device_kernels,
    format_shares,
    kernel_shares,
)

ROOT = Path(__file__).resolve().parents[1]

REAL_NAMES = {
    "gemm": [
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_"
        "kernel__5x_cublas",
        "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_NNT",
        "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_TNT",
        "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>"
        "(cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8::Params)",
        "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, false, "
        "__nv_bfloat16, __nv_bfloat16, __nv_bfloat16, false, false, false>(cublasLt::cublasSplitKParams<float>, "
        "float const*, __nv_bfloat16 const*, __nv_bfloat16*, float const*, float const*, __nv_bfloat16 const*, "
        "__nv_bfloat16 const*, __nv_bfloat16*, void*, long, float*, int*)",
        "void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4, false, false, "
        "cublasGemvParamsEx<int, cublasGemvTensorStridedBatched<float const>, "
        "cublasGemvTensorStridedBatched<float const>, cublasGemvTensorStridedBatched<float>, float> >"
        "(cublasGemvParamsEx<int, cublasGemvTensorStridedBatched<float const>, "
        "cublasGemvTensorStridedBatched<float const>, cublasGemvTensorStridedBatched<float>, float>, float, float)",
    ],
    "attention": [
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
        "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false, false, false, "
        "false, true, true, false, false>(pytorch_flash::Flash_fwd_params)",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64, 128, 8, "
        "2, 4, 2, false, false, cutlass::bfloat16_t, Flash_kernel_traits<128, 64, 128, 8, cutlass::bfloat16_t> >, "
        "false, false, false, false, false, false, false>(pytorch_flash::Flash_bwd_params)",
        "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<"
        "flash::CollectiveMainloopFwdSm90<2, cute::tuple<cute::C<1>, cute::C<1>, cute::C<1> > > > > >"
        "(flash::FlashAttnFwdSm90::Params)",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_2_64x128x128_4x1x1_cga1x1x1_kernel0_0",
        "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
        "cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)",
        "fmha_cutlassB_bf16_aligned_64x64_k128_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<"
        "cutlass::arch::Sm80, cutlass::bfloat16_t, true, false, true, 64, 64, 128, false>::Params)",
        "_attn_fwd_jvp_kernel",
        *sorted(PROJECT_ATTENTION_KERNELS),
    ],
    "elementwise": [
        "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<"
        "at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::"
        "{lambda()#10}::operator()() const::{lambda(c10::BFloat16)#1}>(at::TensorIteratorBase&, "
        "at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::"
        "{lambda()#10}::operator()() const::{lambda(c10::BFloat16)#1} const&)::{lambda(int)#1}>(int, "
        "at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::"
        "{lambda()#3}::operator()() const::{lambda()#10}::operator()() const::{lambda(c10::BFloat16)#1}>"
        "(at::TensorIteratorBase&, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::"
        "operator()() const::{lambda()#10}::operator()() const::{lambda(c10::BFloat16)#1} const&)::"
        "{lambda(int)#1})",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
        "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
        "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
        "::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}, "
        "std::array<char*, 2ul>, 4, TrivialOffsetCalculator<1, unsigned int>, TrivialOffsetCalculator<1, "
        "unsigned int>, at::native::memory::LoadWithCast<1>, at::native::memory::StoreWithCast<1> >(int, "
        "at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::"
        "{lambda()#7}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul>, TrivialOffsetCalculator<1, "
        "unsigned int>, TrivialOffsetCalculator<1, unsigned int>, at::native::memory::LoadWithCast<1>, "
        "at::native::memory::StoreWithCast<1>)",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
        "at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, "
        "unsigned int, float, 4, 4> >(at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
        "at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, "
        "unsigned int, float, 4, 4>)",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, false>(int, "
        "float, c10::BFloat16 const*, c10::BFloat16 const*, c10::BFloat16 const*, float*, float*, c10::BFloat16*)",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
        "at::native::(anonymous namespace)::SoftMaxForwardEpilogue>(float*, float const*, int)",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, "
        "(at::native::ADAM_MODE)1, false>, double*, double, double, double, double, double, bool, double*, "
        "double*>(at::native::(anonymous namespace)::TensorListMetadata<4>, at::native::(anonymous namespace)::"
        "FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)1, false>, double*, double, double, double, double, "
        "double, bool, double*, double*)",
        "Memcpy DtoD (Device -> Device)",
        "Memcpy HtoD (Pageable -> Device)",
        "Memset (Device)",
        "triton_poi_fused__to_copy_add_mul_0",
        "triton_red_fused_native_layer_norm_0",
        "_ln_jvp_fwd", "_ln_bwd", "_gate_jvp_fwd", "_gate_bwd", "_gelu_jvp_fwd", "_gelu_bwd", "_rope_jvp",
        "_rms_jvp_fwd", "_rms_bwd",
    ],
    "nccl": [
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
        "ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
        "ncclKernel_AllGather_RING_LL_Sum_int8_t(ncclWork*)",
    ],
}


@pytest.mark.parametrize("cls", KERNEL_CLASSES)
def test_real_kernel_names_classified(cls):
    wrong = {n[:80]: classify_kernel(n) for n in REAL_NAMES[cls] if classify_kernel(n) != cls}
    assert not wrong, f"expected {cls}: {wrong}"


def test_every_project_triton_kernel_has_a_class():
    """Each ``@triton.jit`` / ``@gluon.jit`` kernel of kernels/*.py launched by name: attention kernels are in
    ``PROJECT_ATTENTION_KERNELS`` (so a new one cannot silently count as elementwise), the rest elementwise."""
    jit = re.compile(r"@(?:triton|gluon)\.jit[^\n]*\n(?:@[^\n]*\n)*\s*def\s+(\w+)")
    found = {}
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for name in jit.findall(path.read_text()):
            found[name] = path.name
    attention = {n for n, f in found.items() if f.startswith("attention")}
    # the launched attention kernels (the others are @jit helpers inlined into them)
    assert PROJECT_ATTENTION_KERNELS <= attention, sorted(PROJECT_ATTENTION_KERNELS - attention)
    for name in PROJECT_ATTENTION_KERNELS:
        assert classify_kernel(name) == "attention", name
    for name, f in found.items():
        if f.startswith("elementwise"):
            assert classify_kernel(name) == "elementwise", (name, f)


def test_shares_sum_per_class_and_rank_the_top_kernels():
    kernels = [("nvjet_a", 600.0), ("Memcpy DtoD (Device -> Device)", 50.0), ("_attn_jvp_fwd", 250.0),
               ("nvjet_a", 40.0), ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 10.0), ("_ln_jvp_fwd", 50.0)]
    s = kernel_shares(kernels, top=3)
    assert s["launches"] == 6 and s["kernel_ms"] == pytest.approx(1.0)
    assert s["ms"] == pytest.approx({"gemm": 0.64, "attention": 0.25, "elementwise": 0.1, "nccl": 0.01})
    assert sum(s["share"].values()) == pytest.approx(1.0) and s["share"]["elementwise"] == pytest.approx(0.1)
    assert [r["name"] for r in s["top"]] == ["nvjet_a", "_attn_jvp_fwd", "Memcpy DtoD (Device -> Device)"]
    assert s["top"][0]["ms"] == pytest.approx(0.64) and s["top"][0]["class"] == "gemm"
    table = format_shares("student", s)
    assert "elementwise" in table and "10.0%" in table and "nvjet_a" in table
    assert kernel_shares([])["share"]["gemm"] == 0.0
    with pytest.raises(ValueError, match="'x' has a negative time"):
        kernel_shares([("x", -1.0)])


def test_device_kernels_keeps_device_events_only():
    from torch.autograd import DeviceType

    ev = lambda name, dev, us: SimpleNamespace(  # noqa: E731
        name=name, device_type=dev, time_range=SimpleNamespace(elapsed_us=lambda: us))
    events = [ev("aten::mm", DeviceType.CPU, 900), ev("nvjet_a", DeviceType.CUDA, 30), ev("Memset (Device)",
                                                                                            DeviceType.CUDA, 2)]
    assert device_kernels(events) == [("nvjet_a", 30.0), ("Memset (Device)", 2.0)]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU refusal")
def test_bench_step_profile_needs_cuda(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools/bench_step.py"), "--profile"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert r.returncode == 2 and "--profile classifies CUDA kernels: it needs a GPU" in r.stderr, r.stderr[-2000:]
