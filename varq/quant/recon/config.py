"""Hyper-parameters of AdaRound reconstruction (methods.md §3.6 for Shift-and-Sum, §5.1 for the original BRECQ)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from varq.quant.registration import MethodConfig

__all__ = ["ReconConfig", "ReconMethodConfig", "UNIT_MODES", "INPUT_SOURCES", "LR_SCHEDULES", "ATTENTION_PASSES"]

UNIT_MODES = ("block", "layer")
INPUT_SOURCES = ("fp", "quant")
LR_SCHEDULES = ("constant", "cosine")
GEMM_PRECISIONS = ("fp32", "tf32", "bf16")
ATTENTION_PASSES = ("cached", "vectorised")


@dataclass
class ReconConfig:
    """How `reconstruct` optimises the AdaRound rounding of every unit.

    The first nine fields are the public contract; the defaults follow the original BRECQ recipe (§5.1) except for
    the iteration count and batch size, which follow the released Shift-and-Sum code (§3.6).

    Args:
        iters: optimisation steps per unit (the papers use 5000; tests use a handful).
        batch_size: calibration rows per step (a row is one sequence, cond or uncond, over all scales).
        lr: Adam learning rate on the AdaRound α (activation quantizers are dynamic and learn nothing).
        weight_reg: λ of the rounding regulariser Σ(1 − |2h(α) − 1|^β).
        b_start, b_end: β is annealed linearly from b_start to b_end after the warm-up.
        warmup: fraction of the iterations without the regulariser (BRECQ 0.2, Shift-and-Sum 0).
        units: "block": word_embed, every ada_lin, head_nm.ada_lin and head are layer units and each block's attention
            (mat_qkv → attention → proj) and FFN (fc1 → GELU → fc2) are block units; "layer": every Linear alone.
        seed: seeds the row sampling, so a reconstruction is reproducible.
        inputs: where a unit's inputs come from. "fp": the FP model, like the targets (the released Shift-and-Sum
            code, §3.6: no error propagates from earlier units); "quant": the already reconstructed quantized model
            (original BRECQ / QDrop-style sequential reconstruction). Targets always come from the FP model.
        lr_schedule: "constant" (BRECQ) or "cosine" decay to 0 over the iterations (Shift-and-Sum).
        gemm_precision: "fp32" (default), "tf32" or "bf16" (autocast) for the unit's GEMMs on CUDA, a speed option;
            α, the quantizers and the loss stay fp32. No effect on a CPU.
        attention_pass: how a block-mode attention unit runs its quantized attention. "cached" (default): scale by
            scale with the KV cache, as sampling runs it; "vectorised": one teacher-forced pass whose every scale
            computes the same (prefix K/V ranges in a concatenated-key layout, `varq.quant.prefix_attention`),
            equal up to fp32 rounding, with no loop over the scales. Quantizers it cannot reproduce are refused
            before the first unit.
    """

    iters: int = 5000
    batch_size: int = 4
    lr: float = 1e-3
    weight_reg: float = 0.01
    b_start: float = 20.0
    b_end: float = 2.0
    warmup: float = 0.2
    units: str = "block"
    seed: int = 0
    inputs: str = "fp"
    lr_schedule: str = "constant"
    gemm_precision: str = "fp32"
    attention_pass: str = "cached"

    def __post_init__(self) -> None:
        if self.iters < 0 or self.batch_size < 1:
            raise ValueError(f"iters must be >= 0 and batch_size >= 1, got {self.iters} and {self.batch_size}")
        if self.lr <= 0 or self.weight_reg < 0:
            raise ValueError(f"lr must be > 0 and weight_reg >= 0, got {self.lr} and {self.weight_reg}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the iterations in [0, 1), got {self.warmup}")
        if self.b_start <= 0 or self.b_end <= 0:
            raise ValueError(f"β must stay positive, got b_start={self.b_start}, b_end={self.b_end}")
        for key, value, allowed in (
            ("units", self.units, UNIT_MODES), ("inputs", self.inputs, INPUT_SOURCES),
            ("lr_schedule", self.lr_schedule, LR_SCHEDULES), ("gemm_precision", self.gemm_precision, GEMM_PRECISIONS),
            ("attention_pass", self.attention_pass, ATTENTION_PASSES),
        ):
            if value not in allowed:
                raise ValueError(f"{key}={value!r}; choose one of {', '.join(allowed)}")

    def beta(self, count: int) -> float | None:
        """β of the ``count``-th iteration (1-based, as the released loss counts its calls), or None while the
        regulariser is off (warm-up: count < warmup·iters).

        β = b_end + (b_start − b_end)·max(0, 1 − (count − w)/(iters − w)) with w = warmup·iters, so the first
        iteration is already one step into the decay and the last one uses b_end.
        """
        warm = self.warmup * self.iters
        if count < warm:
            return None
        progress = (count - warm) / max(self.iters - warm, 1.0)
        return self.b_end + (self.b_start - self.b_end) * max(0.0, 1.0 - progress)


@dataclass
class ReconMethodConfig(MethodConfig):
    """The reconstruction hyper-parameters shared by every method that runs AdaRound (brecq, ours), with the
    released Shift-and-Sum values as defaults (README command lines: lr 1e-4 with cosine decay, λ 1e-5, no warm-up).
    ``recon_inputs`` is where unit inputs come from (`ReconConfig.inputs`)."""

    iters: int = 5000
    batch_size: int = 4
    lr: float = 1e-4
    weight_reg: float = 1e-5
    b_start: float = 20.0
    b_end: float = 2.0
    warmup: float = 0.0
    units: str = "block"
    seed: int = 0
    lr_schedule: str = "cosine"
    gemm_precision: str = "fp32"  # fp32 | tf32 | bf16: unit GEMMs on CUDA (speed); α stays fp32
    attention_pass: str = "cached"  # cached: attention units scale by scale | vectorised: one equal pass (speed)
    recon_inputs: str = "fp"  # fp: unit inputs from the FP model, like the targets (released code) | quant (BRECQ)

    def recon_config(self) -> ReconConfig:
        shared = {f.name: getattr(self, f.name) for f in fields(ReconConfig) if f.name != "inputs"}
        return ReconConfig(**shared, inputs=self.recon_inputs)
