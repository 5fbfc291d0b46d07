"""Each family's preprocess_input as backend ops on uint8 batches, so it runs inside the compiled model call.

Keras' ``preprocess_input`` functions work on host float32 arrays: extract used to cast every
batch to float32 on the host (4x the bytes of uint8) and send that to the device. Here the same
arithmetic is written with ``keras.ops`` so the model function can take the decoded uint8 batch
and do the cast and the normalisation on the device. ``tests/test_forward.py`` checks
every family against Keras' own numpy ``preprocess_input`` on the same pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# keras/src/applications/imagenet_utils.py: the three modes, and the families that use each. The
# mobilenet_v3, efficientnet(_v2) and convnext models hold their preprocessing as layers
# (include_preprocessing / Rescaling+Normalization), so their preprocess_input is the identity.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
MODES: dict[str, str] = {
    "vgg16": "caffe",
    "vgg19": "caffe",
    "resnet": "caffe",
    "resnet_v2": "tf",
    "inception_v3": "tf",
    "inception_resnet_v2": "tf",
    "xception": "tf",
    "mobilenet": "tf",
    "mobilenet_v2": "tf",
    "nasnet": "tf",
    "densenet": "torch",
    "mobilenet_v3": "none",
    "efficientnet": "none",
    "efficientnet_v2": "none",
    "convnext": "none",
    "efficientnet_lite": "lite",  # (x - 127) / 128, what the Lite weights were trained with
    # keras-hub presets (imgfeat.backbones.hub): the converter's scale and offset are in the model
    "dinov2": "none",
    "clip": "none",
    "siglip": "none",
}


def mode_of(family: str) -> str:
    """The preprocessing mode of a backbone family; KeyError names a family missing from MODES."""
    try:
        return MODES[family]
    except KeyError:
        raise KeyError(
            f"no on-device preprocessing is known for backbone family {family!r}; "
            f"add it to imgfeat.backbones.preprocess.MODES"
        ) from None


def ops_preprocess(family: str) -> Callable[[Any], Any]:
    """(B, H, W, 3) uint8 RGB tensor -> float32 tensor, equal to the family's ``preprocess_input``."""
    mode = mode_of(family)

    def preprocess(x: Any) -> Any:
        from keras import ops

        x = ops.cast(x, "float32")
        if mode == "tf":
            return x / 127.5 - 1.0
        if mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR, "float32")
        if mode == "torch":
            mean = ops.convert_to_tensor(TORCH_MEAN, "float32")
            std = ops.convert_to_tensor(TORCH_STD, "float32")
            return (x / 255.0 - mean) / std
        if mode == "lite":
            return (x - 127.0) / 128.0
        return x

    return preprocess
