"""keras-hub backbones: features equal keras-hub's own path, presets pinned by content, cached names offline."""

from __future__ import annotations

import json
import shutil

import hub_presets as H
import numpy as np
import pytest
from PIL import Image

from imgfeat import api
from imgfeat.backbones import build_model
from imgfeat.core.errors import ConfigError
from imgfeat.core.hashing import content_id
from imgfeat.core.workspace import Workspace
from imgfeat.tools.samples import load_photo

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4  # float32 on CPU, max abs, at the preset's own input size
MIN_COSINE = 0.999  # other sizes: our Pillow resize against keras-hub's converter on the same pixels
KINDS = {
    "dinov2": (H.dinov2_preset, H.DINO_SIZE),
    "clip": (H.clip_preset, H.CLIP_SIZE),
    "siglip2": (H.siglip2_preset, H.SIGLIP_SIZE),
    # a converter that resizes without antialiasing (keras' default): decode follows it
    "clip_aliasing": (lambda folder: H.clip_preset(folder, antialias=False), H.CLIP_SIZE),
}


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("presets")
    return {kind: make(folder / kind) for kind, (make, _) in KINDS.items()}


@pytest.fixture(scope="module")
def mws(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubws")
    return Workspace(root)


def smooth_image(size: tuple[int, int], seed: int) -> Image.Image:
    """Gradients and a little noise: structure a random network's features tell apart."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    phase = rng.uniform(0, 6.28, 3)
    a = np.stack(
        [
            127 + 120 * np.sin(xx / w * 6 + phase[0]),
            127 + 120 * np.cos(yy / h * 5 + phase[1]),
            127 + 120 * np.sin((xx + yy) / (w + h) * 7 + phase[2]),
        ],
        -1,
    )
    a += rng.normal(0, 8, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def image_folder(tmp_path, size: int) -> list[Image.Image]:
    """Four images at the preset's exact size; one as high and 7 px wider (a centre crop keeps
    exactly size x size: no resize, so the crop box itself is checked to 1e-4); then photos of
    other sizes and aspect ratios."""
    images = [smooth_image((size, size), k) for k in range(4)] + [smooth_image((size + 7, size), 5)]
    images += [
        load_photo("chelsea"),
        load_photo("rocket").resize((3 * size + 5, 2 * size)),
        smooth_image((size + 13, 2 * size + 3), 7),
    ]
    for i, im in enumerate(images):
        im.convert("RGB").save(tmp_path / f"im{i}.png")
    return [im.convert("RGB") for im in images]


def extracted(ws, tmp_path, dataset, backbone, images):
    """(featureset, X in the order of ``images``) after scan + extract of tmp_path."""
    api.scan(tmp_path, dataset, workspace=ws)
    result = api.extract(dataset, backbone, workspace=ws, dtype="float32", batch_size=4)
    ids, X = result.open().to_numpy()
    pos = {k: i for i, k in enumerate(ids)}
    order = [pos[content_id((tmp_path / f"im{i}.png").read_bytes())] for i in range(len(images))]
    return result.featureset, X[order]


@pytest.mark.quick
@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_resize_without_antialias_follows_keras(method):
    """Shrinking 9x and enlarging: extract/resample.py against keras.ops.image.resize(antialias=False)."""
    import keras

    from imgfeat.extract.resample import resize_no_antialias

    rng = np.random.default_rng(0)
    for shape, size in (((300, 451, 3), (32, 32)), ((20, 30, 3), (56, 56)), ((37, 41, 3), (32, 28))):
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        want = np.asarray(
            keras.ops.image.resize(img[None].astype("float32"), size, interpolation=method, antialias=False)
        )[0]
        got = resize_no_antialias(img, size, method)
        assert got.dtype == np.uint8 and np.abs(got - np.clip(want, 0, 255)).max() <= 0.51


@pytest.mark.parametrize("kind", list(KINDS))
def test_features_equal_keras_hub(kind, presets, ws, tmp_path):
    images = image_folder(tmp_path, KINDS[kind][1])
    fs, X = extracted(ws, tmp_path, "d", str(presets[kind]), images)
    want = H.reference_features(presets[kind], images)
    assert X.shape == want.shape and np.abs(want).max() > 0.1  # features carry signal
    assert np.abs(X[:4] - X[:4].mean(axis=0)).max() > 1e-3  # and tell the images apart
    exact = 5 if kind != "siglip2" else 4  # SigLIP squashes the wide image: a resize
    assert np.abs(X[:exact] - want[:exact]).max() < TOLERANCE
    cos = (X[exact:] * want[exact:]).sum(1) / np.linalg.norm(X[exact:], axis=1) / np.linalg.norm(want[exact:], axis=1)
    assert cos.min() >= MIN_COSINE, cos
    family = {"dinov2": "cls", "clip": "proj", "siglip2": "pool", "clip_aliasing": "proj"}[kind]
    assert fs.startswith(f"preset_{kind}-{KINDS[kind][1]}-{family}-float32-")


def test_recipe_pins_the_preset_content(presets, ws, tmp_path, tmp_path_factory):
    """Same content elsewhere: same featureset; re-saved with other weights: another featureset."""
    images = image_folder(tmp_path, H.CLIP_SIZE)
    fs, X = extracted(ws, tmp_path, "d", str(presets["clip"]), images)
    moved = tmp_path_factory.mktemp("elsewhere") / "clip"
    shutil.copytree(presets["clip"], moved)
    assert extracted(ws, tmp_path, "d", str(moved), images)[0] == fs
    other = H.clip_preset(tmp_path_factory.mktemp("resaved") / "clip", seed=1)
    fs2, X2 = extracted(ws, tmp_path, "d", str(other), images)
    assert fs2 != fs and np.abs(X2 - X).max() > 1e-3
    # a directory's featureset extends from its provenance (predict IMAGE): the folder by its path
    from imgfeat.extract.extract import extract_files

    extra = tmp_path_factory.mktemp("extra") / "x.png"
    smooth_image((50, 40), 12).save(extra)
    assert extract_files(ws, fs2, [extra], "r1")[0].error_code is None


def test_dinov2_input_size_override(presets, ws, tmp_path):
    """--input-size rebuilds DINOv2 at another size (position embeddings interpolated), recorded in the name."""
    images = image_folder(tmp_path, H.DINO_SIZE)
    api.scan(tmp_path, "d", workspace=ws)
    result = api.extract("d", str(presets["dinov2"]), workspace=ws, dtype="float32", input_size=28)
    assert result.featureset.startswith("preset_dinov2-28-cls-")
    assert result.open().to_numpy()[1].shape == (len(images), 32)
    with pytest.raises(ConfigError, match="multiple of its patch size 14"):
        api.extract("d", str(presets["dinov2"]), workspace=ws, input_size=30)
    with pytest.raises(ConfigError, match="built for 32 px only"):
        api.extract("d", str(presets["clip"]), workspace=ws, input_size=64)


def cli(argv: list[str], capsys) -> tuple[int, dict, str]:
    from imgfeat.cli.main import main

    code = main([*argv, "--json"])
    out = capsys.readouterr()
    return code, json.loads(out.out.strip().splitlines()[-1]), out.err


def test_cached_preset_name_works_offline(presets, ws, tmp_path, tmp_path_factory, monkeypatch, capsys):
    """A name resolves to its folder in the kagglehub cache (staged with weights import), no network;
    its features are the directory's; a name not cached is one line saying how to stage it."""
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path_factory.mktemp("kagglehub")))
    name = "dinov2_with_registers_small"
    images = image_folder(tmp_path, H.DINO_SIZE)
    api.scan(tmp_path, "d", workspace=ws)
    code, out, err = cli(["extract", "--dataset", "d", "--backbone", name], capsys)
    assert code == 2 and f"keras-hub preset {name} is not cached" in err and len(err.splitlines()) == 1
    assert "imgfeat weights import DIR --backbone" in err and not list(ws.root.rglob("*dinov2*"))
    code, out, _ = cli(["weights", "import", str(presets["dinov2"]), "--backbone", name], capsys)
    assert code == 0 and out["path"].endswith("models/keras/dinov2/keras/dinov2_with_registers_small/1")
    fs, X = extracted(ws, tmp_path, "d", name, images)
    assert fs.startswith(f"{name}-{H.DINO_SIZE}-cls-float32-")
    assert np.abs(X[:4] - H.reference_features(presets["dinov2"], images[:4])).max() < TOLERANCE
    code, out, _ = cli(["backbones"], capsys)
    listed = {r["name"]: r for r in out["backbones"]}
    assert listed[name]["family"] == "dinov2" and listed[name]["dim"] == 32 and listed[name]["cached"]
    assert set(out["hub_families"]) == {"dinov2", "clip", "siglip"}
    code, out, _ = cli(["backbones", "--hub"], capsys)
    listed = {r["name"]: r["cached"] for r in out["presets"]}
    assert listed[name] is True and listed["clip_vit_base_patch32"] is False
    # the featureset extends from its provenance (predict IMAGE path): the name resolves again
    from imgfeat.extract.extract import extract_files

    extra = tmp_path / "extra.png"
    smooth_image((70, 60), 11).save(extra)
    assert extract_files(ws, fs, [extra], "r1")[0].error_code is None


