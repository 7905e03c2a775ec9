"""encode -> shards -> 2 training steps -> sample, on tiny random Wan components (tests/pipeline_helpers.py);
text embeddings and VAE latents against diffusers' own Wan pipelines; input errors naming the file."""

import json
import types

import numpy as np
import pytest
import torch

from megatron_rcm.cli import main
from tests.pipeline_helpers import TRAIN, make_videos, make_weights, write_captions

pytest.importorskip("transformers")
pytest.importorskip("av")

FRAMES, SIZE = 5, 32  # latent [4, 2, 4, 4]: 2 x 2 x 2 tokens


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    weights = make_weights(root / "weights")
    videos = make_videos(root / "videos")
    captions = write_captions(root / "videos" / "captions.jsonl", videos)
    return types.SimpleNamespace(root=root, weights=weights, videos=videos, captions=captions)


def _encode_args(world, out, captions=None, *extra):
    return ["encode", "--captions", str(captions or world.captions), "--weights", str(world.weights), "--out",
            str(out), "--num-frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE), "--dtype", "fp32",
            "--samples-per-shard", "2", *extra]


@pytest.fixture(scope="module")
def trained(world):
    """encode the videos, then 2 rCM training steps on the shards, from the weights folder's teacher."""
    from megatron_rcm.config import load_config
    from megatron_rcm.training import Trainer

    shards = world.root / "shards"
    assert main(_encode_args(world, shards)) == 0
    teacher = world.weights / "transformer" / "diffusion_pytorch_model.safetensors"
    run = world.root / "run"
    cfg = load_config(None, [*TRAIN, f"data.path={shards}", "data.latent_shape=[4,2,4,4]", "training.max_steps=2",
                             f"model.teacher_checkpoint={teacher}", f"training.output_dir={run}",
                             f"checkpoint.dir={run / 'ckpt'}"])
    trainer = Trainer(cfg)
    history = trainer.train()
    trainer.close()
    return types.SimpleNamespace(shards=shards, history=history, ckpt=run / "ckpt")


def test_encode_writes_shards_the_trainer_trains_on(world, trained):
    from megatron_rcm.data.shards import ShardSource

    shards = trained.shards
    assert sorted(p.name for p in shards.iterdir()) == ["index.json", "negative.t5.pth", "shard-000000.tar",
                                                        "shard-000001.tar"]
    assert not any(p.name.startswith(".shards") for p in shards.parent.iterdir())  # parts folder removed
    src = ShardSource(shards, 4, [4, 2, 4, 4], 512, 32, seed=0, shuffle=False)
    meta = json.loads(src._read(*_member(src, 3, "json")))
    assert meta["source"] == str(world.videos[3]) and meta["fps"] == 16.0 and meta["num_frames"] == FRAMES
    assert meta["caption"] == json.loads(world.captions.read_text().splitlines()[3])["caption"]
    src.close()
    assert len(trained.history) == 2 and all(np.isfinite(list(m.values())).all() for m in trained.history)


def test_sample_student_and_teacher(world, trained, tmp_path):
    from megatron_rcm.pipeline.video_io import probe

    out = tmp_path / "videos"
    rc = main(["sample", "--student", str(trained.ckpt), "--weights", str(world.weights), "--out",
               str(out), "--prompt", "a cat walks on the grass", "--prompt", "a dog runs", "--steps", "2",
               "--teacher", "--teacher-steps", "3", "--num-frames", str(FRAMES), "--height", str(SIZE), "--width",
               str(SIZE), "--dtype", "fp32"])
    assert rc == 0
    for name in ("student", "teacher"):
        for i in range(2):
            info = probe(out / name / f"{i:03d}.mp4", 16)
            assert (info.num_frames, info.height, info.width) == (FRAMES, SIZE, SIZE)
    assert (out / "contact_sheet.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert "ema.student." in summary["student"] and summary["speedup"] > 0
    assert summary["teacher_seconds"] > 0 and summary["student_seconds"] > 0


def test_export_pipeline_folder_loads_in_diffusers(world, trained, tmp_path):
    """tools/convert.py export --pipeline-from: WanPipeline.from_pretrained loads the folder, its transformer
    is the student (EMA), and it generates a video."""
    from diffusers import WanPipeline

    from megatron_rcm.pipeline.dit import load_dit
    from tools.convert import main as convert

    out = tmp_path / "student-pipeline"
    assert convert(["export", str(trained.ckpt), str(out), "--format", "diffusers", "--ema", "--pipeline-from",
                    str(world.weights), "--no-progress"]) == 0
    pipe = WanPipeline.from_pretrained(out)
    ema, _ = load_dit(trained.ckpt, ema=True)
    teacher, _ = load_dit(world.weights)
    ours, _ = load_dit(out)  # the pipeline root: its transformer/
    for (name, a), b in zip(ema.state_dict().items(), ours.state_dict().values()):
        if torch.is_tensor(a):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(a, t) for a, t in zip(ema.state_dict().values(), teacher.state_dict().values())
               if torch.is_tensor(a))  # the student moved away from the teacher in 2 steps
    assert pipe.transformer.config.num_layers == 2
    video = pipe("a cat", negative_prompt="bad", height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=2,
                 output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, FRAMES, SIZE, SIZE, 3) and np.isfinite(video).all()


