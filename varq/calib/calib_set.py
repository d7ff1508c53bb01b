"""The calibration set every method receives, and its on-disk cache.

A `CalibSet` is a batch of FP generations: their labels and seeds, the token indices sampled at every scale and the
teacher-forcing input built from them, so a method can replay the model with ``var(label, x)`` (numerically the
same pass as KV-cached sampling) and capture per-layer inputs with hooks, without sampling again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from varq.atomic import read_or_heal, save_torch_atomic
from varq.config import RunConfig, stable_hash
from varq.identity import model_identity

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the content of a CalibSet changes, so old cache files are not reused


@dataclass
class CalibSet:
    """N calibration sequences (CPU tensors).

    labels_N: class of each sequence. seeds_N: generator seed of the batch each sequence was sampled in.
    idx_per_scale: sampled token indices, one (N, pn²) tensor per scale.
    teacher_input_NLC: ``vqvae.idxBl_to_var_input(idx_per_scale)``, (N, L − first_l, Cvae) float32.
    num_classes: the null (unconditional) class id. cfg: guidance scale the sequences were sampled with.
    """

    labels_N: torch.Tensor
    seeds_N: torch.Tensor
    idx_per_scale: list[torch.Tensor]
    teacher_input_NLC: torch.Tensor
    num_classes: int
    cfg: float
    meta: dict = field(default_factory=dict)  # how it was made (builder, configs); JSON-like values only

    def __post_init__(self) -> None:
        N = self.labels_N.shape[0]
        shapes_ok = self.seeds_N.shape[0] == N and self.teacher_input_NLC.shape[0] == N
        if not shapes_ok or any(idx.shape[0] != N for idx in self.idx_per_scale):
            raise ValueError(f"CalibSet tensors disagree on the number of sequences ({N})")

    def __len__(self) -> int:
        return self.labels_N.shape[0]

    def teacher_batch(
        self, rows: Sequence[int] | torch.Tensor | slice, device: torch.device | str = "cpu", with_uncond: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(label_B, x_BLCv) for ``var(label_B, x_BLCv)``; ``with_uncond`` appends the null-class copies
        ([cond; uncond], the sampler's CFG batch layout)."""
        label_B, x_BLC = self.labels_N[rows], self.teacher_input_NLC[rows]
        if with_uncond:
            label_B = torch.cat((label_B, torch.full_like(label_B, self.num_classes)))
            x_BLC = torch.cat((x_BLC, x_BLC))
        return label_B.to(device), x_BLC.to(device)

    @torch.no_grad()
    def free_run(self, qvar, rows: Sequence[int], sampler, seed: int) -> None:
        """Generate ``rows``' classes with ``qvar`` (Shift-and-Sum's free-running θ search). The release samples
        under fp16 autocast on CUDA; on the CPU it stays fp32 (CPU fp16 autocast is not what the release ran)."""
        from varq.sample.sampler import generate

        device = next(qvar.parameters()).device
        generate(qvar, sampler.vqvae, self.labels_N[list(rows)].to(device), cfg=sampler.cfg, top_k=sampler.top_k,
                 top_p=sampler.top_p, rng=torch.Generator(device=device).manual_seed(seed),
                 autocast_dtype=torch.float16 if device.type == "cuda" else None)

    def batches(
        self, batch_size: int, device: torch.device | str = "cpu", with_uncond: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.teacher_batch(slice(start, start + batch_size), device, with_uncond)

    # ---------------------------------------------------------------- (de)serialisation: tensors and plain values only
    def state(self) -> dict:
        return {
            "format": FORMAT_VERSION, "labels_N": self.labels_N, "seeds_N": self.seeds_N,
            "idx_per_scale": list(self.idx_per_scale), "teacher_input_NLC": self.teacher_input_NLC,
            "num_classes": self.num_classes, "cfg": self.cfg, "meta": self.meta,
        }

    @classmethod
    def from_state(cls, state: dict) -> CalibSet:
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"calibration set format {state.get('format')} != {FORMAT_VERSION}")
        return cls(
            labels_N=state["labels_N"], seeds_N=state["seeds_N"], idx_per_scale=list(state["idx_per_scale"]),
            teacher_input_NLC=state["teacher_input_NLC"], num_classes=int(state["num_classes"]),
            cfg=float(state["cfg"]), meta=dict(state["meta"]),
        )


def cache_key(cfg: RunConfig, device: torch.device) -> str:
    """Content hash of what determines a calibration set: the FP model, the calib config, the eval's sampling
    parameters and the device type (the same seed draws different tokens on CPU and CUDA)."""
    ev = cfg.eval
    return stable_hash({
        "format": FORMAT_VERSION, "model": model_identity(cfg), "calib": asdict(cfg.calib),
        "sampling": {"cfg": ev.cfg, "top_k": ev.top_k, "top_p": ev.top_p, "dtype": ev.dtype},
        "device": torch.device(device).type,
    }, length=16)


def cache_path(cfg: RunConfig, device: torch.device) -> Path:
    return Path(cfg.paths.cache) / "calib" / f"{cfg.calib.name}_{cache_key(cfg, device)}.pt"


def save_atomic(calib_set: CalibSet, path: Path) -> None:
    save_torch_atomic(path, calib_set.state())


def text_cache_path(cfg: RunConfig, device: torch.device) -> Path:
    from varq.calib.text_set import text_cache_key

    return Path(cfg.paths.cache) / "calib" / f"t2i_{cfg.calib.name}_{text_cache_key(cfg, device)}.pt"


def _from_state(state: dict):
    if state.get("kind") == "text":
        from varq.calib.text_set import TextCalibSet

        return TextCalibSet.from_state(state)
    return CalibSet.from_state(state)


def try_load(path: Path):
    """The cached set, or None when absent or unreadable (a truncated or foreign file is moved aside, rebuilt)."""
    return read_or_heal(path, lambda p: _from_state(torch.load(p, map_location="cpu", weights_only=True)))