@pytest.mark.quick
def test_backbone_listing_and_unknown_names_import_no_keras_hub():
    import subprocess
    import sys

    code = (
        "import sys; from imgfeat.cli.backbones import backbone_rows, hub_backbone_rows; "
        "from imgfeat.backbones import get_backbone; backbone_rows(); hub_backbone_rows(); "
        "get_backbone('resnet50'); print('keras_hub' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def reference_text(preset, texts):
    """keras-hub's own text embeddings: the preset's tokenizer in its preprocessor, the text tower."""
    from keras_hub.models import Backbone, CLIPPreprocessor, SigLIPPreprocessor
    from keras_hub.tokenizers import Tokenizer

    backbone = Backbone.from_preset(str(preset))
    cls = CLIPPreprocessor if type(backbone).__name__ == "CLIPBackbone" else SigLIPPreprocessor
    token_ids = cls(tokenizer=Tokenizer.from_preset(str(preset)))({"prompts": texts, "images": None})["token_ids"]
    return np.asarray(backbone.get_text_embeddings(token_ids), dtype=np.float32)


def unit(X):
    return X / np.linalg.norm(X, axis=-1, keepdims=True)


@pytest.mark.parametrize("kind", ["clip", "siglip2"])
def test_text_search_matches_keras_hub_cosines(kind, presets, ws, tmp_path, capsys):
    size = KINDS[kind][1]
    images = [smooth_image((size, size), k) for k in range(6)]
    for i, im in enumerate(images):
        im.save(tmp_path / f"im{i}.png")
    fs, _ = extracted(ws, tmp_path, "d", str(presets[kind]), images)
    code, out, _ = cli(["index", "--featureset", fs, "--name", "idx", "--kind", "flat"], capsys)
    assert code == 0
    texts = ["a photo of a red car", "A photo of a Dog!"]
    code, out, _ = cli(["similar", "--index", "idx", "--text", texts[0], "--text", texts[1], "--top", "6"], capsys)
    assert code == 0
    want = unit(reference_text(presets[kind], texts)) @ unit(H.reference_features(presets[kind], images)).T
    ids = [content_id((tmp_path / f"im{i}.png").read_bytes()) for i in range(len(images))]
    for q, result in enumerate(out["results"]):
        got = [(ids.index(n["image_id"]), n["similarity"]) for n in result["neighbours"]]
        assert [i for i, _ in got] == list(np.argsort(-want[q], kind="stable"))
        assert np.abs(np.array([s for _, s in got]) - want[q][[i for i, _ in got]]).max() < TOLERANCE
        assert result["neighbours"][0]["path"].endswith(".png")
    assert np.ptp(want) > 1e-3  # the texts rank the images differently: the order is a real check
    # the same from the Python API
    from imgfeat.index import Index

    api_result = Index.open(ws, "idx").search_text(texts[:1], 3)[0]
    assert [n.image_id for n in api_result.neighbours] == [n["image_id"] for n in out["results"][0]["neighbours"][:3]]


def test_text_search_without_a_text_tower_is_one_line(presets, ws, tmp_path, capsys):
    images = image_folder(tmp_path, H.DINO_SIZE)
    fs, _ = extracted(ws, tmp_path, "d", str(presets["dinov2"]), images)
    assert cli(["index", "--featureset", fs, "--name", "dino", "--kind", "flat"], capsys)[0] == 0
    code, _out, err = cli(["similar", "--index", "dino", "--text", "a red car", "--top", "3"], capsys)
    assert code == 2 and "has no text tower" in err and len(err.strip().splitlines()) == 1


def test_zero_shot_head_trains_predicts_and_reports(presets, ws, tmp_path, capsys):
    """Prompts through the text tower, no fitting; predictions are keras-hub's nearest prompt;
    saved as plain arrays, loaded back, predicted and reported like any head."""
    import pyarrow.parquet as pq

    from imgfeat.heads.artifacts import load_head

    classes = ["car", "dog", "red_circle"]
    root = tmp_path / "photos"
    files = []
    for c, label in enumerate(classes):
        (root / label).mkdir(parents=True)
        for k in range(5):
            smooth_image((H.CLIP_SIZE, H.CLIP_SIZE), 10 * c + k).save(root / label / f"{k}.png")
            files.append(root / label / f"{k}.png")
    api.scan(root, "pets", workspace=ws)
    fs = api.extract("pets", str(presets["clip"]), workspace=ws, dtype="float32").featureset
    code, out, _ = cli(["train", "--dataset", "pets", "--featureset", fs, "--head", "zero-shot"], capsys)
    assert code == 0 and out["model_kind"] == "zero-shot" and out["metrics"]["test_accuracy"] is not None
    head = load_head(ws, out["head_id"])
    assert (ws.head_dir(out["head_id"]) / "model.npz").is_file() and head.meta["model_format"] == "npz"
    prompts = reference_text(presets["clip"], [f"a photo of a {c.replace('_', ' ')}" for c in classes])
    images = [Image.open(f).convert("RGB") for f in files]
    cos = unit(H.reference_features(presets["clip"], images)) @ unit(prompts).T
    want = np.asarray(classes)[np.argmax(cos, 1)]
    proba = np.exp(100 * (cos - cos.max(1, keepdims=True)))
    proba /= proba.sum(1, keepdims=True)
    assert np.ptp(cos) > 1e-3  # the cosines differ, so the scores below are a real check
    code, pred, _ = cli(["predict", "--head", out["head_id"], "--dataset", "pets"], capsys)
    assert code == 0
    table = pq.read_table(pred["shards"][0]).to_pydict()
    by_id = dict(zip(table["image_id"], zip(table["pred_label"], table["pred_score"])))
    got = [by_id[content_id(f.read_bytes())] for f in files]
    assert [label for label, _ in got] == want.tolist()
    assert np.abs(np.array([score for _, score in got]) - proba.max(1)).max() < 1e-3
    code, _rep, _ = cli(["report", "--head", out["head_id"]], capsys)
    assert code == 0
    # another prompt is another head
    code, other, _ = cli(
        ["train", "--dataset", "pets", "--featureset", fs, "--head", "zero-shot", "--prompt", "{label}"], capsys
    )
    assert code == 0 and other["head_id"] != out["head_id"]
    code, _, err = cli(
        ["train", "--dataset", "pets", "--featureset", fs, "--head", "zero-shot", "--prompt", "no label"], capsys
    )
    assert code == 2 and "must hold '{label}'" in err


def test_without_keras_hub_a_hub_backbone_names_the_extra(presets, monkeypatch):
    import sys

    from imgfeat.backbones import get_backbone

    monkeypatch.setitem(sys.modules, "keras_hub", None)  # import keras_hub now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'imgfeat\[hub\]'"):
        get_backbone("dinov2_small")
    with pytest.raises(ConfigError, match=r"pip install 'imgfeat\[hub\]'"):
        build_model(get_backbone(str(presets["clip"])))


def test_bench_times_a_hub_backbone(presets, tmp_path, capsys):
    """The same compiled uint8 path as the CNNs: bench's forward and extract processes run a preset."""
    from tiny_images import write_noise_images

    write_noise_images(tmp_path / "imgs", 6, size=(40, 30), classes=("b", "a"))
    code, out, _ = cli(
        [
            "bench",
            "--workspace",
            str(tmp_path / "ws"),
            "--backbone",
            str(presets["dinov2"]),
            "--images",
            str(tmp_path / "imgs"),
            "--batch-size",
            "4",
            "--skip",
            "input",
        ],
        capsys,
    )
    assert code == 0 and set(out["images_per_s"]) == {"forward", "extract"}
    assert out["extract_inner"]["extracted"] == 6
    assert out["extract_inner"]["featureset"].startswith("preset_dinov2-56-cls-")


def test_hub_backbones_refuse_what_they_cannot_do(presets, ws, tmp_path, capsys):
    """Layer taps, fine-tuning, other weights files: one clear line each, nothing written."""
    assert cli(["backbones", "--layers", str(presets["dinov2"])], capsys)[0] == 2
    write = tmp_path / "im"
    write.mkdir()
    smooth_image((40, 30), 0).save(write / "a.png")
    api.scan(write, "d", workspace=ws)
    with pytest.raises(ConfigError, match="--layer does not apply"):
        api.extract("d", str(presets["clip"]), workspace=ws, layer="x")
    with pytest.raises(ConfigError, match="save a preset"):
        api.extract("d", str(presets["clip"]), workspace=ws, weights=str(presets["clip"] / "model.weights.h5"))
    with pytest.raises(ConfigError, match="keras-hub preset"):
        from imgfeat.finetune.train import FinetuneConfig, run_finetune

        run_finetune(ws, FinetuneConfig(dataset="d", backbone=str(presets["dinov2"])), "r")


def test_random_init_is_named_by_the_architecture(presets, ws, tmp_path, tmp_path_factory):
    """--weights none builds the preset's architecture at random (seeded): another architecture in a
    folder of the same name, or another seed, is another featureset."""
    image_folder(tmp_path, H.DINO_SIZE)
    api.scan(tmp_path, "d", workspace=ws)
    fs = api.extract("d", str(presets["dinov2"]), workspace=ws, weights="none").featureset
    other = H.dinov2_preset(tmp_path_factory.mktemp("other") / "dinov2", registers=0)
    assert api.extract("d", str(other), workspace=ws, weights="none").featureset != fs
    assert api.extract("d", str(presets["dinov2"]), workspace=ws, weights="none", seed=1).featureset != fs
    assert api.extract("d", str(presets["dinov2"]), workspace=ws, weights="none").featureset == fs


def test_job_file_runs_a_hub_backbone_and_a_zero_shot_head(presets, ws, tmp_path, capsys):
    root = tmp_path / "photos"
    for c, label in enumerate(["car", "dog"]):
        (root / label).mkdir(parents=True)
        for k in range(4):
            smooth_image((H.SIGLIP_SIZE, H.SIGLIP_SIZE), 10 * c + k).save(root / label / f"{k}.png")
    job = tmp_path / "job.toml"
    job.write_text(f"""
[datasets.pets]
root = "{root}"

[features.sig]
backbone = "{presets["siglip2"]}"
dtype = "float32"

[heads.pets-zs]
dataset = "pets"
features = "sig"
head = "zero-shot"
prompt = "{{label}}"

[indexes.pets]
features = "sig"
""")
    code, out, err = cli(["run", str(job)], capsys)
    assert code == 0, err
    from imgfeat.heads.artifacts import load_head
    from imgfeat.heads.versions import resolve_head

    head = load_head(ws, resolve_head(ws, "pets-zs"))
    assert head.meta["model_kind"] == "zero-shot" and head.meta["params"]["prompt"] == "{label}"
    code, out, _ = cli(["similar", "--index", "pets", "--text", "car", "--top", "3"], capsys)
    assert code == 0 and len(out["results"][0]["neighbours"]) == 3
