"""The embedded video data set: procedural clips of one coloured shape moving in a straight line.

No download, generated on the fly. A clip is RGB pixels ``[3, F, H, W]`` in [-1, 1] (pixels stand in for
VAE latents): a black background and one shape (square, circle, triangle) in one colour (red, green,
blue) moving in one direction (right, left, down, up) from a random start position at a random speed.
The condition ("prompt") names shape, colour and direction: 3 x 3 x 4 = 36 conditions, each with many
valid clips (start, speed), so diversity within a condition can be measured.

The text-embedding stand-in is three tokens ``[3, D]``: one fixed random vector per attribute value
(token 0 the shape, token 1 the colour, token 2 the direction), like "a red circle moving left"; a
separate fixed random ``[1, 3, D]`` plays the negative prompt of CFG. The tables come from a fixed
generator (seed 0), independent of the training seed, so teacher, students and evaluator share them.

Rendering (``render_clips``): the shape's centre moves ``c_f = c_0 + f * speed * dir`` (pixels, frame f);
each pixel's value is the shape's area coverage, estimated on a 4 x 4 sub-pixel grid (anti-aliased, so
sub-pixel speeds move the shape smoothly):  x = -1 + coverage * (colour + 1).
"""

from __future__ import annotations

import torch

from megatron_rcm.data.batch import Batch
from megatron_rcm.data.order import EpochOrder

SHAPES = ("square", "circle", "triangle")
COLOURS = ("red", "green", "blue")
DIRECTIONS = ("right", "left", "down", "up")
NUM_CONDITIONS = len(SHAPES) * len(COLOURS) * len(DIRECTIONS)
TEXT_TOKENS = 3
"""Tokens of one prompt embedding: shape, colour, direction."""
EMBEDDING_SEED = 0
COLOUR_RGB = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
DIRECTION_XY = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # (dx, dy), y points down
SPEED_RANGE = (0.8, 1.4)
"""Speed in units of H / 16 pixels per frame (0.8-1.4 px per frame at 16 x 16)."""
SUPERSAMPLE = 4


def condition_index(shape_B, colour_B, direction_B):
    """Condition id in [0, 36): (shape * 3 + colour) * 4 + direction."""
    return (shape_B * len(COLOURS) + colour_B) * len(DIRECTIONS) + direction_B


