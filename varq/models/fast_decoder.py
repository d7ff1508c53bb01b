"""``eval.decoder=fast``: the VQ-VAE decoders' own weights computed with fewer operations (opt-in, not bit-exact).

The decoder is about 40 % of a d16 image's FLOPs (394 of 957 GFLOP), so the sampler cannot be much faster than the
official one with the reference decoder. The fast decoder changes two things, each exact in real arithmetic:

1. **channels_last.** Weights and activations are kept NHWC, the layout oneDNN's and cuDNN's convolution kernels
   work in; NCHW tensors are reordered around every convolution (measured on one CPU core, fp32, batch 4: a 3×3 conv
   at 256², 160 channels, 0.92 s NCHW against 0.77 s NHWC).
2. **Upsampling at the low resolution.** A nearest ×2 upsample followed by a 3×3 conv (pad 1) gives output pixel
   (2i+a, 2j+b) from a 2×2 window of the low-resolution input: along each axis, phase 0 reads rows (i-1, i) with taps
   (w0, w1+w2) and phase 1 reads rows (i, i+1) with taps (w0+w1, w2). One 2×2 conv with 4·C_out output channels on the
   input padded by one computes all four phases: 16 multiply-adds per output pixel and input channel instead of 36,
   and no 4×-sized interpolated tensor (measured as above: 128² → 256² at 160 channels, 0.84 s against 0.51 s).

The summed taps round differently from the reference's separate products, so images differ in the last bits of
fp32 (about 4e-5 at most on d16 in [0, 1]); ``eval.decoder`` therefore enters the run identity, and the reference
decoder stays the default. `tests/models/test_fast_decoder.py` holds the two equal to 1e-10 in float64, where
rounding cannot hide a wrong tap.

``eval.decoder=winograd`` is ``fast`` plus the 3×3 stride-1 convs as Winograd F(4×4, 3×3) on the CPU
(`varq.models.winograd`); `set_decoder` switches both paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from varq.models.winograd import WinogradPath

__all__ = ["DECODERS", "PhaseUpsample", "decoder_mode", "phase_kernels", "set_decoder", "upsample_conv_phases"]

# winograd = fast plus the 3×3 convs as Winograd F(4×4, 3×3) on the CPU (varq.models.winograd)
DECODERS = ("reference", "fast", "winograd")


def _phase_taps(w_OIkk: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 2-tap kernels of a 3-tap axis: phase 0 reads (i-1, i), phase 1 reads (i, i+1)."""
    w0, w1, w2 = w_OIkk.unbind(dim)
    return torch.stack((w0, w1 + w2), dim), torch.stack((w0 + w1, w2), dim)


def phase_kernels(weight_OI33: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) kernel of the conv after a nearest ×2 upsample → (4·O, I, 2, 2), phases ordered (a, b) row-major:
    output channels [p·O, (p+1)·O) with p = 2a + b compute output pixels (2i+a, 2j+b)."""
    if weight_OI33.shape[-2:] != (3, 3):
        raise ValueError(f"phase kernels need a 3x3 conv, got kernel {tuple(weight_OI33.shape[-2:])}")
    kernels = []
    for rows_OI23 in _phase_taps(weight_OI33, 2):
        kernels.extend(_phase_taps(rows_OI23, 3))
    return torch.cat(kernels, 0)


def upsample_conv_phases(x_BChw: torch.Tensor, kernels_PIkk: torch.Tensor, bias_P: torch.Tensor | None,
                         out_channels: int) -> torch.Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` from `phase_kernels`: one 2×2 conv at the input's resolution, then the four
    phases interleaved into the (B, O, 2h, 2w) output (channels_last, the layout the conv produced)."""
    B, _, h, w = x_BChw.shape
    O = out_channels
    y_BPhw = F.conv2d(F.pad(x_BChw, (1, 1, 1, 1)), kernels_PIkk, bias_P)  # (B, 4·O, h+1, w+1)
    y_BhwP = y_BPhw.permute(0, 2, 3, 1)  # a view when the conv gave channels_last
    out_Bh2w2O = torch.empty((B, h, 2, w, 2, O), dtype=y_BPhw.dtype, device=y_BPhw.device)
    for a in (0, 1):
        for b in (0, 1):
            p = 2 * a + b
            # phase (a, b) of output pixel (2i+a, 2j+b) sits at (i+a, j+b) of the padded-input conv
            out_Bh2w2O[:, :, a, :, b, :] = y_BhwP[:, a:a + h, b:b + w, p * O:(p + 1) * O]
    return out_Bh2w2O.view(B, 2 * h, 2 * w, O).permute(0, 3, 1, 2)


