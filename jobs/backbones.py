"""`imgfeat backbones`: the registered backbones, their sizes and dims, and whether weights are cached."""

from __future__ import annotations

import argparse
from typing import Any

from imgfeat.backbones import build_model, get_backbone, list_backbones
from imgfeat.backbones.hub import FAMILY_NOTES, HubSpec, cached_hub_rows, cached_presets, kagglehub_cache
from imgfeat.backbones.weights import is_cached
from imgfeat.cli.common import JobContext, Summary, add_command
from imgfeat.core.errors import ConfigError, unknown_value
from imgfeat.finetune.blocks import backbone_blocks, family_pattern

DESCRIPTION = """\
List every registered backbone: its family, default input size, pooled feature dim,
whether the ImageNet classifier can be applied to its pooled features, the size of its
ImageNet weights file, and whether those weights are available offline (cached under
$KERAS_HOME/models, or shipped by a pip package). Listing imports no TensorFlow.

--layers NAME prints the layer names of one backbone, to pick an --layer for extract
(builds the model with random weights; takes a few seconds).

keras-hub presets (DINOv2, CLIP, SigLIP/SigLIP2; pip install 'imgfeat[hub]') are backbones too:
pass a preset name (e.g. dinov2_with_registers_small, clip_vit_base_patch32,
siglip2_base_patch16_224) or a preset directory as --backbone. Names load offline from the
kagglehub cache ($KAGGLEHUB_CACHE, default ~/.cache/kagglehub); the cached ones are listed here.
--hub lists every keras-hub preset name of those families and whether it is cached (imports keras-hub).

--blocks NAME prints the blocks of one backbone, top last, with the layer each starts at:
'imgfeat finetune --unfreeze-blocks N' trains the last N of them (and the layers after them).
"""

EPILOG = """\
examples:
  imgfeat backbones
  imgfeat backbones --family efficientnet
  imgfeat backbones --json | tail -1 | jq '.backbones[] | select(.cached) | .name'
  imgfeat backbones --layers resnet50
  imgfeat backbones --blocks efficientnet_lite0
  imgfeat backbones --hub
"""

COLUMNS = (
    ("name", "name"),
    ("family", "family"),
    ("size", "input_size"),
    ("dim", "dim"),
    ("imagenet top", "imagenet_top"),
    ("weights MB", "weights_mb"),
    ("cached", "cached"),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "backbones",
        handle,
        help="list backbones, feature dims, cached weights",
        description=DESCRIPTION,
        epilog=EPILOG,
        record_run=False,
    )
    p.add_argument("--family", default=None, metavar="F", help="only this family (e.g. resnet, efficientnet)")
    p.add_argument("--layers", default=None, metavar="NAME", help="print the layer names of backbone NAME")
    p.add_argument(
        "--hub", action="store_true", help="list keras-hub's DINOv2, CLIP and SigLIP preset names and which are cached"
    )
    p.add_argument(
        "--blocks",
        default=None,
        metavar="NAME",
        help="print the blocks of backbone NAME (for finetune --unfreeze-blocks)",
    )


def backbone_rows(family: str | None = None) -> list[dict[str, Any]]:
    """One plain dict per backbone, as --json shows it."""
    specs = list_backbones()
    if family is not None and family not in {s.family for s in specs} | set(FAMILY_NOTES):
        raise unknown_value("backbone family", family, {s.family for s in specs} | set(FAMILY_NOTES))
    return [
        {
            "name": s.name,
            "family": s.family,
            "input_size": s.input_size,
            "dim": s.dims["avg"],
            "dims": dict(s.dims),
            "imagenet_top": s.imagenet_top,
            "weights_mb": s.weights_mb,
            "min_size": s.min_size,
            "cached": is_cached(s),
        }
        for s in specs
        if family in (None, s.family)
    ]


def layer_rows(name: str) -> list[dict[str, Any]]:
    """Layer name, type and output shape of a backbone built with random weights at its default size."""
    spec = get_backbone(name)
    if isinstance(spec, HubSpec) and spec.preset_dir:
        raise ConfigError(
            f"{name} is a keras-hub preset: its feature is the {spec.family} {spec.embedding} "
            f"embedding, with no --layer taps"
        )
    model = spec.constructor_fn()(include_top=False, weights=None, input_shape=(spec.input_size, spec.input_size, 3))
    return [
        {"layer": lyr.name, "type": type(lyr).__name__, "output_shape": list(lyr.output.shape[1:])}
        for lyr in model.layers
    ]


def block_rows(name: str) -> list[dict[str, Any]]:
    """The backbone's blocks, top last: name, first layer, layer count, and N to unfreeze from it."""
    spec = get_backbone(name)
    family_pattern(spec)  # a family without named blocks says so before building anything
    model = build_model(spec, weights="none", input_size=spec.min_size)
    blocks = backbone_blocks(model, spec)
    return [
        {**b.to_json(), "first_layer": model.layers[b.start].name, "unfreeze_blocks": len(blocks) - i}
        for i, b in enumerate(blocks)
    ]


def format_table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> str:
    def cell(v: Any) -> str:
        return "yes" if v is True else "no" if v is False else str(v)

    cells = [[title for title, _ in columns]] + [[cell(r[key]) for _, key in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def handle(args: argparse.Namespace, ctx: JobContext) -> Summary:
    if args.hub:
        rows = cached_presets()
        if not args.json:
            print(format_table(rows, (("preset", "name"), ("cached", "cached"), ("path", "path"))))
            print(f"\n{sum(r['cached'] for r in rows)} of {len(rows)} cached in {kagglehub_cache()}")
        return {"cache": str(kagglehub_cache()), "presets": list(rows)}
    if args.blocks:
        rows = block_rows(args.blocks)
        if not args.json:
            print(
                format_table(
                    rows,
                    (
                        ("block", "block"),
                        ("first layer", "first_layer"),
                        ("layers", "layers"),
                        ("--unfreeze-blocks", "unfreeze_blocks"),
                    ),
                )
            )
        return {"backbone": args.blocks, "blocks": rows}
    if args.layers:
        rows = layer_rows(args.layers)
        if not args.json:
            print(format_table(rows, (("layer", "layer"), ("type", "type"), ("output", "output_shape"))))
        return {"backbone": args.layers, "layers": rows}
    rows = backbone_rows(args.family)
    hub_rows = hub_backbone_rows(args.family)
    if not args.json:
        print(format_table(rows + hub_rows, COLUMNS))
        cached = sum(r["cached"] for r in rows)
        print(
            f"\n{len(rows)} backbones, {cached} with ImageNet weights available offline "
            f"(imgfeat weights list shows the files)"
        )
        print(hub_note(hub_rows))
    return {"count": len(rows) + len(hub_rows), "backbones": [*rows, *hub_rows], "hub_families": dict(hub_families())}


def hub_families() -> dict[str, str]:
    return dict(FAMILY_NOTES)


def hub_backbone_rows(family: str | None = None) -> list[dict[str, Any]]:
    """keras-hub presets in the local kagglehub cache (no keras-hub import)."""
    return [r for r in cached_hub_rows() if family in (None, r["family"])]


def hub_note(hub_rows: list[dict[str, Any]]) -> str:
    families = "".join(f"\n  {k:<8} {v}" for k, v in hub_families().items())
    return (
        f"keras-hub families (any preset name or preset directory works as --backbone):{families}\n"
        f"{len(hub_rows)} preset(s) cached in {kagglehub_cache()}"
    )