def condition_attributes(cond_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``condition_index``: (shape, colour, direction) ids."""
    return cond_B // (len(COLOURS) * len(DIRECTIONS)), (cond_B // len(DIRECTIONS)) % len(COLOURS), \
        cond_B % len(DIRECTIONS)


def condition_name(cond: int) -> str:
    s, c, d = (int(v) for v in condition_attributes(torch.tensor(cond)))
    return f"{COLOURS[c]} {SHAPES[s]} {DIRECTIONS[d]}"


def prompt_embeddings(text_dim: int, text_len: int = TEXT_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-condition prompt embeddings [36, text_len, D], negative prompt [1, text_len, D]).

    Unit-variance entries; tokens beyond the three attribute tokens are zero (as Wan pads umT5 output)."""
    if text_len < TEXT_TOKENS:
        raise ValueError(f"shapes prompts have {TEXT_TOKENS} tokens (shape, colour, direction); "
                         f"data.text_len={text_len} is too short")
    g = torch.Generator().manual_seed(EMBEDDING_SEED)
    shape_SD = torch.randn(len(SHAPES), text_dim, generator=g)
    colour_CD = torch.randn(len(COLOURS), text_dim, generator=g)
    dir_ND = torch.randn(len(DIRECTIONS), text_dim, generator=g)
    neg_1LD = torch.zeros(1, text_len, text_dim)
    neg_1LD[0, :TEXT_TOKENS] = torch.randn(TEXT_TOKENS, text_dim, generator=g)
    cond = torch.arange(NUM_CONDITIONS)
    s, c, d = condition_attributes(cond)
    emb_KLD = torch.zeros(NUM_CONDITIONS, text_len, text_dim)
    emb_KLD[:, 0], emb_KLD[:, 1], emb_KLD[:, 2] = shape_SD[s], colour_CD[c], dir_ND[d]
    return emb_KLD, neg_1LD


def _coverage(shape_B, dx, dy, r):
    """Inside-mask of each shape at offsets (dx, dy) from its centre (broadcast [B, ...]), radius r."""
    square = (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)
    circle = dx.square() + dy.square() <= r * r
    triangle = (dy <= r) & (dx.abs() <= (dy + r) / 2)  # apex up (y points down)
    s = shape_B.view(-1, *([1] * (dx.dim() - 1)))
    return torch.where(s == 0, square, torch.where(s == 1, circle, triangle)).float()


def render_clips(shape_B, colour_B, direction_B, speed_B, start_B2, frames: int, height: int,
                 width: int) -> torch.Tensor:
    """Clips [B, 3, F, H, W] in [-1, 1]. ``start_B2``: centre (x, y) at frame 0 in pixels; ``speed_B`` in
    pixels per frame."""
    B, ss = shape_B.shape[0], SUPERSAMPLE
    r = height * 2.5 / 16  # 2.5 px radius at 16 x 16
    f = torch.arange(frames, dtype=torch.float32)
    centre_BF2 = start_B2[:, None] + f[None, :, None] * (speed_B[:, None, None] * DIRECTION_XY[direction_B][:, None])
    # sub-pixel sample positions (pixel i spans [i, i + 1))
    ys = (torch.arange(height * ss, dtype=torch.float32) + 0.5) / ss
    xs = (torch.arange(width * ss, dtype=torch.float32) + 0.5) / ss
    dx = xs.view(1, 1, 1, -1) - centre_BF2[..., 0].view(B, frames, 1, 1)
    dy = ys.view(1, 1, -1, 1) - centre_BF2[..., 1].view(B, frames, 1, 1)
    inside_BFhw = _coverage(shape_B, dx, dy, r)
    cov_BFHW = torch.nn.functional.avg_pool2d(inside_BFhw, ss)
    colour_B3 = COLOUR_RGB[colour_B]
    return -1.0 + cov_BFHW[:, None] * (colour_B3 + 1.0).view(B, 3, 1, 1, 1)


def random_motion(direction_B, frames: int, height: int, width: int, generator: torch.Generator):
    """(speed [B], start centre [B, 2]) such that the whole shape stays inside the frame on every frame."""
    B = direction_B.shape[0]
    lo_s, hi_s = SPEED_RANGE
    speed = (lo_s + (hi_s - lo_s) * torch.rand(B, generator=generator)) * height / 16
    r = height * 2.5 / 16
    travel = speed * (frames - 1)
    size = torch.tensor([float(width), float(height)])
    u = torch.rand(B, 2, generator=generator)
    dir_B2 = DIRECTION_XY[direction_B]
    # along the motion axis the start leaves room for the travel; across it any position fits
    room_B2 = (size - 2 * r)[None] - travel[:, None] * dir_B2.abs()
    if bool((room_B2 < 0).any()):
        raise ValueError(f"shapes clips of {frames} frames at {height}x{width} pixels: the fastest shape "
                         f"travels {float(travel.max()):.1f} px, more than the frame allows")
    pos = r + u * room_B2
    start = torch.where(dir_B2 < 0, pos + travel[:, None], pos)  # moving left/up starts on the far side
    return speed, start


def sample_clips(cond_B: torch.Tensor, frames: int, height: int, width: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Random clips [B, 3, F, H, W] of the given conditions (random start and speed)."""
    s, c, d = condition_attributes(cond_B)
    speed, start = random_motion(d, frames, height, width, generator)
    return render_clips(s, c, d, speed, start, frames, height, width)


def check_latent_shape(latent_shape_CFHW) -> tuple[int, int, int]:
    """(F, H, W) of ``data.latent_shape`` for shapes clips; clear error when it cannot hold them."""
    C, F, H, W = (int(v) for v in latent_shape_CFHW)
    if C != 3 or F < 2 or H < 8 or W < 8 or H != W:
        raise ValueError(f"data.latent_shape={list(latent_shape_CFHW)}: shapes clips are RGB [3, F >= 2, H, W] "
                         f"with square frames H = W >= 8")
    return F, H, W


class ShapesSource:
    """Batches of procedural clips with their prompt embeddings. Sample i is drawn from its own generator
    seeded with (seed, i) (conditions uniform over the 36), so resuming at an ``EpochOrder`` position is exact."""

    def __init__(self, micro_batch_size: int, latent_shape_CFHW, text_len: int, text_dim: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, num_samples: int = 1 << 24):
        self.frames, self.height, self.width = check_latent_shape(latent_shape_CFHW)
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.emb_KLD, self.negative_1LD = prompt_embeddings(text_dim, text_len)
        self.order = EpochOrder(num_samples, seed, dp_rank, dp_size, shuffle=False, name="shapes")

    def _draw(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample i's (condition [1], speed [1], start [1, 2]) from its own generator."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        cond = torch.randint(NUM_CONDITIONS, (1,), generator=g)
        speed, start = random_motion(condition_attributes(cond)[2], self.frames, self.height, self.width, g)
        return cond, speed, start

    def next_batch(self) -> Batch:
        idx = [self.order.next_index() for _ in range(self.micro_batch_size)]
        cond_B, speed_B, start_B2 = (torch.cat(v) for v in zip(*(self._draw(i) for i in idx)))
        # one render for the whole batch (rendering clip by clip was ~70 % of a 2-layer teacher step's data
        # time on CPU); the same values as rendering each clip on its own (tested)
        clips = render_clips(*condition_attributes(cond_B), speed_B, start_B2, self.frames, self.height, self.width)
        return Batch(clips, self.emb_KLD[cond_B].clone(), self.negative_1LD, [f"shapes{i}" for i in idx], cond_B)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)

    def close(self) -> None:
        pass
