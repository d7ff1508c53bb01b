"""QuantLinear and swap_linears on a toy module with VAR-like Linear names."""

import torch
from torch import nn

from varq.quant import FakeQuantizer, PerChannel, PerToken, QuantSpec
from varq.quant.qmodules import QuantLinear
from varq.quant.swap import swap_linears, unswap_linears


class Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.mat_qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
        return self.proj(self.mat_qkv(x)[..., : x.shape[-1]])


class FFN(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.attn, self.ffn = Attn(c), FFN(c)

    def forward(self, x):
        return x + self.attn(x) + self.ffn(x)


class Toy(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.word_embed = nn.Linear(4, c)
        self.blocks = nn.ModuleList([Block(c), Block(c)])
        self.head = nn.Linear(c, 5, bias=False)

    def forward(self, x):
        h = self.word_embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _quantizers(fqn, linear):
    weight_q = FakeQuantizer(QuantSpec(4, "uniform", PerChannel(0)), cache=True)
    return weight_q, FakeQuantizer(QuantSpec(4, "uniform", PerToken()))


def test_swap_by_fqn_keeps_parameter_keys_and_runs():
    torch.manual_seed(0)
    model = Toy()
    params_before = dict(model.named_parameters())
    x = torch.randn(2, 3, 4)
    ref = model(x)
    swapped = swap_linears(model, include=["*"], exclude=["head", "*.ffn.fc2"], make_quantizers=_quantizers)
    assert swapped == [
        "word_embed",
        "blocks.0.ada_lin.1", "blocks.0.attn.mat_qkv", "blocks.0.attn.proj", "blocks.0.ffn.fc1",
        "blocks.1.ada_lin.1", "blocks.1.attn.mat_qkv", "blocks.1.attn.proj", "blocks.1.ffn.fc1",
    ]  # fmt: skip
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[k] is params_before[k] for k in params_before)
    assert type(model.head) is nn.Linear and type(model.blocks[0].ffn.fc2) is nn.Linear
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape and not torch.equal(out, ref)
    assert all(model.get_submodule(f).calls == 1 for f in swapped if "ada_lin" not in f)
    assert swap_linears(model, include=["*"], exclude=["head", "*.ffn.fc2"]) == []  # already swapped


def test_unquantized_wrapper_is_exact_and_unswap_restores():
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(2, 3, 4)
    ref = model(x)
    assert swap_linears(model, include=["blocks.*.attn.*"]) == [
        "blocks.0.attn.mat_qkv", "blocks.0.attn.proj", "blocks.1.attn.mat_qkv", "blocks.1.attn.proj",
    ]  # fmt: skip
    assert isinstance(model.blocks[1].attn.proj, QuantLinear)
    torch.testing.assert_close(model(x), ref)
    model.load_state_dict(Toy().state_dict())  # plain checkpoint keys still load strictly
    restored = unswap_linears(model)
    assert len(restored) == 4 and type(model.blocks[1].attn.proj) is nn.Linear