def test_export_pipeline_refuses_unfit_weights(world, trained, tmp_path, capsys):
    from tools.convert import main as convert

    for bad, what in ((tmp_path / "nothing", "no model_index.json"), (world.weights / "vae", "no model_index.json")):
        bad.mkdir(exist_ok=True)
        assert convert(["export", str(trained.ckpt), str(tmp_path / "o"), "--format", "diffusers",
                        "--pipeline-from", str(bad), "--no-progress"]) == 2
        assert what in capsys.readouterr().err
    assert convert(["export", str(trained.ckpt), str(tmp_path / "o"), "--format", "original",
                    "--pipeline-from", str(world.weights), "--no-progress"]) == 2
    assert "needs --format diffusers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _member(src, i, ext):
    path, entry = src.samples[i]
    offset, size, crc = entry["members"][ext]
    return path, entry["key"], ext, offset, size, crc


def test_text_embeddings_match_wan_pipeline(world):
    """Unpadded umT5 embeddings, zero-padded by the trainer's collation, equal diffusers' WanPipeline
    encode_prompt (512 tokens, zeros beyond each prompt's length)."""
    from diffusers import WanPipeline

    from megatron_rcm.data.batch import pad_text
    from megatron_rcm.pipeline.components import TextEncoder

    prompts = ["a cat", "the quick brown fox jumps over the lazy dog  again", "red\n blue &amp; green"]
    ours = TextEncoder(world.weights, "cpu").encode(prompts)
    assert len({e.shape[0] for e in ours}) == 3 and all(e.shape[0] < 512 for e in ours)
    pipe = WanPipeline.from_pretrained(world.weights)
    ref, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512, device="cpu")
    assert ref.shape == (3, 512, 32)
    ours_padded = torch.stack([pad_text(e, 512, "test") for e in ours])
    # fp32, same weights; the two loads may pick different attention kernels (sdpa / eager): 1e-5
    torch.testing.assert_close(ours_padded, ref, rtol=1e-5, atol=1e-5)
    for e, r in zip(ours, ref):
        assert r[e.shape[0]:].abs().max() == 0 and r[e.shape[0] - 1].abs().max() > 0


def test_vae_latents_match_diffusers_normalization(world):
    """Our normalized latents equal those of diffusers' WanVideoToVideoPipeline.prepare_latents (posterior
    mean, (mu - mean) / std) with its noising switched off; decode inverts the normalization as WanPipeline."""
    from diffusers import WanVideoToVideoPipeline

    from megatron_rcm.pipeline.components import VideoVAE

    video = torch.rand(1, 3, FRAMES, SIZE, SIZE) * 2 - 1
    vae = VideoVAE(world.weights, "cpu")
    z = vae.encode(video)
    pipe = WanVideoToVideoPipeline.from_pretrained(world.weights)
    pipe.scheduler.add_noise = lambda x, noise, t: x  # the clean latents
    ref = pipe.prepare_latents(video, 1, 4, SIZE, SIZE, torch.float32, "cpu", torch.Generator().manual_seed(0),
                               timestep=torch.tensor([0]))
    torch.testing.assert_close(z, ref, rtol=1e-6, atol=1e-6)
    cfg = pipe.vae.config
    mu = z / (1.0 / torch.tensor(cfg.latents_std).view(1, 4, 1, 1, 1)) + torch.tensor(cfg.latents_mean).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z), pipe.vae.decode(mu).sample.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_encode_errors_name_the_file(world, tmp_path, capsys):
    cases = []
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"video": "nowhere.mp4", "caption": "a cat"}) + "\n")
    cases.append((missing, "caption without video", "nowhere.mp4"))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 10)
    bad = write_captions(tmp_path / "bad.jsonl", [garbage])
    cases.append((bad, "cannot be read", "garbage.mp4"))
    short = write_captions(tmp_path / "short.jsonl", [world.videos[0]])
    for captions, what, name in cases:
        assert main(_encode_args(world, tmp_path / "out", captions)) == 2
        err = capsys.readouterr().err
        assert what in err and name in err and "line 1" in err, err
    args = _encode_args(world, tmp_path / "out", short)
    args[args.index("--num-frames") + 1] = "33"  # the clips have 12 frames
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "too few" in err and "clip0.mp4" in err and "12 frames" in err, err
    for part in ("vae", "text_encoder"):
        partial = tmp_path / f"no_{part}"
        partial.mkdir()
        for d in ("vae", "text_encoder", "tokenizer"):
            if d != part:
                (partial / d).symlink_to(world.weights / d)
        args = _encode_args(world, tmp_path / "out")
        args[args.index("--weights") + 1] = str(partial)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{partial} has no {part}/" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.parts").exists()


