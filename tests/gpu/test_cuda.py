"""GPU checks (marker gpu; deselected by default, run with `pytest -m gpu` on a CUDA machine)."""

from __future__ import annotations

import pytest
import torch

from tests.models.test_var import tiny_pair
from varq.sample.sampler import generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_teacher_forcing_matches_cpu_in_fp32_and_stays_close_under_autocast():
    var, vqvae = tiny_pair()
    x = torch.randn(4, var.L - 1, var.Cvae, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        cpu = var(labels, x)
        gpu_var = var.cuda()
        gpu = gpu_var(labels.cuda(), x.cuda()).cpu()
        torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast("cuda", dtype=dtype):
                low = gpu_var(labels.cuda(), x.cuda()).float().cpu()
            assert (low - cpu).abs().max() < 0.1 * cpu.abs().max()


def test_cuda_sampling_is_seeded():
    var, vqvae = tiny_pair()
    var, vqvae = var.cuda(), vqvae.cuda()
    labels = torch.tensor([1, 2, 3], device="cuda")
    kw = dict(cfg=1.5, top_k=10, top_p=0.9, autocast_dtype=torch.bfloat16)
    a = generate(var, vqvae, labels, rng=torch.Generator(device="cuda").manual_seed(0), **kw)
    b = generate(var, vqvae, labels, rng=torch.Generator(device="cuda").manual_seed(0), **kw)
    assert torch.equal(a, b) and a.shape == (3, 3, 8, 8)
