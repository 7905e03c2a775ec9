"""Typed experiment configuration: one dataclass per concern, a docstring per field.

Precedence when loading (see ``megatron_rcm.config.loader``): command line > YAML file > these defaults.
The ``distill`` section is the rCM engine's own ``DistillConfig`` (``megatron_rcm.rcm``); it is
imported lazily so that reading a config never imports the engine's dependencies before needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _default_distill() -> Any:
    from megatron_rcm.rcm import DistillConfig

    return DistillConfig()


@dataclass
class ModelConfig:
    preset: str = "wan-tiny-t2v"
    """Name of a ``megatron_rcm.models.wan.wan_config`` preset (wan2.1-t2v-1.3b, wan2.1-t2v-14b, ...)."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """Keyword overrides passed to ``wan_config`` (e.g. ``{in_channels: 16, num_layers: 2}``)."""

    params_dtype: str = "bf16"
    """Dtype of the model parameters: ``bf16`` (reference; fp32 master weights live in the optimizer),
    ``fp16`` or ``fp32``."""

    teacher_checkpoint: str | None = None
    """Teacher weights: a ``dist_checkpointing`` directory written by this package (``model`` entry of a
    checkpoint, or a teacher export), or None to start from random weights (tests, throughput runs)."""

    student_checkpoint: str | None = None
    """Student initialization: None (the rCM default) starts the student as a copy of the teacher; a path
    (any format ``model.teacher_checkpoint`` takes, e.g. an rCM / TurboDiffusion student ``.pt`` of
    ``net.``/``net_ema.`` keys, or its ``tools/convert.py import`` output) starts the student and its EMA
    from those weights instead, to continue distilling a released student. The critic still starts from
    the teacher; a resumed run takes all three from its own checkpoint."""

    recompute: bool = False
    """Activation recompute (Megatron ``recompute_granularity=full``) for the trained networks: trades one
    extra forward of the recomputed blocks for their activation memory."""

    recompute_method: str = "uniform"
    """With ``recompute``: ``uniform`` (every block, Megatron's uniform method with one layer per chunk) or
    ``block`` (the first ``recompute_num_layers`` blocks of each pipeline stage; the rest keep their
    activations: faster where the memory allows)."""

    recompute_num_layers: int | None = None
    """Blocks recomputed per pipeline stage with ``recompute_method=block`` (1 .. the model's num_layers;
    null or 1 with ``uniform``)."""

    recompute_granularity: str = "full"
    """With ``recompute``, Megatron's names: ``full`` re-runs each recomputed block whole; ``selective`` (Wan
    only) re-runs all but its self-attention core, whose q, k, v, o stay stored, so the attention kernel (the
    JVP kernel in the JVP pass) runs once instead of twice (docs/throughput.md). The methods above pick the
    blocks for both."""

    fused_elementwise: str | bool = "auto"
    """Wan models: fused primal+tangent Triton kernels for the block's elementwise chains (norm + modulation,
    gated residual, RoPE, q/k RMSNorm, GELU-tanh; docs/kernels.md): ``auto`` (on for CUDA bf16/fp16
    tensors), ``true``, ``false`` (the PyTorch reference). ``--set model.fused_elementwise=false|true``
    measures a step before/after."""
    fused_qkv: bool = False
    """Wan models: the self-attention's q, k, v from one column-parallel linear (one GEMM, under sequence
    parallelism one all-gather instead of three; docs/throughput.md). Checkpoints keep the q/k/v names and
    shapes: they resume and load with either setting."""
    transformer_impl: str = "local"
    """Linear layers (Megatron's ``transformer_impl``): ``local`` (Megatron's tensor-parallel linears) or
    ``transformer_engine`` (Transformer Engine's, with a tangent path; needs ``pip install -e ".[te]"``).
    Checkpoints load across the two."""

    fp8: str | None = None
    """FP8 GEMMs (``transformer_engine`` only): null (BF16), ``current`` (per-tensor current scaling, Hopper and
    newer) or ``mxfp8`` (MXFP8 block scaling, Blackwell). Delayed scaling is refused (the student is called
    several times per step)."""

    def _validate_recompute(self) -> None:
        from megatron_rcm.models.config_fields import RECOMPUTE_GRANULARITIES, RECOMPUTE_METHODS

        _check(self.recompute_granularity in RECOMPUTE_GRANULARITIES, "model.recompute_granularity",
               self.recompute_granularity, "one of " + ", ".join(RECOMPUTE_GRANULARITIES))
        if self.recompute_granularity == "selective" and not self.recompute:
            raise ConfigError("model.recompute_granularity='selective' needs model.recompute=true (how to "
                              "recompute when recompute is on)")
        _check(self.recompute_method in RECOMPUTE_METHODS, "model.recompute_method", self.recompute_method,
               "one of " + ", ".join(RECOMPUTE_METHODS))
        n = self.recompute_num_layers
        if self.recompute_method == "block":
            if not self.recompute:
                raise ConfigError("model.recompute_method='block' needs model.recompute=true (which blocks to "
                                  "recompute when recompute is on)")
            _check(isinstance(n, int) and not isinstance(n, bool) and n >= 1, "model.recompute_num_layers", n,
                   "a positive integer with recompute_method=block (blocks recomputed per pipeline stage)")
        else:
            _check(n in (None, 1), "model.recompute_num_layers", n,
                   "null or 1 with recompute_method=uniform (every block; recompute_method=block recomputes "
                   "the first N)")

    def validate(self) -> None:
        _check(self.params_dtype in ("bf16", "fp16", "fp32"), "model.params_dtype", self.params_dtype,
               "one of bf16, fp16, fp32")
        self._validate_recompute()
        _check(self.fused_elementwise in ("auto", True, False), "model.fused_elementwise",
               self.fused_elementwise, "one of auto, true, false")
        _check(isinstance(self.fused_qkv, bool), "model.fused_qkv", self.fused_qkv, "true or false")
        from megatron_rcm.models.te_support import DELAYED_REFUSED, TRANSFORMER_IMPLS

        _check(self.transformer_impl in TRANSFORMER_IMPLS, "model.transformer_impl", self.transformer_impl,
               "one of " + ", ".join(TRANSFORMER_IMPLS))
        if self.fp8 == "delayed":
            raise ConfigError(f"model.fp8='delayed': {DELAYED_REFUSED}")
        _check(self.fp8 in (None, "current", "mxfp8"), "model.fp8", self.fp8, "one of null, current, mxfp8")
        if self.fp8 is not None and self.transformer_impl != "transformer_engine":
            raise ConfigError(f"model.fp8={self.fp8!r} needs model.transformer_impl=transformer_engine (FP8 GEMMs "
                              f"are Transformer Engine's), got {self.transformer_impl!r}")
        if self.fp8 is not None and self.params_dtype != "bf16":
            raise ConfigError(f"model.fp8={self.fp8!r} needs model.params_dtype=bf16, got {self.params_dtype!r}")


@dataclass
class OptimizerConfig:
    lr: float = 2e-6
    """Student peak learning rate (reference: 2e-6 for Wan2.1 1.3B, 1e-6 for 14B)."""

    critic_lr: float = 4e-7
    """Fake-score critic peak learning rate (reference: 4e-7 for 1.3B, 1e-7 for 14B)."""

    beta1: float = 0.0
    """AdamW beta1 (rCM uses 0: no first-moment momentum)."""

    beta2: float = 0.999
    """AdamW beta2."""

    eps: float = 1e-8
    """AdamW epsilon."""

    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay."""

    clip_grad: float = 1.0
    """Clip the global gradient 2-norm to this value; 0 disables clipping."""

    warmup_steps: int = 100
    """Linear learning-rate warm-up, in optimizer steps of each network: lr * min(1, (k+1)/warmup)."""

    grad_accumulation_steps: int = 1
    """Micro-batches accumulated into one optimizer step."""

    def validate(self) -> None:
        _check(self.lr > 0, "optimizer.lr", self.lr, "> 0")
        _check(self.critic_lr > 0, "optimizer.critic_lr", self.critic_lr, "> 0")
        _check(0 <= self.beta1 < 1, "optimizer.beta1", self.beta1, "in [0, 1)")
        _check(0 <= self.beta2 < 1, "optimizer.beta2", self.beta2, "in [0, 1)")
        _check(self.clip_grad >= 0, "optimizer.clip_grad", self.clip_grad, ">= 0")
        _check(self.warmup_steps >= 0, "optimizer.warmup_steps", self.warmup_steps, ">= 0")
        _check(self.grad_accumulation_steps >= 1, "optimizer.grad_accumulation_steps",
               self.grad_accumulation_steps, ">= 1")


@dataclass
class DataConfig:
    source: str = "shards"
    """``shards`` (tar shards written by tools/make_shards.py), ``mock`` (random tensors of the shapes
    below, for throughput runs), ``digits`` (the embedded quickstart data set) or ``shapes`` (procedural
    moving-shape clips of ``latent_shape`` [3, F, H, W], the embedded video benchmark)."""

    path: str | None = None
    """Directory holding the tar shards (and their ``index.json``) when ``source: shards``."""

    micro_batch_size: int = 1
    """Samples per data-parallel rank per micro-batch."""

    latent_shape: list[int] = field(default_factory=lambda: [16, 21, 60, 104])
    """Latent shape ``[C, F, H, W]`` of one sample (mock data; checked against the shards)."""

    text_len: int = 512
    """Text tokens per sample; shorter embeddings are zero-padded (as Wan does), longer ones are an error."""

    text_dim: int = 4096
    """Text-embedding width (umT5-XXL: 4096)."""

    shuffle: bool = True
    """Shuffle the global sample order each epoch (seeded by ``training.seed`` and the epoch)."""

    def validate(self) -> None:
        _check(self.source in ("shards", "mock", "digits", "shapes"), "data.source", self.source,
               "one of shards, mock, digits, shapes")
        _check(self.source != "shards" or bool(self.path), "data.path", self.path,
               "a directory of tar shards when data.source is 'shards'")
        _check(self.micro_batch_size >= 1, "data.micro_batch_size", self.micro_batch_size, ">= 1")
        _check(len(self.latent_shape) == 4 and all(int(s) > 0 for s in self.latent_shape),
               "data.latent_shape", self.latent_shape, "four positive sizes [C, F, H, W]")
        _check(self.text_len >= 1, "data.text_len", self.text_len, ">= 1")
        _check(self.text_dim >= 1, "data.text_dim", self.text_dim, ">= 1")


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Checkpoint directory (``step_<8-digit step>`` subdirectories and a ``latest`` pointer); None: no saving."""

    save_every: int = 500
    """Save every this many steps (and at the end of training); 0 saves only at the end."""

    keep_last: int = 3
    """Keep this many most recent checkpoints; older ones are deleted after a successful save."""

    resume: str = "auto"
    """``auto``: resume from ``dir/latest`` when present; ``never``; or a path to one checkpoint."""

    async_save: bool = True
    """Write checkpoints in the background: a save stops training only to copy the state to host memory
    (seconds, instead of the whole write: 99 s for the 45 GB of a Wan 1.3B rCM run), a forked writer process
    persists it while training goes on, and ``latest`` moves once every rank's write is finalized (polled
    each step). The same default on CPU and CUDA: the protocol's guarantees are the same, and one code path
    is tested everywhere. False: the trainer waits for the write (no second process holding a host copy)."""

    prewarm_host_memory: bool = False
    """Before the first asynchronous save, fill PyTorch's pinned host memory cache in a background thread with
    the blocks the save's device-to-host copy will take (sizes from the sharded state dict; the optimizers'
    once their moments exist), so that the first save does not stall on fresh pinned allocations (36.6 s of
    a 39 s stall for Wan 1.3B's 45 GB; the second save: 0.96 s). The same pinned memory the first save would
    hold, held from the first steps on. CUDA with async_save and one rank per data-parallel group only; a
    no-op otherwise. Measured on one H200 (2026-12-01, docs/benchmarks.md): the first save's stall 3.2 s instead
    of 39 s, for 65.6 GB of pinned blocks warmed in 33 s beside training. Off by default (it holds that host
    memory from the first steps on, and refuses fused QKV's factory tensors); the example configs turn it on.
    See megatron_rcm/training/host_prewarm.py."""

    optim_fully_reshardable: bool = False
    """How the distributed optimizer's state is written (Megatron-LM's ``--dist-ckpt-optim-fully-reshardable``).
    False (Megatron's default): each rank writes its own shard of the optimizer buffers, no gather — the
    checkpoint resumes at another data- or context-parallel size but not at another TP or PP size. True: the
    buffers are gathered into per-parameter tensors (resumes at any layout; the gather stalled a Wan 1.3B
    save by about 70 s on an H200). Only the CUDA DistributedOptimizer reads it (the CPU optimizer's
    checkpoints are per-parameter always)."""

    def validate(self) -> None:
        _check(self.save_every >= 0, "checkpoint.save_every", self.save_every, ">= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, ">= 1")


@dataclass
class LoggingConfig:
    log_every: int = 10
    """Print/log metrics every this many steps."""

    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""

    wandb_mode: str = "disabled"
    """``disabled``, ``offline`` or ``online``; the env var WANDB_MODE overrides it when set.
    wandb is imported only when not disabled."""

    wandb_project: str = "megatron-rcm"
    """wandb project name."""

    sample_every: int = 0
    """Write a PNG grid of student samples every this many steps (0: never)."""

    sample_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Student sampling step counts shown in the sample grids."""

    num_samples: int = 8
    """Samples per grid row."""

    def validate(self) -> None:
        _check(self.log_every >= 1, "logging.log_every", self.log_every, ">= 1")
        _check(self.wandb_mode in ("disabled", "offline", "online"), "logging.wandb_mode", self.wandb_mode,
               "one of disabled, offline, online")
        _check(all(int(n) >= 1 for n in self.sample_steps), "logging.sample_steps", self.sample_steps,
               "positive step counts")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    """Tensor-parallel size (Megatron TP)."""

    context_parallel: int = 1
    """Context-parallel size: the patchified token sequence of each sample is split over this many ranks
    (docs/parallelism.md). World size = TP x CP x DP."""

    cp_comm_type: str = "p2p"
    """Context-parallel attention (Megatron's names): ``p2p`` ring (any CP size), ``a2a`` Ulysses (CP must
    divide the heads per TP rank), ``a2a+p2p`` (Ulysses inside groups, the ring across them: set
    ``hierarchical_context_parallel_sizes``)."""

    hierarchical_context_parallel_sizes: list | None = None
    """Megatron's name: [A, R] with A x R = context_parallel, for ``cp_comm_type: a2a+p2p``: Ulysses all-to-all
    inside each group of A consecutive CP ranks (A must divide the heads per TP rank), a ring of R groups."""

    cp_a2a_head_groups: int = 1
    """``cp_comm_type: a2a`` only: G > 1 splits Ulysses' all-to-all into G head groups, each sent
    asynchronously while the previous group's attention runs (docs/parallelism.md); G must divide the heads
    per CP rank (heads / TP / CP). 1: one all-to-all each way (not overlapped)."""

    pipeline_parallel: int = 1
    """Pipeline-parallel size: the transformer blocks split evenly into this many stages (docs/parallelism.md).
    World size = TP x CP x PP x DP; PP > 1 with CP > 1 is not implemented."""

    virtual_pipeline: int = 1
    """Virtual stages (model chunks) per pipeline rank; > 1 runs Megatron's interleaved schedule (layers must
    divide by PP x V, ``pipeline_microbatches`` must be a multiple of PP)."""

    pipeline_microbatches: int = 1
    """Under pipeline parallelism, the micro-batches each network call's batch is split into for Megatron's
    schedule (1F1B for the calls that carry a gradient); must divide the batch (CFG calls double it)."""

    distributed_optimizer: bool = True
    """Megatron DistributedOptimizer (ZeRO-1 sharded fp32 master weights) on CUDA. On CPU the trainer
    falls back to a plain fp32 torch AdamW with the same hyperparameters and logs it."""

    def validate(self) -> None:
        _check(self.tensor_parallel >= 1, "parallel.tensor_parallel", self.tensor_parallel, ">= 1")
        _check(self.context_parallel >= 1, "parallel.context_parallel", self.context_parallel, ">= 1")
        _check(self.cp_comm_type in ("p2p", "a2a", "a2a+p2p"), "parallel.cp_comm_type", self.cp_comm_type,
               "one of p2p, a2a, a2a+p2p")
        _check(not isinstance(self.cp_a2a_head_groups, bool) and isinstance(self.cp_a2a_head_groups, int)
               and self.cp_a2a_head_groups >= 1, "parallel.cp_a2a_head_groups", self.cp_a2a_head_groups,
               "a positive integer")
        _check(self.pipeline_parallel >= 1, "parallel.pipeline_parallel", self.pipeline_parallel, ">= 1")
        _check(self.virtual_pipeline >= 1, "parallel.virtual_pipeline", self.virtual_pipeline, ">= 1")
        _check(self.pipeline_microbatches >= 1, "parallel.pipeline_microbatches", self.pipeline_microbatches,
               ">= 1")


@dataclass
class TrainingConfig:
    max_steps: int = 1000
    """Total training steps (student and critic steps both count)."""

    seed: int = 1234
    """Global seed (model init, data order, noise)."""

    device: str = "auto"
    """``auto`` (CUDA when present), ``cuda`` or ``cpu``."""

    output_dir: str = "outputs/run"
    """Where logs, sample grids and (by default) checkpoints go."""

    def validate(self) -> None:
        _check(self.max_steps >= 0, "training.max_steps", self.max_steps, ">= 0")
        _check(self.device in ("auto", "cuda", "cpu"), "training.device", self.device, "one of auto, cuda, cpu")


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Wan DiT shared by teacher, student and critic."""

    distill: Any = field(default_factory=_default_distill)
    """The rCM engine's ``DistillConfig`` (losses, time distributions, schedule, EMA)."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW, clipping, warm-up and gradient accumulation for student and critic."""

    data: DataConfig = field(default_factory=DataConfig)
    """Where the latents and text embeddings come from."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, keeping and resuming."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Console, wandb and sample grids."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Model/data parallel sizes and the optimizer flavour."""

    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Steps, seed, device, output directory."""

    def validate(self) -> None:
        _check_finite(self, "")
        for name in ("model", "optimizer", "data", "checkpoint", "logging", "parallel", "training"):
            getattr(self, name).validate()
        guidance = self.distill.guidance
        _check(guidance is None or guidance >= 0, "distill.guidance", guidance,
               ">= 0, the CFG scale w; 1 or null: the conditional teacher without guidance")
        self.distill = _rebuild(self.distill, "distill")


def _check_finite(obj: Any, key: str) -> None:
    """Every float anywhere in the config (sections, lists, dicts such as ``model.overrides``) is finite:
    YAML reads ``.inf`` and ``.nan`` as floats, and an infinite learning rate passes every ``> 0`` check."""
    import dataclasses
    import math

    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ConfigError(f"invalid value for '{key}': {obj!r} (expected a finite number)")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _check_finite(getattr(obj, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_finite(v, f"{key}[{i}]")


def _rebuild(obj: Any, key: str) -> Any:
    """Re-run a dataclass's ``__post_init__`` checks after fields were set one by one (nested first);
    its ValueError becomes a ConfigError naming the section."""
    import dataclasses

    kwargs = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        kwargs[f.name] = _rebuild(v, f"{key}.{f.name}") if dataclasses.is_dataclass(v) else v
    try:
        return type(obj)(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid '{key}' section: {err}") from err


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the dotted key."""


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value for '{key}': {value!r} (expected {expected})")