def test_synthesize_writes_teacher_samples(world, tmp_path):
    """Each sample is the teacher's guided UniPC solution from noise seed + i: checked against the same sampler
    driving diffusers' own WanTransformer3DModel with WanPipeline.encode_prompt's embeddings."""
    from diffusers import WanPipeline

    from megatron_rcm.data.shards import ShardSource
    from megatron_rcm.rcm import Conditioning, TrigFlowDenoiser
    from megatron_rcm.rcm.samplers import unipc_sample

    prompts = ["a cat walks on the grass", "waves roll onto a sandy beach", "a dog runs in the park"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "synthetic"
    assert main(["synthesize", "--prompts", str(tmp_path / "prompts.txt"), "--weights", str(world.weights), "--out",
                 str(out), "--steps", "3", "--seed", "10", "--num-frames", str(FRAMES), "--height", str(SIZE),
                 "--width", str(SIZE), "--dtype", "fp32", "--samples-per-shard", "2",
                 "--negative-prompt", "bad quality"]) == 0
    src = ShardSource(out, 3, [4, 2, 4, 4], 512, 32, seed=0, shuffle=False)
    batch = src.next_batch()
    assert batch.keys == ["00000000", "00000001", "00000002"]
    assert json.loads(src._read(*_member(src, 1, "json")))["caption"] == prompts[1]
    src.close()

    pipe = WanPipeline.from_pretrained(world.weights)
    ctx, neg = pipe.encode_prompt(prompts, "bad quality", max_sequence_length=512, device="cpu")
    torch.testing.assert_close(batch.context_BLD, ctx, rtol=1e-5, atol=1e-5)

    def net(x, timestep, context, clip_fea=None):
        return pipe.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=context).sample

    net.parameters = pipe.transformer.parameters
    for i in range(3):
        noise = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(10 + i))
        with torch.no_grad():
            ref = unipc_sample(TrigFlowDenoiser(net, 1000.0), noise, Conditioning(ctx[i:i + 1], neg_context=neg[:1]),
                               5.0, 3, 5.0)
        torch.testing.assert_close(batch.latent_BCFHW[i:i + 1], ref, rtol=1e-4, atol=1e-4)


