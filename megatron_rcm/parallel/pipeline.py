"""Pipeline parallelism (PP): the transformer blocks split into consecutive stages.

Legend: s tokens on this rank (after context and sequence parallelism), B micro-batch, D hidden.

Layout (docs/parallelism.md, "Pipeline parallelism"):

* Stage ``p`` of ``N`` holds the global blocks ``[p L/N, (p + 1) L/N)`` (``L`` layers; ``L`` must divide by
  ``N x V``). With ``V`` virtual stages (the interleaved schedule) rank ``p`` holds ``V`` model chunks, chunk
  ``c`` the blocks ``[c L/V + p L/(N V), c L/V + (p + 1) L/(N V))`` (Megatron's assignment). The patch embedding lives on the first
  stage, the head on the last. The conditioning embeddings (text, time, time projection, CLIP image) are
  needed by every block: each stage holds a copy, identical at initialization, and their gradients are
  summed over the pipeline group (``allreduce_replicated_grads``), so the copies stay identical.
* A stage boundary carries the block activations ``[s, B, D]`` (under context parallelism this CP rank's
  token shard: ``boundary_seq_length``); in the JVP pass the primal and its tangent
  travel together as one tensor ``[2, s, B, D]`` (``pack_boundary``). The received tangent is detached: the
  tangent carries no gradient, the primal's gradient flows back through Megatron's schedule.

The process groups are Megatron's (``parallel_state.get_pipeline_model_parallel_group``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

__all__ = [
    "ModelChunks",
    "PipelineStage",
    "allreduce_replicated_grads",
    "boundary_seq_length",
    "boundary_shape",
    "check_interleaved_microbatches",
    "global_state_dict",
    "interleaved_config_fields",
    "key_on_stage",
    "stage_state_dict",
    "check_pipeline_layout",
    "chunk_list",
    "chunks_sharded_state_dict",
    "pack_boundary",
    "pipeline_stage",
    "pp_rank",
    "pp_world_size",
    "unpack_boundary",
    "vp_world_size",
]

# Megatron's parameter attribute for embedders copied on every stage: its finalize_model_grads sums their
# main_grad over the pipeline group when the config has ``has_cond_embedder`` (as for its DiT models)
REPLICATED_ATTR = "pipeline_parallel"


def pp_world_size() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_pipeline_model_parallel_world_size()


def pp_rank() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_pipeline_model_parallel_rank()


def vp_world_size() -> int:
    """V, the virtual pipeline size the parallel state was initialized with (1 without the interleaved schedule)."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1


def check_pipeline_layout(num_layers: int, pp: int, vp: int = 1) -> None:
    """Raise ValueError naming the numbers when ``num_layers`` do not split into PP x V stages."""
    if pp < 1 or vp < 1:
        raise ValueError(f"pipeline_parallel {pp} and virtual_pipeline {vp} must be >= 1")
    if num_layers % (pp * vp):
        raise ValueError(
            f"{num_layers} transformer layers do not split evenly over pipeline_parallel x virtual_pipeline "
            f"= {pp} x {vp} = {pp * vp} stages; choose sizes whose product divides {num_layers}"
        )
    if vp > 1 and pp == 1:
        raise ValueError(f"virtual_pipeline {vp} needs pipeline_parallel > 1 (the interleaved schedule)")


def check_interleaved_microbatches(num_microbatches: int, pp: int, vp: int) -> None:
    """Megatron's interleaved schedule runs the micro-batches in groups of ``microbatch_group_size_per_vp_stage``
    (default PP) per virtual stage and refuses a count that is not a multiple of PP: raise ValueError naming the
    numbers before any work (``forward_backward_pipelining_with_interleaving``)."""
    if vp > 1 and (num_microbatches < pp or num_microbatches % pp):
        raise ValueError(
            f"the interleaved schedule (pipeline_parallel {pp} x virtual_pipeline {vp}) needs a number of "
            f"micro-batches that is a multiple of pipeline_parallel {pp}, got {num_microbatches}"
        )


def interleaved_config_fields(pp: int, vp: int) -> dict:
    """The model-config fields Megatron's interleaved schedule reads: the virtual size, the micro-batch group
    per virtual stage (Megatron's default, PP), and unbatched p2p. Batched p2p (``batch_isend_irecv``) posts
    the send to the previous stage before the send to the next: at PP=2 both are the same peer, and the
    receiver matches them in the other order (activations land in the gradient buffer); the unbatched path
    sends the two directions over two process groups."""
    if vp == 1:
        return {}
    return dict(virtual_pipeline_model_parallel_size=vp, microbatch_group_size_per_vp_stage=pp, batch_p2p_comm=False)


