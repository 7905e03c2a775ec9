"""`megatron-rcm encode` as a 2-process gloo job (what torchrun starts): each rank encodes its slice of chunks,
rank 0 assembles after the barrier, and the data set equals a single-process encode."""

import json

import pytest
import torch

from megatron_rcm.cli import main
from tests.dist_helpers import spawn
from tests.pipeline_helpers import make_videos, make_weights, write_captions

pytest.importorskip("transformers")
pytest.importorskip("av")


def _encode(rank, world_size, captions, weights, out):
    args = ["encode", "--captions", str(captions), "--weights", str(weights), "--out", str(out), "--num-frames",
            "5", "--height", "32", "--width", "32", "--dtype", "fp32", "--samples-per-shard", "1"]
    return main(args)


def test_two_process_encode_equals_one_process(tmp_path):
    from megatron_rcm.data.shards import ShardSource

    weights = make_weights(tmp_path / "weights")
    captions = write_captions(tmp_path / "videos" / "captions.jsonl", make_videos(tmp_path / "videos", n=2))
    assert spawn(_encode, 2, captions, weights, tmp_path / "two") == 0
    assert main(["encode", "--captions", str(captions), "--weights", str(weights), "--out", str(tmp_path / "one"),
                 "--num-frames", "5", "--height", "32", "--width", "32", "--dtype", "fp32"]) == 0
    assert len(json.loads((tmp_path / "two" / "index.json").read_text())["shards"]) == 3  # one per chunk
    a = ShardSource(tmp_path / "two", 3, [4, 2, 4, 4], 512, 32, seed=0, shuffle=False).next_batch()
    b = ShardSource(tmp_path / "one", 3, [4, 2, 4, 4], 512, 32, seed=0, shuffle=False).next_batch()
    assert a.keys == b.keys == ["00000000", "00000001", "00000002"]
    for x, y in ((a.latent_BCFHW, b.latent_BCFHW), (a.context_BLD, b.context_BLD), (a.neg_context_BLD, b.neg_context_BLD)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".weights-build", "one", "two", "videos", "weights"]


def _sample(rank, world_size, weights, out, dump):
    """`megatron-rcm sample` on this rank (TP = world size under torchrun); records the latents."""
    import megatron_rcm.pipeline.sample as smp

    run = smp._run

    def recording_run(*args, **kwargs):
        latents, seconds = run(*args, **kwargs)
        torch.save(latents, f"{dump}.{rank}.pt")
        return latents, seconds

    smp._run = recording_run
    rc = main(["sample", "--student", str(weights), "--weights", str(weights), "--out", str(out), "--prompt",
                 "a cat walks", "--prompt", "a dog", "--steps", "2", "--num-frames", "5", "--height", "32",
                 "--width", "32", "--dtype", "fp32"])
    from megatron.core import parallel_state

    assert parallel_state.get_tensor_model_parallel_world_size() == world_size  # the model was split
    return rc


def test_sample_with_tensor_parallelism_equals_one_process(tmp_path):
    """Two ranks sample one TP=2 student (the 14B path: a model split over GPUs); same latents as one process
    (fp32; TP changes only the summation order of the row-parallel linears: 1e-5), rank 0 writes the folder."""
    from megatron_rcm.pipeline.video_io import probe

    weights = make_weights(tmp_path / "weights")
    assert spawn(_sample, 2, weights, tmp_path / "tp2", tmp_path / "tp2_latents") == 0
    assert _sample(0, 1, weights, tmp_path / "tp1", tmp_path / "tp1_latents") == 0
    a, b = torch.load(f"{tmp_path}/tp2_latents.0.pt"), torch.load(f"{tmp_path}/tp1_latents.0.pt")
    c = torch.load(f"{tmp_path}/tp2_latents.1.pt")
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x, z, rtol=0, atol=0)  # every rank holds the same, full latents
    assert probe(tmp_path / "tp2" / "student" / "000.mp4", 16).num_frames == 5
