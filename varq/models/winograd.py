"""``eval.decoder=winograd``: the decoders' 3×3 convolutions as Winograd F(4×4, 3×3) on the CPU (opt-in, not bit-exact).

On one CPU core, 85 % of the fast decoder is direct convolution at about 160 GFLOP/s, near the core's fp32 peak, so
fewer multiplications is the only way left to a faster decoder. Winograd's minimal filtering computes a 4×4 output
tile of a 3×3 correlation from a 6×6 input tile with 36 multiplications per (input, output) channel pair instead of
144: with V = Bᵀ d B (input tile), U = G g Gᵀ (kernel) and Y = Aᵀ (U ⊙ V) A, the channel sum of U ⊙ V is, for each
of the 36 tile positions, one GEMM over the tiles (P × C_in) @ (C_in × C_out).

- **Matrices.** Exact Toom–Cook construction (`toom_cook`) on the points (0, 1, -1, 2, -1/2, ∞). The usual points
  (0, ±1, ±2, ∞) give 3× the fp32 error of these on a 3×3 conv with 64 channels (3.1e-5 against 9.6e-6, outputs of
  unit scale); the direct conv's error there is 1.3e-6.
- **Bands.** The transforms are two small GEMMs (`kron(Bᵀ, Bᵀ)` on the gathered tiles and `kron(Aᵀ, Aᵀ)` on the
  products), so all arithmetic is BLAS. A whole-tensor pass would write 2.25× the input twice and is bound by memory
  bandwidth (measured: 0.9 s against 0.67 s for the direct conv at 256², 160 channels, batch 4); the work therefore
  runs in bands of tile rows of about one MiB of input, which stay in the core's cache (0.48 s).
- **Scope.** CPU, fp32 or fp64, outside autocast, 3×3 stride-1 pad-1 convs with at least `MIN_CHANNELS` channels in
  and out. Everything else, including CUDA (whose cuDNN picks its own Winograd/FFT algorithms), takes the
  ``nn.Conv2d`` path, so on a GPU ``winograd`` computes what ``fast`` does.

The rounding differs from the direct conv's (d16 images differ from the reference decoder's by about 5e-5 in
[0, 1], the fast decoder's by about 4e-5), so the mode enters the run identity. `tests/models/test_winograd.py`
holds it equal to ``F.conv2d`` to 1e-10 in float64, where rounding cannot hide a wrong transform entry.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MIN_CHANNELS", "POINTS", "TILE", "WinogradConv2d", "WinogradPath", "toom_cook", "winograd_conv2d"]

TILE = 4  # output tile side m: F(4×4, 3×3), 6×6 input tiles
POINTS = (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-1, 2))  # and ∞
MIN_CHANNELS = 32  # below this the 36 GEMMs are too thin to beat the direct conv (conv_out has 3 outputs)
BAND_BYTES = 5 << 18  # ~1.25 MiB of input rows per band: measured best on a 2 MiB-L2 core (1.3 MiB at 256² and 64²)


def _poly_times_linear(coeffs: list[Fraction], root: Fraction) -> list[Fraction]:
    """coefficients (low → high) of p(x)·(x - root)."""
    out = [Fraction(0)] * (len(coeffs) + 1)
    for i, c in enumerate(coeffs):
        out[i] -= c * root
        out[i + 1] += c
    return out


def toom_cook(m: int, r: int, points: tuple[Fraction, ...] = POINTS) -> tuple[list[list[Fraction]], ...]:
    """Exact (Aᵀ, G, Bᵀ) of F(m, r) on ``points`` plus ∞, with y = Aᵀ[(G g) ⊙ (Bᵀ d)] the correlation
    y_i = Σ_k d_{i+k} g_k of an (m + r - 1)-long input d with an r-tap filter g.

    For the finite points p_j: Aᵀ[i, j] = p_jⁱ, G[j, k] = p_jᵏ / Π_{l≠j}(p_j - p_l), and row j of Bᵀ holds the
    coefficients of Π_{l≠j}(x - p_l); the point at infinity adds the last column of Aᵀ (picks the top output), the
    last row of G (the last tap) and the last row of Bᵀ (the coefficients of Π_l(x - p_l))."""
    n = m + r - 1
    if len(points) != n - 1 or len(set(points)) != n - 1:
        raise ValueError(f"F({m}, {r}) needs {n - 1} distinct finite points, got {points}")
    zero = Fraction(0)
    a_t = [[zero] * n for _ in range(m)]
    g = [[zero] * r for _ in range(n)]
    b_t = [[zero] * n for _ in range(n)]
    for j, p_j in enumerate(points):
        others = [p for l, p in enumerate(points) if l != j]
        norm = Fraction(1)
        cofactor = [Fraction(1)]
        for p in others:
            norm *= p_j - p
            cofactor = _poly_times_linear(cofactor, p)
        for i in range(m):
            a_t[i][j] = p_j**i
        for k in range(r):
            g[j][k] = p_j**k / norm
        b_t[j][: len(cofactor)] = cofactor
    full = [Fraction(1)]
    for p in points:
        full = _poly_times_linear(full, p)
    a_t[m - 1][n - 1] = Fraction(1)
    g[n - 1][r - 1] = Fraction(1)
    b_t[n - 1] = full
    return a_t, g, b_t


def _tensor(rows: list[list[Fraction]]) -> torch.Tensor:
    return torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)


class _Transforms:
    """The per-weight operands: U (n², C_in, C_out) and the 2-D tile transforms kron(Bᵀ, Bᵀ), kron(Aᵀ, Aᵀ)."""

    def __init__(self, weight_OIkk: torch.Tensor, dtype: torch.dtype, m: int = TILE) -> None:
        r = weight_OIkk.shape[-1]
        a_t, g, b_t = (_tensor(x) for x in toom_cook(m, r))
        n = m + r - 1
        O, C = weight_OIkk.shape[:2]
        # U[a, b, c, o] = Σ_kl G[a, k] w[o, c, k, l] G[b, l], in float64 so only the final cast rounds
        u_abCO = torch.einsum("ak,ockl,bl->abco", g, weight_OIkk.detach().to(torch.float64), g)
        self.u_NCO = u_abCO.reshape(n * n, C, O).to(dtype).contiguous()
        self.in_NN = torch.kron(b_t, b_t).to(dtype)  # tile position (k, l) → transformed (a, b), row-major
        self.out_MN = torch.kron(a_t, a_t).to(dtype)  # transformed (a, b) → output position (i, j), row-major
        self.m, self.n = m, n


def winograd_conv2d(x_BChw: torch.Tensor, transforms: _Transforms, bias_O: torch.Tensor | None,
                    padding: int) -> torch.Tensor:
    """``F.conv2d(x, w, bias, padding=padding)`` (stride 1) from `_Transforms` of w; output channels_last."""
    m, n = transforms.m, transforms.n
    r = n - m + 1
    B, C, H, W = x_BChw.shape
    O = transforms.u_NCO.shape[-1]
    h_out, w_out = H + 2 * padding - r + 1, W + 2 * padding - r + 1
    th, tw = -(-h_out // m), -(-w_out // m)  # tiles per column and row, the last ones cropped
    x_BHWC = x_BChw.permute(0, 2, 3, 1)  # a view, NHWC in memory when x is channels_last
    band_w = tw * m + r - 1
    out_BtmtmO = torch.empty((B, th, m, tw, m, O), dtype=x_BChw.dtype, device=x_BChw.device)
    row_bytes = m * band_w * C * x_BChw.element_size()
    rows_per_band = max(1, BAND_BYTES // row_bytes)
    # small maps: whole images per band; large ones: a few tile rows of one image
    images_per_band = max(1, rows_per_band // th) if rows_per_band >= th else 1
    rows_per_band = min(rows_per_band, th)
    # The zero padding is built band by band in one reused buffer, not as a padded copy of the whole input (a full
    # memory pass: 74 ms of the 0.48 s at 256², 160 channels, batch 4). Columns outside the input stay zero from here.
    buf_bRWC = x_BChw.new_zeros((min(images_per_band, B), rows_per_band * m + r - 1, band_w, C))
    for b0 in range(0, B, images_per_band):
        b1 = min(B, b0 + images_per_band)
        for t0 in range(0, th, rows_per_band):
            t1 = min(th, t0 + rows_per_band)
            band = buf_bRWC[:b1 - b0, :m * (t1 - t0) + r - 1]
            # band row i is input row m·t0 - padding + i; rows outside the input are the conv's zero padding
            lo = m * t0 - padding
            src_lo, src_hi = max(lo, 0), min(lo + band.shape[1], H)
            if src_lo > lo:
                band[:, :src_lo - lo].zero_()
            if src_hi - lo < band.shape[1]:
                band[:, max(src_hi, src_lo) - lo:].zero_()
            if src_hi > src_lo:
                band[:, src_lo - lo:src_hi - lo, padding:padding + W] = x_BHWC[b0:b1, src_lo:src_hi]
            tiles_bttCnn = band.unfold(1, n, m).unfold(2, n, m)  # a view: (b, t, tw, C, n, n)
            tiles_NX = tiles_bttCnn.permute(4, 5, 0, 1, 2, 3).reshape(n * n, -1)  # the one gather copy
            v_NPC = (transforms.in_NN @ tiles_NX).view(n * n, -1, C)
            prod_NX = torch.bmm(v_NPC, transforms.u_NCO).view(n * n, -1)
            y_mmbttO = (transforms.out_MN @ prod_NX).view(m, m, b1 - b0, t1 - t0, tw, O)
            dest = out_BtmtmO[b0:b1, t0:t1]
            y_btmtmO = y_mmbttO.permute(2, 3, 0, 4, 1, 5)
            if bias_O is None:
                dest.copy_(y_btmtmO)
            else:
                torch.add(y_btmtmO, bias_O, out=dest)  # the bias rides on the scatter copy
    out_BHWO = out_BtmtmO.view(B, th * m, tw * m, O)
    if th * m != h_out or tw * m != w_out:
        out_BHWO = out_BHWO[:, :h_out, :w_out].contiguous()
    return out_BHWO.permute(0, 3, 1, 2)


class WinogradPath:
    """The Winograd path of one conv: an enable flag and the transforms cached per weight version."""

    def __init__(self) -> None:
        self.enabled = False
        self._key: tuple | None = None
        self._transforms: _Transforms | None = None

    def clear(self) -> None:
        """Drop the cached U (4× the conv's weight)."""
        self._key, self._transforms = None, None

    @staticmethod
    def applies(x_BChw: torch.Tensor, conv: nn.Conv2d) -> bool:
        """Whether the Winograd path computes this call (see the module docstring's scope)."""
        return (x_BChw.device.type == "cpu" and x_BChw.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled("cpu") and conv.weight.dtype == x_BChw.dtype
                and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
                and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
                and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS)

    def _derived(self, conv: nn.Conv2d) -> _Transforms:
        weight = conv.weight
        # a new state dict, .to() or an in-place edit changes pointer or version: U is derived again
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if key != self._key or self._transforms is None:
            with torch.no_grad():
                self._transforms = _Transforms(weight, weight.dtype)
            self._key = key
        return self._transforms

    def __call__(self, x_BChw: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        return winograd_conv2d(x_BChw, self._derived(conv), conv.bias, padding=1)


class WinogradConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state-dict keys) that takes the Winograd path when it is enabled and
    applies; the VQ-VAEs build their 3×3 stride-1 convs from it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.winograd = WinogradPath()  # no parameters or buffers

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        if self.winograd.enabled and not torch.is_grad_enabled() and self.winograd.applies(x_BChw, self):
            return self.winograd(x_BChw, self)
        return super().forward(x_BChw)
