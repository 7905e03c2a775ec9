"""Pinned host memory warmed before the first checkpoint save (issue 13, ``checkpoint.prewarm_host_memory``):
the block sizes match PyTorch's CachingHostAllocator (power-of-two rounding, one free list per size), the
warm-up runs beside the caller and allocates the union of what was asked, the trigger builds a state dict
only when the optimizers' state changes, and a run with the warm-up trains bit-identically. The allocation is
mocked on CPU; tests/test_ckpt_prewarm_gpu.py checks that the first save then makes no new pinned
allocation."""

import math
import threading
from collections import Counter

import pytest
import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_rcm.config import load_config
from megatron_rcm.training import Trainer
from megatron_rcm.training.host_prewarm import (
    HostMemoryPrewarmer,
    PrewarmTrigger,
    optimizer_state_counts,
    pinned_block_counts,
    pow2_ceil,
    preload_sizes,
)
from tests.test_ckpt_resume import TINY, _assert_same_history


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 4095, 4096, 4097, 2**20 - 1, 2**20, 2**20 + 1, 45 * 10**9])
def test_pow2_ceil_matches_the_allocator_rounding(n):
    expected = 2 ** math.ceil(math.log2(n)) if n < 2**40 else 2**36  # 45e9 bytes -> 64 GiB
    assert pow2_ceil(n) == expected >= n and (expected == 1 or expected // 2 < n)


def _st(key, t):
    return ShardedTensor.from_rank_offsets(key, t)


def test_preload_sizes_and_block_counts():
    sd = {
        "a": _st("a", torch.zeros(3, 5)),  # 60 bytes -> 64
        "b": {"c": [_st("c", torch.zeros(16, dtype=torch.bfloat16))]},  # 32 bytes -> 32
        "d": _st("d", torch.zeros(8, 6)[:, ::2]),  # strided view: to("cpu") allocates numel * 4 = 96 -> 128
        "e": _st("e", torch.zeros(0)),  # nothing to copy
        "f": torch.zeros(100),  # a plain tensor goes to common.pt, not through the preload
        "g": _st("g", torch.zeros(4, 4)),  # 64 -> 64
        "step": 3,
    }
    sizes = preload_sizes(sd, device_type="cpu")
    assert sorted(sizes) == [32, 60, 64, 96]
    assert pinned_block_counts(sizes) == Counter({64: 2, 32: 1, 128: 1})
    assert preload_sizes(sd, device_type="cuda") == []  # CPU tensors are not copied by the preload
    factory = ShardedTensorFactory("h", torch.zeros(2), lambda *a: {}, lambda x: x)
    with pytest.raises(NotImplementedError, match="ShardedTensorFactory.*prewarm_host_memory=false"):
        preload_sizes({**sd, "h": factory}, device_type="cpu")


class FakeAllocator:
    """Records each allocation and how many blocks were held at once; ``gate`` (if set) holds the first
    allocation until released."""

    def __init__(self, gate=None):
        self.sizes, self.live, self.peak, self.gate, self.threads = [], 0, 0, gate, set()
        self.lock = threading.Lock()

    def __call__(self, nbytes):
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.wait(20)
        alloc = self

        class Block:
            def __del__(self):
                with alloc.lock:
                    alloc.live -= 1

        with self.lock:
            self.sizes.append(nbytes)
            self.live += 1
            self.peak = max(self.peak, self.live)
        return Block()


def test_prewarmer_runs_beside_the_caller_and_allocates_the_union():
    gate = threading.Event()
    fake = FakeAllocator(gate)
    pw = HostMemoryPrewarmer(torch.device("cpu"), allocate=fake)
    pw.request(Counter({64: 2, 32: 1}))  # returns while the allocation is held up
    assert pw.warmed == Counter() and not fake.sizes
    pw.request(Counter({64: 1, 128: 3}))  # while the first is in flight
    gate.set()
    pw.wait()
    assert fake.threads == {"pinned-memory-warmup"}
    assert pw.warmed == Counter({64: 2, 32: 1, 128: 3})
    # the last pass held every block of the union at once (cached blocks come back first, then new ones)
    assert Counter(fake.sizes[-6:]) == pw.warmed and fake.peak == 6 and fake.live == 0
    n = len(fake.sizes)
    pw.request(Counter({64: 2}))  # nothing new: no pass
    pw.wait()
    assert len(fake.sizes) == n
    pw.finish()
    pw.request(Counter({1024: 1}))  # after the first save starts: nothing
    pw.wait()
    assert len(fake.sizes) == n and pw.warmed[1024] == 0


def test_prewarmer_failure_is_a_warning_not_an_error(caplog):
    def out_of_memory(_nbytes):
        raise RuntimeError("CUDA error: out of memory (injected)")

    pw = HostMemoryPrewarmer(torch.device("cpu"), allocate=out_of_memory)
    pw.request(Counter({64: 1}))
    pw.wait()
    assert isinstance(pw.error, RuntimeError) and "warm-up failed" in caplog.text


def test_trigger_builds_only_when_the_optimizer_state_changes():
    # the student's moments appear at its first step, the critic's only after the warm-up phase (and a
    # critic parameter can lag: 5 of 6)
    sigs = iter([{"student": (0, 4), "critic": (0, 6)}] * 3 + [{"student": (4, 4), "critic": (0, 6)}] * 2
                + [{"student": (4, 4), "critic": (5, 6)}] * 2 + [{"student": (4, 4), "critic": (6, 6)}] * 3)
    builds = []
    parts = {"model": {"w": _st("w", torch.zeros(4))},  # 16 bytes
             "student": {"ms": _st("ms", torch.zeros(100))},  # 400 bytes -> 512
             "critic": {"mc": _st("mc", torch.zeros(2, 100))}}  # 800 bytes -> 1024

    def build(names):
        builds.append(names)
        return {"model": parts["model"], **{n: parts[n] for n in names}}

    fake = FakeAllocator()
    pw = HostMemoryPrewarmer(torch.device("cpu"), allocate=fake)
    trigger = PrewarmTrigger(pw, signature=lambda: next(sigs), build=build, device_type="cpu")
    for _ in range(10):
        trigger.step()
        pw.wait()
    # step 0: the networks (no optimizer state yet: building it would materialize it); then each optimizer
    # once all its moments exist; never per step
    assert builds == [(), ("student",), ("critic", "student")]
    assert pw.warmed == Counter({16: 1, 512: 1, 1024: 1})
    # each pass takes the cached blocks back first, then allocates the new ones
    assert fake.sizes == [16, 16, 512, 16, 512, 1024]


def _cfg(tmp_path, name, *extra):
    return load_config(None, [*TINY, "training.max_steps=4", f"training.output_dir={tmp_path / name}",
                              f"checkpoint.dir={tmp_path / name / 'ckpt'}", "checkpoint.save_every=2", *extra])


def test_no_warmup_on_cpu(tmp_path):
    assert Trainer(_cfg(tmp_path, "a", "checkpoint.prewarm_host_memory=true")).prewarm is None


def test_training_with_warmup_is_bit_identical_and_warms_the_first_save(tmp_path):
    ref = Trainer(_cfg(tmp_path, "ref"))
    ref_history = ref.train()
    ref.close()

    run = Trainer(_cfg(tmp_path, "run"))
    fake = FakeAllocator()
    pw = HostMemoryPrewarmer(run.device, allocate=fake)
    opts = {"student": run.opt_student, "critic": run.opt_critic}
    # the trainer's own trigger, with the CPU's tensors counted as the ones the preload would copy
    run.prewarm = PrewarmTrigger(pw, signature=lambda: {n: optimizer_state_counts(o) for n, o in opts.items()},
                                 build=lambda names: run.sharded_state_dict(optimizers=names), device_type="cpu")
    expected = pinned_block_counts(preload_sizes(run.sharded_state_dict(), "cpu"))
    history = run.train()
    run.close()
    _assert_same_history(ref_history, history)
    for a, b in zip(ref.student.module.parameters(), run.student.module.parameters()):
        assert torch.equal(a, b)
    assert run.prewarm.builds == 1  # CpuAdamW's state is eager: full from step 0
    assert pw.finished and pw.warmed == expected and sum(expected.values()) > 10
