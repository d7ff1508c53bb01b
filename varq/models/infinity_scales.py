"""Infinity's scale schedules (by aspect ratio and pixel budget) and its per-scale 2-D rotary positions.

A schedule lists the (h, w) token grid of every scale. Infinity predicts 7 scales at 0.06M pixels (256²), 10 at
0.25M, 12 at 0.60M and 13 at 1M (1024²); the shorter schedules are prefixes of the 1M one of the same aspect ratio.

Rotary positions are "normalised by hw" (the checkpoints' setting): a token (i, j) of an (h, w) scale takes the
position (round(i·H/h), round(j·W/w)) on the grid of the aspect ratio's 1M final scale (H, W), so every scale spans
the same image area. Positions depend on the scale, which is why a KV-cached step must be told its scale index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "PIXEL_BUDGETS", "ScaleSchedule", "schedule_for", "custom_schedule", "rope_table", "apply_rope", "ASPECT_RATIOS",
]

VAE_STRIDE = 16  # pixels per token side
ROPE_GRID = 128  # positions per axis of the rotary table (2048 px / 16)
# scales per pixel budget; each schedule is a prefix of the 13-scale (1M) one
PIXEL_BUDGETS = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

# the 13 token grids (h, w) of each tall-or-square aspect ratio h/w; wide ratios are the transposes
_TALL_GRIDS = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
            (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
            (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
            (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
            (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
            (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
            (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
            (90, 30), (111, 37)),
}


def _all_grids() -> dict[float, tuple[tuple[int, int], ...]]:
    grids = {}
    for ratio, hws in _TALL_GRIDS.items():
        grids[ratio] = hws
        if ratio != 1.0:  # the wide template's key is 1/ratio truncated to three decimals (0.8, 0.75, 0.666 …)
            grids[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in hws)
    return grids


_GRIDS = _all_grids()
ASPECT_RATIOS = tuple(sorted(_GRIDS))  # the 15 h/w templates


@dataclass(frozen=True)
class ScaleSchedule:
    """The token grid of every scale, and the grid (H, W) rotary positions are normalised to."""

    hw: tuple[tuple[int, int], ...]
    rope_ref_hw: tuple[int, int]

    def __post_init__(self) -> None:
        if not self.hw or any(h < 1 or w < 1 for h, w in self.hw):
            raise ValueError(f"a scale schedule needs at least one scale of positive size, got {self.hw}")
        if max(self.rope_ref_hw) > ROPE_GRID:
            raise ValueError(f"rotary reference grid {self.rope_ref_hw} exceeds {ROPE_GRID} positions per axis")

    @property
    def num_scales(self) -> int:
        return len(self.hw)

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.hw)

    @property
    def total_len(self) -> int:
        return sum(self.lengths)

    @property
    def begin_ends(self) -> tuple[tuple[int, int], ...]:
        out, cur = [], 0
        for n in self.lengths:
            out.append((cur, cur + n))
            cur += n
        return tuple(out)

    def scale_of_token(self) -> torch.Tensor:
        """(L,) int64: the scale index of every token of the full sequence."""
        return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(self.lengths)])

    @property
    def image_hw(self) -> tuple[int, int]:
        h, w = self.hw[-1]
        return h * VAE_STRIDE, w * VAE_STRIDE


def schedule_for(h_div_w: float = 1.0, pixels: str = "1M") -> ScaleSchedule:
    """The official schedule of the aspect-ratio template nearest to ``h_div_w`` at a pixel budget (``PIXEL_BUDGETS``)."""
    if pixels not in PIXEL_BUDGETS:
        raise ValueError(f"unknown pixel budget {pixels!r}; choose one of {', '.join(PIXEL_BUDGETS)}")
    if not h_div_w > 0:
        raise ValueError(f"aspect ratio h/w must be positive, got {h_div_w}")
    ratio = min(ASPECT_RATIOS, key=lambda r: abs(r - h_div_w))
    grids = _GRIDS[ratio]
    return ScaleSchedule(grids[: PIXEL_BUDGETS[pixels]], rope_ref_hw=grids[-1])


def custom_schedule(hw: tuple[tuple[int, int], ...]) -> ScaleSchedule:
    """A schedule outside the templates (small test models): rotary positions normalised to its own last scale."""
    hw = tuple((int(h), int(w)) for h, w in hw)
    return ScaleSchedule(hw, rope_ref_hw=hw[-1])


def rope_table(schedule: ScaleSchedule, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(2, L, head_dim/2) fp32: cos and sin of every token's rotary angles over the full sequence.

    The first half of the angles rotate by the token's row position, the second half by its column position.
    """
    if head_dim % 4:
        raise ValueError(f"2-D rotary embedding needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))  # (half/2,)
    ref_h, ref_w = schedule.rope_ref_hw
    angles = []
    for h, w in schedule.hw:
        # float32 products rounded half-to-even, as the checkpoints were trained with
        rows = (torch.arange(h) * (ref_h / h)).round().int().view(h, 1).expand(h, w).reshape(-1)
        cols = (torch.arange(w) * (ref_w / w)).round().int().view(1, w).expand(h, w).reshape(-1)
        angles.append(torch.cat((torch.outer(rows.float(), inv_freq), torch.outer(cols.float(), inv_freq)), dim=-1))
    angles_Lh = torch.cat(angles, dim=0)
    return torch.stack((angles_Lh.cos(), angles_Lh.sin()), dim=0)


def apply_rope(x_BHLc: torch.Tensor, rope_2Lh: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (x₀, x₁) of every token by its angles; computed in fp32 like the reference."""
    cos_Lh, sin_Lh = rope_2Lh.to(device=x_BHLc.device).unbind(0)
    dtype = torch.promote_types(x_BHLc.dtype, torch.float32)
    pairs = x_BHLc.to(dtype).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((cos_Lh * x0 - sin_Lh * x1, sin_Lh * x0 + cos_Lh * x1), dim=-1)
    return out.flatten(-2)
