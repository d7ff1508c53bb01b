"""VAR's adapter: the structure of `varq.models.var.VAR` as the quantizers, calibration and samplers need it.

Everything that names VAR's submodules (``blocks.i.attn.mat_qkv``, ``head_nm.ada_lin`` …), its AdaLN chunk layout,
its scale structure or its two passes lives here (see `varq.models.adapter` for the contract).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch
from torch import nn

from varq.models.adapter import (
    AdaLNSite,
    KVSession,
    LinearSite,
    NextScaleAdapter,
    Stage,
    Stream,
    register_adapter,
)
from varq.models.var_blocks import BLOCK_ADALN_CHUNKS, HEAD_ADALN_CHUNKS

__all__ = ["VARAdapter", "VARKVSession"]

# every nn.Linear of VAR and its kind (methods.md §3.2); `ada_lin.0` is a SiLU, `ada_lin.1` the Linear
_LINEAR_KINDS = (
    ("word_embed", "embed"),
    ("blocks.*.ada_lin.1", "adaln"),
    ("blocks.*.attn.mat_qkv", "qkv"),
    ("blocks.*.attn.proj", "attn_out"),
    ("blocks.*.ffn.fc1", "ffn_up"),
    ("blocks.*.ffn.fc2", "ffn_down"),
    ("head_nm.ada_lin.1", "head_adaln"),
    ("head", "head"),
)
# word_embed skips the first scale (the SOS tokens come from the class); an ada_lin input has no token dim
_TOKEN_ALIGNED = ("qkv", "attn_out", "ffn_up", "ffn_down", "head")
_BLOCK_CHUNK = {name: i for i, name in enumerate(BLOCK_ADALN_CHUNKS)}
_HEAD_CHUNK = {name: i for i, name in enumerate(HEAD_ADALN_CHUNKS)}


def _kind_of(fqn: str) -> str | None:
    return next((kind for pattern, kind in _LINEAR_KINDS if fnmatchcase(fqn, pattern)), None)


def _is_linear(module: nn.Module) -> bool:
    # a QuantLinear (varq.quant.qmodules) keeps the Linear's in/out features and weight; both count
    return isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "weight"))


class VARKVSession(KVSession):
    """One batch of VAR's scale-by-scale inference (see `KVSession`); created by `VARAdapter.kv_session`."""

    def __init__(self, adapter: VARAdapter, label_B: torch.Tensor, num_cond: int | None, static_modulation: bool):
        var = adapter.model
        self.adapter, self.var, self.num_cond = adapter, var, num_cond
        self.num_scales = len(var.patch_nums)
        self.cond_BD = var.class_emb(label_B)
        self.lvl_pos_1LC = var.lvl_pos_1LC()
        self.mods, self.head_mod = var.modulations(self.cond_BD) if static_modulation else (None, None)

    def first_input(self) -> torch.Tensor:
        var, B = self.var, self.cond_BD.shape[0]
        return self.cond_BD.unsqueeze(1) + var.pos_start.expand(B, -1, -1) + self.lvl_pos_1LC[:, : var.first_l]

    def step(self, si: int, x_BlC: torch.Tensor) -> torch.Tensor:
        begin, end = self.var.begin_ends[si]
        with self.adapter.token_context(self.adapter.token_scale_L[begin:end], self.num_cond):
            h_BlC = self.var.run_blocks(x_BlC, self.cond_BD, attn_bias=None, mods=self.mods)
            return self.var.get_logits(h_BlC, self.cond_BD, self.head_mod)

    def embed(self, si: int, x_BlCv: torch.Tensor) -> torch.Tensor:
        begin, end = self.var.begin_ends[si]
        return self.var.word_embed(x_BlCv.float()) + self.lvl_pos_1LC[:, begin:end]


