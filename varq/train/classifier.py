"""Train the digits classifier from a fixed seed and ship it as the `digits_classifier` asset.

    python -m varq.train.classifier            # also part of `make assets`

CPU, one thread, well under a minute. Light augmentation (random integer shifts of up to ±2 px at 32×32, i.e.
half a source pixel) keeps the classifier from keying on exact pixel positions, so the slightly misplaced strokes
of generated samples are still recognised.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from varq.models.classifier import DIGITS_CLASSIFIER_ASSET, FEATURE_DIM, DigitsClassifier

MAX_SHIFT_PX = 2
DEFAULT_EPOCHS = 25
MIN_TEST_ACCURACY = 0.97


def random_shift(x_B3HW: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by independent integer offsets in [-max_shift, max_shift], filling with background."""
    B, _, H, W = x_B3HW.shape
    # Digit background is pixel value 0, so zero padding extends the background.
    padded = F.pad(x_B3HW, (max_shift,) * 4)
    offsets_B2 = torch.randint(0, 2 * max_shift + 1, (B, 2), generator=generator)
    return torch.stack([padded[b, :, dy : dy + H, dx : dx + W] for b, (dy, dx) in enumerate(offsets_B2.tolist())])


@torch.no_grad()
def accuracy(model: DigitsClassifier, images_N3HW: torch.Tensor, labels_N: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images_N3HW), batch_size):
        correct += int((model(images_N3HW[i : i + batch_size]).argmax(1) == labels_N[i : i + batch_size]).sum())
    return correct / len(images_N3HW)


def train_classifier(seed: int = 0, epochs: int = DEFAULT_EPOCHS, batch_size: int = 64,
                     lr: float = 3e-3) -> DigitsClassifier:
    """A DigitsClassifier trained on the digits train split; deterministic for a given seed on one thread."""
    from varq.data.digits import load_digits_split

    images_N3HW, labels_N = load_digits_split("train")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # parameter init draws from the global generator
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(images_N3HW) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(images_N3HW), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x_B3HW = random_shift(images_N3HW[idx], MAX_SHIFT_PX, generator)
            loss = F.cross_entropy(model(x_B3HW), labels_N[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval().requires_grad_(False)


def build_digits_classifier_asset(assets_dir: str | os.PathLike[str] | None = None, seed: int = 0,
                                  epochs: int = DEFAULT_EPOCHS) -> tuple[Path, float]:
    """Train, check held-out accuracy, save the asset; returns (asset path, test accuracy). `make assets` calls this."""
    from varq.data.digits import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, load_digits_split
    from varq.models.assets import save_asset

    model = train_classifier(seed=seed, epochs=epochs)
    test_acc = accuracy(model, *load_digits_split("test"))
    if test_acc < MIN_TEST_ACCURACY:
        # Refuse to ship a weak extractor: IS/FID of the embedded default would quietly lose their meaning.
        raise RuntimeError(f"digits classifier reached only {test_acc:.4f} on the test split "
                           f"(< {MIN_TEST_ACCURACY}); not saving it")
    meta = {
        "arch": "DigitsClassifier",
        "feature_dim": FEATURE_DIM,
        "seed": seed,
        "epochs": epochs,
        "test_accuracy": round(test_acc, 6),
        "split": f"sklearn digits, train_test_split(test_size={DIGITS_TEST_FRACTION}, "
                 f"random_state={DIGITS_SPLIT_SEED}, stratify=labels)",
    }
    path = save_asset(DIGITS_CLASSIFIER_ASSET, model.state_dict(), meta, assets_dir)
    return path, test_acc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--assets-dir", default=None, help="default: the package's varq/assets/")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path, test_acc = build_digits_classifier_asset(args.assets_dir, seed=args.seed, epochs=args.epochs)
    print(f"digits classifier: test accuracy {test_acc:.4f}, {time.perf_counter() - start:.1f} s, "
          f"{path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