def test_encode_by_two_ranks_equals_one_process(world, trained, tmp_path):
    """The ranks of a 2-process job, run one after the other: rank 1 writes its chunk and presents nothing;
    rank 0 writes its own and assembles the same data set as the single-process run."""
    from megatron_rcm.data.shards import ShardSource
    from megatron_rcm.pipeline.encode import EncodeOptions, run_encode

    out = tmp_path / "shards"
    opts = EncodeOptions(str(world.captions), str(world.weights), str(out), num_frames=FRAMES, height=SIZE,
                         width=SIZE, samples_per_shard=2, dtype="fp32")
    assert run_encode(opts, rank=1, world_size=2, device="cpu") is None
    parts = tmp_path / ".shards.parts"
    assert not out.exists() and sorted(p.name for p in parts.iterdir()) == ["chunk-000001", "plan.json"]
    assert run_encode(opts, rank=0, world_size=2, device="cpu") == out
    a = ShardSource(out, 4, [4, 2, 4, 4], 512, 32, seed=0, shuffle=False).next_batch()
    b = ShardSource(trained.shards, 4, [4, 2, 4, 4], 512, 32, seed=0, shuffle=False).next_batch()
    assert a.keys == b.keys
    for x, y in ((a.latent_BCFHW, b.latent_BCFHW), (a.context_BLD, b.context_BLD), (a.neg_context_BLD, b.neg_context_BLD)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_i2v_encode_matches_diffusers_and_trains(world, tmp_path, capsys):
    """encode --i2v: the condition channels equal WanImageToVideoPipeline.prepare_latents' and the CLIP features
    its encode_image's, for the clip's first frame; the trainer distills an I2V teacher on these shards."""
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    from megatron_rcm.config import load_config
    from megatron_rcm.data.shards import ShardSource
    from megatron_rcm.pipeline.video_io import probe, read_clip, to_model_input
    from megatron_rcm.training import Trainer
    from tests.pipeline_helpers import make_i2v_weights

    weights = make_i2v_weights(tmp_path / "i2v_weights")
    shards = tmp_path / "i2v_shards"
    args = _encode_args(world, shards, None, "--i2v")
    args[args.index("--weights") + 1] = str(weights)
    assert main(args) == 0
    src = ShardSource(shards, 4, [4, 2, 4, 4], 512, 32, seed=0, shuffle=False)
    batch = src.next_batch()
    src.close()
    assert batch.y_BCFHW.shape == (4, 8, 2, 4, 4) and batch.clip_fea_BND.shape == (4, 17, 24)

    pipe = WanImageToVideoPipeline.from_pretrained(weights)
    for i in (0, 3):  # an mp4 and the frame folder
        frames = read_clip(probe(world.videos[i], 16), FRAMES, 16, SIZE, SIZE)
        first = to_model_input(frames)[:, 0][None]
        _, y = pipe.prepare_latents(first, 1, 4, SIZE, SIZE, FRAMES, torch.float32, "cpu")
        torch.testing.assert_close(batch.y_BCFHW[i:i + 1], y, rtol=1e-6, atol=1e-6)
        clip = pipe.encode_image(Image.fromarray(frames[0]), "cpu")
        torch.testing.assert_close(batch.clip_fea_BND[i:i + 1], clip, rtol=1e-5, atol=1e-5)

    teacher = weights / "transformer" / "diffusion_pytorch_model.safetensors"
    cfg = load_config(None, [*TRAIN, "model.preset=wan-tiny-i2v", "model.overrides={in_channels: 12}",
                             f"data.path={shards}", "data.latent_shape=[4,2,4,4]", "training.max_steps=2",
                             f"model.teacher_checkpoint={teacher}", f"training.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    history = trainer.train()
    trainer.close()
    assert len(history) == 2 and all(np.isfinite(list(m.values())).all() for m in history)

    # sample --image: the I2V pipeline's transformer as student and teacher, both starting from one picture
    picture = tmp_path / "first.png"
    Image.fromarray(read_clip(probe(world.videos[1], 16), FRAMES, 16, SIZE, SIZE)[0]).save(picture)
    out = tmp_path / "i2v_videos"
    sample = ["sample", "--student", str(weights), "--weights", str(weights), "--out", str(out), "--prompt",
              "a boat", "--steps", "1", "--num-frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE),
              "--dtype", "fp32"]
    assert main([*sample, "--image", str(picture), "--teacher", "--teacher-steps", "2"]) == 0
    for name in ("student", "teacher"):
        info = probe(out / name / "000.mp4", 16)
        assert (info.num_frames, info.height, info.width) == (FRAMES, SIZE, SIZE)
    assert main(sample[:6] + [str(tmp_path / "o2")] + sample[7:]) == 2  # an I2V model without --image
    assert "is an I2V model: give the picture to start from with --image" in capsys.readouterr().err


def test_i2v_model_refuses_shards_without_condition(trained):
    from megatron_rcm.config import load_config
    from megatron_rcm.data.format import ShardError
    from megatron_rcm.training.models import build_wan_config

    cfg = load_config(None, [*TRAIN, "model.preset=wan-tiny-i2v", "model.overrides={in_channels: 12}",
                             f"data.path={trained.shards}", "data.latent_shape=[4,2,4,4]"])
    with pytest.raises(ShardError, match=r"image-to-video, but 4 of 4 samples .* no first-frame condition"):
        build_wan_config(cfg.model, cfg.data)
    cfg = load_config(None, [*TRAIN, "model.preset=wan-tiny-i2v", "data.source=mock", "data.latent_shape=[4,2,4,4]"])
    with pytest.raises(NotImplementedError, match="data.source='mock' has none"):
        build_wan_config(cfg.model, cfg.data)


def test_caption_file_errors(world, tmp_path):
    from megatron_rcm.pipeline.encode import CaptionError, read_captions

    csv_file = tmp_path / "c.csv"
    csv_file.write_text(f"video,caption\n{world.videos[0]},a cat\n{world.videos[1]},\n")
    with pytest.raises(CaptionError, match=r"c.csv line 3: no caption \(expected a 'caption' field"):
        read_captions(csv_file)
    bad = tmp_path / "c.jsonl"
    bad.write_text(json.dumps({"video": str(world.videos[0]), "caption": "ok"}) + "\n{not json\n")
    with pytest.raises(CaptionError, match="c.jsonl line 2: not valid JSON"):
        read_captions(bad)
    csv_file.write_text(f"video,caption\n{world.videos[0]},a cat\n")
    (records,) = read_captions(csv_file)
    assert records.video == world.videos[0] and records.caption == "a cat"