@register_adapter("var")
class VARAdapter(NextScaleAdapter):
    session_class = VARKVSession
    # ------------------------------------------------------------------ structure
    def linears(self) -> list[LinearSite]:
        sites = []
        for fqn, module in self.model.named_modules():
            kind = _kind_of(fqn)
            if kind is None or not _is_linear(module):
                continue
            block_idx = int(fqn.split(".")[1]) if fqn.startswith("blocks.") else -1
            sites.append(LinearSite(fqn, kind, block_idx, token_aligned=kind in _TOKEN_ALIGNED))
        return sites

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    def attention_modules(self) -> dict[int, nn.Module]:
        return {i: block.attn for i, block in enumerate(self.model.blocks)}

    def last_block(self) -> nn.Module:
        return self.model.blocks[-1]

    @property
    def num_heads(self) -> int:
        return self.model.blocks[0].attn.num_heads

    @property
    def head_dim(self) -> int:
        return self.model.blocks[0].attn.head_dim

    def adaln_sites(self) -> dict[str, AdaLNSite]:
        sites = {}
        n_block, n_head = len(BLOCK_ADALN_CHUNKS), len(HEAD_ADALN_CHUNKS)
        for i in range(self.num_blocks):
            ada = f"blocks.{i}.ada_lin.1"
            attn = f"blocks.{i}.attn"
            # mat_qkv has no bias of its own: its compensation goes into q_bias, the persistent zero_k_bias and v_bias
            sites[f"{attn}.mat_qkv"] = AdaLNSite(
                f"{attn}.mat_qkv", ada, _BLOCK_CHUNK["scale1"], _BLOCK_CHUNK["shift1"], n_block, skips_sink=True,
                bias_fqns=(f"{attn}.q_bias", f"{attn}.zero_k_bias", f"{attn}.v_bias"),
            )
            sites[f"blocks.{i}.ffn.fc1"] = AdaLNSite(
                f"blocks.{i}.ffn.fc1", ada, _BLOCK_CHUNK["scale2"], _BLOCK_CHUNK["shift2"], n_block, skips_sink=True,
            )
        sites["head"] = AdaLNSite(
            "head", "head_nm.ada_lin.1", _HEAD_CHUNK["scale"], _HEAD_CHUNK["shift"], n_head, skips_sink=False,
        )
        return sites

    # ------------------------------------------------------------------ cost (one CFG pair, KV-cached sampling)
    def linear_rows_per_pair(self, site: LinearSite) -> int:
        tokens = [pn * pn for pn in self.model.patch_nums]
        if site.kind == "embed":  # the next input is embedded once and repeated for both halves
            return sum(tokens[1:])
        if site.kind in ("adaln", "head_adaln"):  # one condition row per half, re-modulated at every scale
            return 2 * len(tokens)
        return 2 * sum(tokens)

    # ------------------------------------------------------------------ passes
    def teacher_forward(
        self, label_B: torch.Tensor, x_BLCv: torch.Tensor, num_cond: int | None = None, masked: bool = True,
    ) -> torch.Tensor:
        return self.model(label_B, x_BLCv, num_cond=num_cond, masked=masked)

    def modulation_roots(self) -> list[nn.Module]:
        var = self.model
        return [block.ada_lin for block in var.blocks] + [var.head_nm.ada_lin, var.shared_ada_lin]

    # ------------------------------------------------------------------ reconstruction stages (methods.md §3.6)
    def stages(self) -> list[Stage]:
        out = [Stage("word_embed", "embed")]
        for i in range(self.num_blocks):
            out += [Stage(f"blocks.{i}.ada_lin", "adaln", i), Stage(f"blocks.{i}.attn", "attn", i),
                    Stage(f"blocks.{i}.ffn", "ffn", i)]
        return out + [Stage("head_nm.ada_lin", "head_adaln"), Stage("head", "head")]

    def init_stream(self, label_N: torch.Tensor) -> Stream:
        with torch.no_grad():
            return Stream(cond_ND=self.model.class_emb(label_N).float())

    @torch.no_grad()
    def stage_input(self, stage: Stage, stream: Stream, teacher_NLC: torch.Tensor) -> torch.Tensor:
        """The input of ``stage`` for every row (the AdaLN modulation is FP arithmetic outside every unit)."""
        var = self.model
        if stage.kind == "embed":
            return teacher_NLC
        if stage.kind == "adaln":
            return var.shared_ada_lin(stream.cond_ND)
        if stage.kind == "head_adaln":
            return stream.cond_ND
        mod_N1KC = stream.mod_NKC.unsqueeze(1)  # broadcasts over tokens
        if stage.kind == "head":
            return var.head_nm.modulated(stream.h_NLC, mod_N1KC)
        return var.blocks[stage.block_idx].branch_input(stage.kind, stream.h_NLC, mod_N1KC)

    def _attn_kv_cached(self, attn: nn.Module, x_BLC: torch.Tensor) -> torch.Tensor:
        # scale by scale with the cache on, as in sampling: scale k attends to the (quantized, on the fly) K/V of 0..k
        outs = []
        scales_L = self.token_scale_L
        attn.kv_caching(True)
        try:
            for begin, end in self.model.begin_ends:
                with self.token_context(scales_L[begin:end]):
                    outs.append(attn(x_BLC[:, begin:end], attn_bias=None))
        finally:
            attn.kv_caching(False)
        return torch.cat(outs, dim=1)

    def _attn_vectorised(self, attn: nn.Module, x_BLC: torch.Tensor) -> torch.Tensor:
        # one teacher-forced pass whose every scale equals the cached step (`varq.quant.prefix_attention`)
        from varq.quant.prefix_attention import prefix_attention

        op = attn.operand_quant
        with self.token_context(self.token_scale_L):
            if op is None:  # FP attention: the masked pass is the cached one
                return attn(x_BLC, attn_bias=self.model.attn_bias_for_masking.to(x_BLC.dtype))
            B, L, _ = x_BLC.shape
            q_BHLc, k_BHLc, v_BHLc = attn.qkv_heads(x_BLC)
            out_BHLc = prefix_attention(op, q_BHLc, k_BHLc, v_BHLc, attn.scale, self.prefix_layout(x_BLC.device))
            return attn.proj(out_BHLc.transpose(1, 2).reshape(B, L, -1))

    def _scale_ends(self) -> tuple[int, ...]:
        # S_k: the keys query scale k sees are tokens 0..S_k-1
        return tuple(end for _, end in self.scale_bounds)

    def prefix_layout(self, device: torch.device):
        """The concatenated-key layout of this model's scales on ``device`` (built once, then reused)."""
        from varq.quant.prefix_attention import prefix_layout

        ends = self._scale_ends()
        cached = getattr(self.model, "_prefix_layout", None)
        if cached is None or cached.ends != ends or cached.bias_LT.device != torch.device(device):
            cached = prefix_layout(ends, device)
            self.model._prefix_layout = cached  # plain attribute: not a buffer, never saved
        return cached

    def check_attention_pass(self, attention_pass: str) -> None:
        """Refuse, before any fit, an ``attention_pass`` this model's quantizers cannot run (names block and fix)."""
        if attention_pass != "vectorised":
            return
        from varq.quant.prefix_attention import check_vectorisable

        ends = self._scale_ends()
        for attn in self.attention_modules().values():
            if attn.operand_quant is not None:
                check_vectorisable(attn.operand_quant, ends)

    def run_stage(
        self, stage: Stage, x: torch.Tensor, kv_cached: bool = True, attention_pass: str = "cached",
    ) -> torch.Tensor:
        """The stage's output for input rows ``x`` (gradient mode is the caller's).

        ``kv_cached=False`` runs attention as one masked teacher-forced pass (only meant for an FP model).
        ``attention_pass="vectorised"`` (with ``kv_cached``) runs the quantized attention as one pass that equals the
        cached steps (`varq.quant.prefix_attention`), without a loop over the scales.
        """
        module = self.model.get_submodule(stage.name)
        if stage.kind == "attn":
            if kv_cached and attention_pass == "vectorised":
                return self._attn_vectorised(module, x)
            if kv_cached:
                return self._attn_kv_cached(module, x)
            with self.token_context(self.token_scale_L):
                return module(x, attn_bias=self.model.attn_bias_for_masking.to(x.dtype))
        with self.token_context(self.stage_output_scales(stage)):
            return module(x)

    @torch.no_grad()
    def advance(self, stage: Stage, stream: Stream, out: torch.Tensor) -> None:
        """Move ``stream`` past ``stage`` given the stage's output for every row."""
        var = self.model
        if stage.kind == "embed":
            N = out.shape[0]
            sos_NlC = stream.cond_ND.unsqueeze(1).expand(N, var.first_l, -1) + var.pos_start.expand(N, -1, -1)
            stream.h_NLC = torch.cat((sos_NlC, out), dim=1) + var.lvl_pos_1LC()
        elif stage.kind == "adaln":
            stream.mod_NKC = out.view(out.shape[0], len(BLOCK_ADALN_CHUNKS), -1)
        elif stage.kind == "head_adaln":
            stream.mod_NKC = out.view(out.shape[0], len(HEAD_ADALN_CHUNKS), -1)
        elif stage.kind in ("attn", "ffn"):
            block = var.blocks[stage.block_idx]
            stream.h_NLC = block.add_branch(stage.kind, stream.h_NLC, out, stream.mod_NKC.unsqueeze(1))
        # the head's output (logits) ends the pass
