"""GPU checks of the speed paths (marker gpu): the fast sampler, FP8 GEMMs and the reconstruction GEMM precision."""

from __future__ import annotations

import pytest
import torch

from tests.models.test_var import tiny_pair
from varq.quant.fp8 import fp8_matmul
from varq.quant.recon.adaround import gemm_precision
from varq.sample.sampler import generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_fast_sampler_equals_reference_loop_on_cuda():
    var, vqvae = tiny_pair()
    var, vqvae = var.cuda(), vqvae.cuda()
    labels = torch.tensor([1, 2, 3], device="cuda")
    kw = dict(cfg=1.5, top_k=20, top_p=0.9, autocast_dtype=torch.bfloat16)
    ref = generate(var, vqvae, labels, rng=torch.Generator("cuda").manual_seed(4), reference_loop=True, **kw)
    fast = generate(var, vqvae, labels, rng=torch.Generator("cuda").manual_seed(4), **kw)
    assert torch.equal(ref, fast)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_fast_decoder_agrees_with_the_reference_on_cuda(dtype, atol):
    from varq.models.fast_decoder import decoder_mode

    _, vqvae = tiny_pair()
    vqvae = vqvae.cuda()
    z = torch.randn(3, vqvae.Cvae, 6, 5, generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        ref = vqvae.fhat_to_img(z).float()
        with decoder_mode(vqvae, "fast"):
            fast = vqvae.fhat_to_img(z).float()
    assert fast.is_contiguous()
    torch.testing.assert_close(fast, ref, rtol=0, atol=atol)  # bf16: the summed taps round once, the reference twice


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 tensor cores need compute capability >= 8.9")
@pytest.mark.parametrize("exact", [True, False])
def test_scaled_mm_matches_the_fp32_emulation(exact):
    gen = torch.Generator().manual_seed(0)
    if exact:  # integer codes: the accumulator is exact, so the two agree to fp32 rounding of the scales
        a = torch.randint(-15, 16, (256, 512), generator=gen).float()
        w = torch.randint(-15, 16, (384, 512), generator=gen).float()
    else:
        a, w = torch.randn(256, 512, generator=gen) * 100, torch.randn(384, 512, generator=gen) * 100
    a8, w8 = a.to(torch.float8_e4m3fn).cuda(), w.to(torch.float8_e4m3fn).cuda()
    sa, sw = torch.rand(256, 1, generator=gen).cuda() + 0.5, torch.rand(384, 1, generator=gen).cuda() + 0.5
    gpu = fp8_matmul(a8, sa, w8, sw, exact).cpu()
    emu = fp8_matmul(a8.cpu(), sa.cpu(), w8.cpu(), sw.cpu(), exact)
    tol = 1e-6 if exact else 1e-2  # the row-wise path returns bf16
    torch.testing.assert_close(gpu, emu, rtol=tol, atol=tol * emu.abs().max().item())


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_gemm_precision_changes_matmuls_only_inside_and_restores(precision):
    x = torch.randn(64, 64, device="cuda")
    saved = torch.backends.cuda.matmul.allow_tf32
    with gemm_precision(precision, x.device):
        y = x @ x
        assert (y.dtype == torch.bfloat16) == (precision == "bf16")
        if precision == "tf32":
            assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == saved and (x @ x).dtype == torch.float32


@pytest.mark.parametrize("kind,granularity", [("uniform", "g64"), ("log2", "token"), ("sign_split", "token")])
def test_compiled_quantizers_equal_the_eager_ones_on_cuda(kind, granularity):
    # Triton kernels instead of the CPU's C++ loops: the compiled path must still give the eager numbers bit for bit
    from varq.quant import fused
    from varq.quant.granularity import PerGroup, PerToken
    from varq.quant.quantizer import FakeQuantizer, QuantSpec

    spec = QuantSpec(4, kind, PerGroup(64) if granularity == "g64" else PerToken(), dynamic=True)
    q = FakeQuantizer(spec)
    x = torch.randn(8, 64, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    if kind == "log2":
        x = x.softmax(-1)
    previous = fused.use_fused_quantizers(True)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            with torch.no_grad():
                got = q(x.to(dtype))
                fused.use_fused_quantizers(False)
                expected = q(x.to(dtype))
                fused.use_fused_quantizers(True)
            assert torch.equal(got, expected)
    finally:
        fused.use_fused_quantizers(previous)
