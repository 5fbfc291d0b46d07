#!/usr/bin/env bash
# Issue 12's GPU-host checks in one prepared run: extract at accelerator speed, CPU decode and GPU decode.
#
# For a GPU host with JAX (CUDA) and no TensorFlow and no network. Before the run, on a machine with
# the registry, download into an ignored folder of the checkout (.whl/, listed in .git/info/exclude)
# the wheels that host lacks for Python 3.12: keras, namex, optree, nvidia-nvimgcodec-cu13,
# nvidia-nvjpeg (and, for the keras-hub cases, keras-hub, kagglehub, kagglesdk; the H200 host has
# the rest: absl-py, rich, regex, packaging, ml-dtypes, h5py). Images: $IMAGES if it exists, else N
# JPEGs of 500x375 made below from crops of the photos scikit-image and scikit-learn ship
# (imgfeat.tools.samples). Then, on the host:
#
#   OUT=/tmp/out bash benchmarks/gpu_host.sh          # N=40000 images of 500x375 by default
#
# Writes under $OUT: gpu_decode.json (decode + resize alone on the first DIAG_N=5000 files, where each
# file went, each phase's seconds, JAX's compiles, warm passes with one thing changed, fidelity to the
# CPU path per image), bench_cpu_decode.json, bench_gpu_decode.json
# (imgfeat bench --json: input, forward and extract img/s and end_to_end_over_limit). Targets
# (issue 12): resnet50 bf16 batch 256 on 40,000 500x375 JPEGs, extract >= 3,300 img/s with CPU
# decode and >= 10,000 img/s with --decode gpu, end_to_end_over_limit >= 0.85 for both, GPU decode
# cosine >= 0.999 per image. The keras-hub cases (bench_dinov2.json, bench_clip.json: DINOv2-B/14
# with registers and CLIP ViT-B/32 at 224 px, random-init presets written by
# benchmarks/hub_presets.py, bf16) time the same compiled uint8 path; HUB=0 leaves them out, CPU=0
# the CPU-decode case, GPU=0 the GPU-decode case, DIAG=0 the diagnostic; CODEC=1 adds
# benchmarks/bench_codec.py (the codec alone per backend and option set) before the diagnostic.
# Of the 40,000 crops made below, 3 are the same crop of the same photo: content-addressed, they
# are 39,997 images (extract_inner.extracted).
set -euo pipefail
OUT=${OUT:-/tmp/out}
N=${N:-40000}
IMAGES=${IMAGES:-/tmp/imgs}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT" "$SITE"

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
fi
# The checkout as the installed package would lay it out: pipeline/ is imgfeat, jobs/ is imgfeat.cli.
rm -rf "$SITE/imgfeat" && cp -r pipeline "$SITE/imgfeat" && cp -r jobs "$SITE/imgfeat/cli"
export PYTHONPATH="$SITE" KERAS_BACKEND=jax IMGFEAT_PROGRESS=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true

if [ ! -d "$IMAGES" ]; then
  # In a process pool (every core): one process takes minutes of the device session for 40,000 files.
  python3 - "$IMAGES" "$N" 500 375 <<'PY'
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from imgfeat.tools.samples import DEMO_CLASSES, load_photo

OUT, N, W, H = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
PHOTOS = [load_photo(name) for name in DEMO_CLASSES.values()]


def make(start: int) -> None:
    rng = np.random.default_rng(start)
    for i in range(start, min(start + 500, N)):
        im = PHOTOS[i % len(PHOTOS)]
        cw, ch = (int(s * rng.uniform(0.5, 1.0)) for s in im.size)
        x, y = int(rng.integers(0, im.size[0] - cw + 1)), int(rng.integers(0, im.size[1] - ch + 1))
        im.crop((x, y, x + cw, y + ch)).resize((W, H)).save(OUT / f"{i:06d}.jpg", quality=90)


OUT.mkdir(parents=True, exist_ok=True)
with Pool(os.cpu_count()) as pool:
    pool.map(make, range(0, N, 500))
PY
fi

# Each case under its own time limit (STEP_S seconds), the quick diagnostic first: one that hangs costs
# only its own share of a short device session. Where GPU decode sent each file (the GPU, the CPU
# path, an error row) is in gpu_decode.json.
step() { timeout "${STEP_S:-150}" "$@" || echo "step exited $?: $*" >&2; }
if [ "${CODEC:-0}" = 1 ]; then  # nvImageCodec alone per backend and option set (opt-in)
  step python3 benchmarks/bench_codec.py "$IMAGES" --limit "${DIAG_N:-5000}" --out "$OUT/codec.json" \
    > "$OUT/codec.log" 2>&1
fi
if [ "${DIAG:-1}" = 1 ]; then
  step python3 benchmarks/bench_gpu_decode.py "$IMAGES" --limit "${DIAG_N:-5000}" --variants \
    --out "$OUT/gpu_decode.json" > "$OUT/gpu_decode.log" 2>&1
fi
common=(bench --backbone resnet50 --images "$IMAGES" --limit "$N" --precision bfloat16 --batch-size 256
        --skip tutorial --workspace /tmp/bench-ws --json)
if [ "${CPU:-1}" = 1 ]; then
  step python3 -m imgfeat "${common[@]}" --decode processes --logs "$OUT/logs_cpu_decode" \
    > "$OUT/bench_cpu_decode.json" 2> "$OUT/bench_cpu_decode.err"
fi
if [ "${GPU:-1}" = 1 ]; then
  step python3 -m imgfeat "${common[@]}" --decode gpu --logs "$OUT/logs_gpu_decode" \
    > "$OUT/bench_gpu_decode.json" 2> "$OUT/bench_gpu_decode.err"
fi
if [ "${HUB:-1}" = 1 ]; then
  step python3 benchmarks/hub_presets.py /tmp/presets > "$OUT/hub_presets.log" 2>&1
  hub=(bench --images "$IMAGES" --limit "$N" --precision bfloat16 --batch-size 256 --skip tutorial
       --workspace /tmp/bench-ws-hub --json)
  step python3 -m imgfeat "${hub[@]}" --backbone /tmp/presets/dinov2_with_registers_base \
    > "$OUT/bench_dinov2.json" 2> "$OUT/bench_dinov2.err"
  step python3 -m imgfeat "${hub[@]}" --backbone /tmp/presets/clip_vit_base_patch32 \
    > "$OUT/bench_clip.json" 2> "$OUT/bench_clip.err"
fi
tail -n 3 "$OUT"/*.json "$OUT"/*.log