@dataclass(frozen=True)
class PipelineStage:
    """Which blocks and which ends of the network one pipeline stage holds."""

    layer_offset: int
    num_local_layers: int
    pre_process: bool  # first stage: the patch embedding
    post_process: bool  # last stage: the head

    @property
    def model_kwargs(self) -> dict:
        return dict(
            layer_offset=self.layer_offset,
            num_local_layers=self.num_local_layers,
            pre_process=self.pre_process,
            post_process=self.post_process,
        )


def pipeline_stage(
    num_layers: int, pp: int | None = None, rank: int | None = None, vp: int = 1, chunk: int = 0
) -> PipelineStage:
    """The stage of pipeline rank ``rank`` (default: this rank) of ``pp`` (default: Megatron's PP size); with
    ``vp`` virtual stages, its model chunk ``chunk``. Megatron's interleaved layer assignment
    (``get_transformer_layer_offset``): chunk c of rank p holds the L / (PP V) blocks from c L / V + p L / (PP V),
    so the pipeline runs chunk 0 of ranks 0..PP-1, then chunk 1 of ranks 0..PP-1, ...; the patch embedding is on
    chunk 0 of rank 0, the head on chunk V-1 of rank PP-1."""
    pp = pp_world_size() if pp is None else pp
    rank = pp_rank() if rank is None else rank
    check_pipeline_layout(num_layers, pp, vp)
    if not 0 <= chunk < vp:
        raise ValueError(f"model chunk {chunk} is not in [0, virtual_pipeline {vp})")
    n = num_layers // (pp * vp)
    return PipelineStage(chunk * (num_layers // vp) + rank * n, n, rank == 0 and chunk == 0,
                         rank == pp - 1 and chunk == vp - 1)


def boundary_shape(s: int, B: int, D: int, with_tangent: bool) -> tuple[int, ...]:
    """Shape of the tensor sent between stages: [s, B, D], or [2, s, B, D] with the tangent."""
    return (2, s, B, D) if with_tangent else (s, B, D)


def boundary_seq_length(num_tokens: int, config) -> int:
    """S_pad, the sequence length to tell Megatron's schedules for a sample of S = ``num_tokens`` tokens: they
    divide it by CP (and TP under sequence parallelism) for the boundary's s, so it is S padded as the model
    pads it (``parallel/context.py: token_shard``: to a multiple of CP x TP(SP))."""
    from megatron_rcm.parallel.collectives import tp_world_size
    from megatron_rcm.parallel.context import token_shard

    multiple = tp_world_size() if config.sequence_parallel else 1
    return token_shard(num_tokens, multiple, config.context_parallel_size).padded_len


def pack_boundary(x_sBD: torch.Tensor, t_x_sBD: torch.Tensor | None) -> torch.Tensor:
    """(x, t_x) -> one tensor for the next stage: x [s, B, D], or stack(x, t_x) [2, s, B, D]."""
    if t_x_sBD is None:
        return x_sBD
    return torch.stack((x_sBD, t_x_sBD.to(x_sBD.dtype)))


def unpack_boundary(h: torch.Tensor, with_tangent: bool):
    """Inverse of ``pack_boundary``: (x [s, B, D], t_x [s, B, D] detached, or None). In the JVP pass the input
    may also be the stacked pair flattened to [2 s, B, D] (the interleaved schedule, whose p2p shapes cannot be
    adjusted, sends that view: ``pipeline_schedule.py``)."""
    if with_tangent:
        if h.ndim == 3 and h.shape[0] % 2 == 0:
            h = h.unflatten(0, (2, -1))
        if h.ndim != 4 or h.shape[0] != 2:
            raise ValueError(
                f"the JVP pass expects a stage input [2, s, B, D] or [2 s, B, D] (primal and tangent stacked), "
                f"got shape {tuple(h.shape)}"
            )
        return h[0], h[1].detach()
    if h.ndim != 3:
        raise ValueError(f"the primal pass expects a stage input [s, B, D], got shape {tuple(h.shape)}")
    return h, None


def mark_replicated(module: torch.nn.Module, first_stage: bool) -> None:
    """Mark ``module``'s parameters as copied on every stage (see the module docstring). Off the first stage
    they are also ``shared`` (Megatron's mark for the second copy of tied embeddings), so gradient norms count
    each copied parameter once."""
    for p in module.parameters():
        setattr(p, REPLICATED_ATTR, True)
        p.shared = not first_stage


@torch.no_grad()
def allreduce_replicated_grads(model) -> None:
    """Sum the gradients of the stage-replicated parameters over the pipeline group (each stage holds the
    partial gradient through its own blocks) and, for a list of model chunks (the interleaved schedule), over
    the chunks' copies; every copy gets the sum. Uses ``main_grad`` (Megatron DDP) when present."""
    chunks = chunk_list(model)
    if pp_world_size() == 1:
        return
    per_chunk = []
    for chunk in chunks:
        grads = []
        for p in chunk.parameters():
            if getattr(p, REPLICATED_ATTR, False):
                g = getattr(p, "main_grad", None)
                g = p.grad if g is None else g
                if g is not None:
                    grads.append(g)
        per_chunk.append(grads)
    if not per_chunk[0]:
        return
    if any(len(g) != len(per_chunk[0]) for g in per_chunk):
        raise ValueError(f"model chunks hold different numbers of replicated gradients: {[len(g) for g in per_chunk]}")
    flat = sum(torch.cat([g.reshape(-1).float() for g in grads]) for grads in per_chunk)
    dist.all_reduce(flat, group=parallel_state.get_pipeline_model_parallel_group())
    for grads in per_chunk:
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def chunks_sharded_state_dict(chunks, prefix: str = "") -> dict:
    """One sharded state dict for this rank's model chunks (the interleaved schedule), with the checkpoint keys
    of a PP=1 model: ``ModelChunks.sharded_state_dict`` (every chunk's blocks by global layer number and its
    ends; of the conditioning embeddings that each chunk copies, chunk 0 of rank 0 writes the main replica)."""
    return ModelChunks(list(chunks)).sharded_state_dict(prefix)


class ModelChunks(torch.nn.ModuleList):
    """This rank's V model chunks of one network (the interleaved schedule), held as one module so that the
    trainer builds, optimizes, averages (EMA) and checkpoints it as it does one stage model: parameter and
    state-dict names are ``{c}.{name}`` (chunk c's own names), Megatron's schedules and ``finalize_model_grads``
    take ``list(chunks)``. The chunks may be DDP-wrapped; ``module`` is then the chunks they wrap."""

    @property
    def config(self):
        return self[0].config

    @property
    def module(self) -> ModelChunks:
        """The unwrapped chunks (each DDP chunk's ``module``), built once and not registered as a submodule."""
        inner = self.__dict__.get("_unwrapped")
        if inner is None:
            inner = self.__dict__["_unwrapped"] = ModelChunks([chunk.module for chunk in self])
        return inner

    def forward(self, *args, **kwargs):
        raise TypeError("ModelChunks has no forward of its own: run its chunks through Megatron's interleaved "
                        "schedule (parallel/pipeline_schedule.py: run_schedule)")

    def zero_grad_buffer(self) -> None:
        for chunk in self:
            chunk.zero_grad_buffer()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """Every chunk's sharded state dict: dict keys ``{prefix}{c}.{name}`` (as ``named_parameters``), checkpoint
        keys those of a PP=1 model (global layer numbers), so the checkpoint loads at any PP x V. The
        conditioning embeddings that every chunk copies: chunk c's copy on pipeline rank p gets replica id
        p + c PP, only chunk 0 of rank 0 writes them, every copy is loaded."""
        out = {}
        pp = pp_world_size()
        for c, chunk in enumerate(self):
            names = getattr(chunk, "module", chunk)._conditioning_names()  # through a DDP wrapper
            copies = tuple(f"{prefix}{name}." for name in names)
            for key, sh in chunk.sharded_state_dict(prefix, sharded_offsets, metadata).items():
                if c > 0 and key.startswith(copies):
                    sh.replica_id = (pp_rank() + c * pp, *sh.replica_id[1:])
                out[f"{prefix}{c}.{key[len(prefix):]}"] = sh
        return out


def chunk_list(model) -> list:
    """The model chunks of ``model``: a ``ModelChunks`` or list as its list, one model as a list of one."""
    return list(model) if isinstance(model, (list, tuple, ModelChunks)) else [model]


def key_on_stage(key: str, stage: PipelineStage) -> bool:
    """Whether the full-model (global layer numbering) entry ``key`` lives on ``stage``."""
    if key.startswith("blocks."):
        index = int(key[len("blocks.") :].split(".", 1)[0])
        return stage.layer_offset <= index < stage.layer_offset + stage.num_local_layers
    if key.startswith("patch_embedding."):
        return stage.pre_process
    if key.startswith("head."):
        return stage.post_process
    return True


def stage_state_dict(full_sd: dict, stage: PipelineStage) -> dict:
    """The entries of a full (PP=1) state dict that a stage holds, blocks renumbered to the stage's local
    indices (``blocks.{global}.`` -> ``blocks.{global - layer_offset}.``)."""
    out = {}
    for key, value in full_sd.items():
        if not key_on_stage(key, stage):
            continue
        if key.startswith("blocks."):
            index, rest = key[len("blocks.") :].split(".", 1)
            key = f"blocks.{int(index) - stage.layer_offset}.{rest}"
        out[key] = value
    return out


def global_state_dict(stage_sd: dict, stage: PipelineStage) -> dict:
    """Inverse of ``stage_state_dict`` for one stage: local block indices -> global layer numbers."""
    out = {}
    for key, value in stage_sd.items():
        if key.startswith("blocks."):
            index, rest = key[len("blocks.") :].split(".", 1)
            key = f"blocks.{int(index) + stage.layer_offset}.{rest}"
        out[key] = value
    return out