class PhaseUpsample:
    """The fast path of one "nearest ×2, then ``conv``" module; the derived kernels are cached per weight version."""

    def __init__(self) -> None:
        self.enabled = False
        self._key: tuple | None = None
        self._kernels: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def clear(self) -> None:
        """Drop the derived kernels (16/9 of the conv's weight), e.g. when the reference decoder is back."""
        self._key, self._kernels = None, None

    def _derived(self, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = conv.weight, conv.bias
        # a new state dict, .to() or an in-place edit changes pointer or version: the kernels are derived again
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device,
               None if bias is None else (bias.data_ptr(), bias._version))
        if key != self._key or self._kernels is None:
            with torch.no_grad():
                kernels = phase_kernels(weight).contiguous(memory_format=torch.channels_last)
                self._kernels = (kernels, None if bias is None else bias.repeat(4))
            self._key = key
        return self._kernels

    def __call__(self, x_BChw: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) or conv.groups != 1:
            raise ValueError("the phase path computes a 3x3, stride-1, pad-1 conv after a nearest x2 upsample")
        kernels, bias = self._derived(conv)
        return upsample_conv_phases(x_BChw, kernels, bias, conv.out_channels)


def _phase_modules(decoder: nn.Module) -> list[PhaseUpsample]:
    return [m.phase for m in decoder.modules() if isinstance(getattr(m, "phase", None), PhaseUpsample)]


def _winograd_paths(decoder: nn.Module) -> list[WinogradPath]:
    return [m.winograd for m in decoder.modules() if isinstance(getattr(m, "winograd", None), WinogradPath)]


def set_decoder(vae: nn.Module, mode: str) -> str:
    """Put ``vae.decoder`` in ``mode`` (one of `DECODERS`); returns the mode it was in. Weights keep their values
    (only their memory layout changes), so the state dict and the reference outputs are unchanged."""
    if mode not in DECODERS:
        raise ValueError(f"eval.decoder={mode!r}: choose one of {', '.join(DECODERS)}")
    decoder = getattr(vae, "decoder", None)
    phases = [] if decoder is None else _phase_modules(decoder)
    if not phases:
        raise ValueError(f"{type(vae).__name__} has no decoder with a fast path; use eval.decoder=reference")
    winograds = _winograd_paths(decoder)
    if mode == "winograd" and not winograds:
        raise ValueError(f"{type(vae).__name__}'s decoder has no Winograd convs; use eval.decoder=fast")
    previous = ("winograd" if any(w.enabled for w in winograds) else "fast") if phases[0].enabled else "reference"
    fast = mode != "reference"
    decoder.to(memory_format=torch.channels_last if fast else torch.contiguous_format)
    for phase in phases:
        phase.enabled = fast
        if not fast:
            phase.clear()
    for path in winograds:
        path.enabled = mode == "winograd"
        if not path.enabled:
            path.clear()
    return previous


@contextlib.contextmanager
def decoder_mode(vae: nn.Module, mode: str) -> Iterator[None]:
    """``set_decoder`` for the duration of the block; ``reference`` on a decoder already in it touches nothing (so a
    VAE without a fast path still samples with the default)."""
    if mode == "reference" and not any(p.enabled for p in _phase_modules(getattr(vae, "decoder", nn.Module()))):
        yield
        return
    previous = set_decoder(vae, mode)
    try:
        yield
    finally:
        set_decoder(vae, previous)
