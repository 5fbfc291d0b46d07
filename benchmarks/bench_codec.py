"""nvImageCodec's decoder alone, per backend and option set, on a GPU host: what extract's codec could be.

    KERAS_BACKEND=jax python3 benchmarks/bench_codec.py /tmp/imgs --limit 10000 --out codec.json

For each decoder configuration (backends allowed, decoder options, CPU threads), on the first N
files held in memory: img/s per batch size (one codec call per batch, results on the device, after
one untimed call), how many files it did not decode, and its fidelity to Pillow's decode (libjpeg,
what the CPU path gives) on the first ``--compare`` files: largest and mean absolute difference per
pixel. Then the configurations that decode every file faithfully again, with CPU threads busy
reading and hashing files beside them (as extract's read threads are), under each Python thread
switch interval asked for. One JSON object, each part written as it is measured. Needs numpy,
Pillow, jax with its CUDA plugin, nvidia-nvimgcodec and imgfeat on the path
(benchmarks/gpu_host.sh puts it there).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

# name -> (backend kinds allowed or None for all, decoder options, max CPU threads (0: every core))
CONFIGS = {
    "all_fancy": (None, ":fancy_upsampling=1", 0),  # what extract uses today
    "all_plain": (None, "", 0),
    "hw_fancy": (("HW_GPU_ONLY",), ":fancy_upsampling=1", 0),
    "hw_plain": (("HW_GPU_ONLY",), "", 0),
    "cuda_fancy": (("GPU_ONLY",), ":fancy_upsampling=1", 0),
    "cuda_fancy_gpu_huffman": (("GPU_ONLY",), ":fancy_upsampling=1 nvjpeg_cuda_decoder:hybrid_huffman_threshold=0", 0),
    "hybrid_fancy": (("HYBRID_CPU_GPU",), ":fancy_upsampling=1", 0),
    "all_fancy_4_threads": (None, ":fancy_upsampling=1", 4),
    "all_fancy_4_streams": (None, ":fancy_upsampling=1 :num_cuda_streams=4", 0),
}
MAX_FAITHFUL_DIFF = 2  # libjpeg against nvJPEG's IDCT: a level or two per pixel


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--limit", type=int, default=10_000)
    p.add_argument("--batch-sizes", default="256,1024")
    p.add_argument("--compare", type=int, default=64)
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names: " + ", ".join(CONFIGS))
    p.add_argument("--readers", default="1,4,16", help="busy read threads beside the faithful configurations")
    p.add_argument(
        "--switch-intervals", default="0.005,0.0005,0.0001", help="Python thread switch intervals (s) to try them under"
    )
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def make_decoder(nv, name: str):
    kinds, options, threads = CONFIGS[name]
    kwargs: dict = {"max_num_cpu_threads": threads}
    if kinds:
        kwargs["backends"] = [nv.Backend(getattr(nv.BackendKind, k)) for k in kinds]
    if options:
        kwargs["options"] = options
    return nv.Decoder(**kwargs)


def decode(nv, decoder, datas, params):
    import jax

    images = decoder.decode([nv.CodeStream(d) for d in datas], params=params)
    out = [None if img is None else jax.dlpack.from_dlpack(img) for img in images]
    jax.block_until_ready([x for x in out if x is not None])
    return out


def throughput(nv, decoder, datas, params, batch: int) -> dict:
    decode(nv, decoder, datas[:batch], params)  # first call allocates
    missing, t0 = 0, time.perf_counter()
    for start in range(0, len(datas), batch):
        missing += sum(x is None for x in decode(nv, decoder, datas[start : start + batch], params))
    return {"images_per_s": round(len(datas) / (time.perf_counter() - t0), 1), "not_decoded": missing}


def fidelity(nv, decoder, datas, params, wants) -> dict:
    diffs, means = [], []
    for got, want in zip(decode(nv, decoder, datas, params), wants):
        if got is None or tuple(got.shape) != want.shape:
            diffs.append(255)
            continue
        d = np.abs(np.asarray(got).astype(np.int16) - want.astype(np.int16))
        diffs.append(int(d.max()))
        means.append(float(d.mean()))
    return {"max_abs_diff": max(diffs), "mean_abs_diff": round(float(np.mean(means or [255.0])), 4)}


class BusyReaders:
    """``n`` threads reading and hashing files in a loop, as extract's read threads do (content ids)."""

    def __init__(self, paths: list[Path], n: int) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(paths[i::n],), daemon=True) for i in range(n)]

    def _run(self, paths: list[Path]) -> None:
        from imgfeat.core.hashing import content_id

        while not self.stop.is_set():
            for p in paths:
                if self.stop.is_set():
                    return
                content_id(p.read_bytes())

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = sorted(set(args.configs.split(",")) - set(CONFIGS))
    if unknown:
        print(f"bench_codec: --configs {','.join(unknown)}: not one of {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    try:
        import jax
        from nvidia import nvimgcodec as nv
        from PIL import Image
    except ImportError as exc:
        print(f"bench_codec: {exc}", file=sys.stderr)
        return 2
    paths = sorted(p for p in args.folder.rglob("*") if p.is_file() and not p.name.startswith("."))[: args.limit]
    datas = [p.read_bytes() for p in paths]
    wants = [np.asarray(Image.open(p).convert("RGB")) for p in paths[: args.compare]]
    params = nv.DecodeParams(apply_exif_orientation=True, color_spec=nv.ColorSpec.SRGB)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    result: dict = {"files": len(datas), "device": str(jax.devices()[0]), "configs": {}}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")

    faithful = []
    for name in args.configs.split(","):
        entry: dict = {}
        result["configs"][name] = entry
        try:
            decoder = make_decoder(nv, name)
            entry["fidelity"] = fidelity(nv, decoder, datas[: args.compare], params, wants)
            for batch in sizes:
                entry[f"batch_{batch}"] = throughput(nv, decoder, datas, params, batch)
        except Exception as exc:  # a backend this host lacks: say so, go on
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        save()
        ok = "error" not in entry and entry["fidelity"]["max_abs_diff"] <= MAX_FAITHFUL_DIFF
        if ok and all(entry[f"batch_{b}"]["not_decoded"] == 0 for b in sizes):
            faithful.append((name, decoder))
    default_interval = sys.getswitchinterval()
    for readers in (int(n) for n in args.readers.split(",")):
        for interval in (float(s) for s in args.switch_intervals.split(",")):
            sys.setswitchinterval(interval)
            for name, decoder in faithful:
                with BusyReaders(paths, readers):
                    key = f"batch_{sizes[0]}_with_{readers}_readers_switch_{interval * 1e6:g}us"
                    result["configs"][name][key] = throughput(nv, decoder, datas, params, sizes[0])
                save()
            sys.setswitchinterval(default_interval)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
