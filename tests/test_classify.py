"""`imgfeat classify`: real shipped photos get the right ImageNet classes, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgfeat.cli.main import main
from imgfeat.core.errors import ConfigError
from imgfeat.tools.classify import ClassifyConfig, format_result
from imgfeat.tools.imagenet import decode_predictions, format_topk, imagenet_classes
from imgfeat.tools.samples import photo_path

ROOT = Path(__file__).resolve().parent.parent
CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"}


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cli_subprocess_cat_and_espresso_and_a_bad_file(keras_home, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture")
    env = {**os.environ, "KERAS_HOME": str(keras_home), "IMGFEAT_WORKSPACE": str(tmp_path / "ws")}
    cmd = [
        sys.executable,
        "-m",
        "imgfeat",
        "classify",
        str(photo_path("chelsea")),
        str(photo_path("coffee")),
        str(bad),
        "--top",
        "3",
        "--json",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # a bad image is a row, not a failed run
    summary = _last_json(proc.stdout)
    cat, coffee, broken = summary["results"]
    assert cat["labels"][0] in CAT_CLASSES and cat["wnids"][0].startswith("n02")
    assert coffee["labels"][0] == "espresso" and coffee["wnids"][0] == "n07920052"
    assert all(len(r["labels"]) == len(r["scores"]) == len(r["wnids"]) == 3 for r in (cat, coffee))
    assert cat["scores"] == sorted(cat["scores"], reverse=True) and sum(cat["scores"]) <= 1.0 + 1e-6
    assert broken["error_code"] == "not_an_image" and broken["labels"] == []
    assert (summary["images"], summary["classified"], summary["errors"]) == (3, 2, 1)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{photo_path('chelsea')}: {cat['labels'][0]} (") and "%)" in lines[0]
    assert lines[2].startswith(f"{bad}: cannot classify (not_an_image)")
    assert not (tmp_path / "ws").exists(), "classify must not write into the workspace"


def test_temple_and_flower_photos_get_plausible_classes(keras_home, capsys):
    code = main(["classify", str(photo_path("china")), str(photo_path("flower")), "--json"])
    assert code == 0
    temple, flower = _last_json(capsys.readouterr().out)["results"]
    # Checked by eye on these photos: a Chinese temple by a lake, a pink flower with a bee-like centre.
    assert {"bell cote", "palace", "monastery", "church", "boathouse", "dome", "pagoda"} & set(temple["labels"])
    assert {"daisy", "bee", "pot", "cardoon", "hip", "yellow lady's slipper"} & set(flower["labels"])


def test_backbone_without_an_available_top_names_those_that_work(keras_home, capsys):
    # Offline, a Keras family's ImageNet file is not in this fresh cache: a usage error (exit 2)
    code = main(["classify", str(photo_path("chelsea")), "--backbone", "mobilenet_v2", "--json"])
    out = _last_json(capsys.readouterr().out)
    assert code == 2 and "efficientnet_lite0" in out["error"] and "mobilenet_v2" in out["error"]


def test_unknown_backbone_and_bad_top_are_usage_errors(keras_home):
    from imgfeat.cli.common import EXIT_USAGE

    assert main(["classify", str(photo_path("chelsea")), "--backbone", "efficientnet_lite9"]) == EXIT_USAGE
    with pytest.raises(ConfigError, match="--top"):
        ClassifyConfig(paths=("a.jpg",), top=0)


def test_classify_sees_what_extract_sees(keras_home):
    """classify's probabilities are extract's model function over extract's decoded, padded batch."""
    from imgfeat.core.hashing import content_id
    from imgfeat.extract.batches import InputSpec, Item, make_batch
    from imgfeat.extract.decode import DecodeConfig
    from imgfeat.extract.forward import Forward
    from imgfeat.tools.classify import build_classifier, classify_images, input_hw

    paths = [photo_path("chelsea"), photo_path("coffee"), photo_path("china")]
    results = classify_images(ClassifyConfig(tuple(map(str, paths)), top=1000, batch_size=2))
    spec, model = build_classifier("efficientnet_lite0", "imagenet")
    inputs = InputSpec(DecodeConfig(size=input_hw(spec), interpolation="bilinear", exif="rotate"), batch_size=2)
    forward = Forward(model, spec.family, inputs.batch_shape)
    items = [Item(content_id(Path(p).read_bytes()), str(p)) for p in paths]
    probs = np.concatenate([forward(make_batch(items[i : i + 2], inputs, "r").raw) for i in (0, 2)])[:3]
    assert probs.max(axis=1).min() > 0.2, "pretrained weights must give confident classes (random: ~0.001)"
    wnids = imagenet_classes().wnids
    for result, p in zip(results, probs):
        assert result.labels[0] == imagenet_classes().names[int(np.argmax(p))]
        got = dict(zip(result.wnids, result.scores))
        assert [got[w] for w in wnids] == [round(float(v), 6) for v in p]


@pytest.mark.quick
def test_decoding_and_the_line_a_person_reads():
    classes = imagenet_classes()
    tabby, tiger = classes.names.index("tabby"), classes.names.index("tiger cat")
    probs = np.full((1, 1000), 0.188 / 998)
    probs[0, tabby], probs[0, tiger] = 0.612, 0.201
    (top,) = decode_predictions(probs, top=3)
    assert top.labels[:2] == ["tabby", "tiger cat"] and top.wnids[:2] == ["n02123045", "n02123159"]
    assert format_topk(top).startswith("tabby (61.2%), tiger cat (20.1%), ")
    row = {"path": "chelsea.png", "labels": top.labels[:2], "scores": top.scores[:2]}
    assert format_result(row) == "chelsea.png: tabby (61.2%), tiger cat (20.1%)"


@pytest.mark.quick
def test_class_table_is_the_imagenet_1k_order():
    classes = imagenet_classes()
    assert len(classes.wnids) == len(set(classes.wnids)) == 1000
    assert list(classes.wnids) == sorted(classes.wnids)  # Keras, timm and the Lite weights: sorted wnids
    assert classes.wnids[0] == "n01440764" and classes.names[0] == "tench"
    assert all(classes.names)


def test_listing_of_usable_backbones_follows_installed_weight_packages(monkeypatch, keras_home):
    import dataclasses

    from imgfeat.backbones import lite
    from imgfeat.tools.classify import classifier_backbones

    absent = dataclasses.replace(lite.VARIANTS["efficientnet_lite1"], module="imgfeat_no_such_weights_pkg")
    monkeypatch.setitem(lite.VARIANTS, "efficientnet_lite1", absent)
    usable = classifier_backbones()
    assert "efficientnet_lite0" in usable and "efficientnet_lite1" not in usable
    assert "mobilenet_v2" not in usable  # its with-top file is not in this empty Keras cache
