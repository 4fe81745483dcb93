"""CPU memory: loading a saved model, and the evaluation vision cache at IconQA size.

Loading (`--what load`): a mid-size random InstructBLIP (`_models.py`, T5 family) is saved with
save_pretrained, then loaded by `instructblip_peft.model.load_model` in a fresh process, which then reads
every weight once (as the first forward would). Reported: the peak resident memory (the kernel's VmHWM)
above the process's size before loading, as a multiple of the checkpoint's size on disk (goal <= 1.3x), and
the peak of anonymous memory (what cannot be evicted; weights read from the memory-mapped file are
evictable page cache). Baseline, in the same run: a plain PyTorch load (build the model, then
load_state_dict(safetensors.load_file(...))).

Vision cache (`--what cache`): a VisionCache filled with IconQA val + test (12,632 images) of ViT-g
outputs (257 x 1408, bf16, the model's dtype in a GPU run), then read back once as an evaluation epoch does,
with the RAM cap of params/train.yaml (eval_vision_cache_ram_gb) and a spill file; and without a cap, on a
fraction of the images (--uncapped-images) scaled up, so as not to take 9 GB of a shared machine.

    python benchmarks/memory.py                     # both; the cache spills ~7 GB to --spill-dir
    python benchmarks/memory.py --what load
    python benchmarks/memory.py --tiny              # seconds: the CI smoke run
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

ICONQA_EVAL_IMAGES = 6316 + 6316   # val + test, choose_txt
VIT_G = (257, 1408)                 # 16 x 16 patches + CLS, width 1408
MiB = 2**20


# ---------------------------------------------------------------- measuring one process

def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PeakAnon:
    """Samples RssAnon every few milliseconds (the kernel keeps a peak only for the whole RSS)."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, status()["RssAnon"])
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status()["RssAnon"])


def child_load(directory: str, dtype_name: str, mode: str) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import InstructBlipForConditionalGeneration

    from instructblip_peft.model import load_model

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    preset = json.loads((Path(directory) / "preset.json").read_text())
    files = sorted(Path(directory).glob("*.safetensors"))
    before = status()
    start = time.perf_counter()
    with PeakAnon() as anon:
        if mode == "load_model":
            model, _ = load_model(preset, source=directory, dtype=dtype, device="cpu")
        else:  # plain PyTorch: a randomly initialised model, then the whole state dict read into memory
            from instructblip_peft.model import architecture_config
            model = InstructBlipForConditionalGeneration(architecture_config(preset)).to(dtype)
            state = {}
            for f in files:
                state.update(load_file(str(f)))
            model.load_state_dict(state, strict=False)
            del state
        with torch.no_grad():  # every weight read once, as the first forward pass does
            total = sum(float(p.sum()) for p in model.parameters())
    seconds = time.perf_counter() - start
    after = status()
    return {"mode": mode, "dtype": dtype_name, "checkpoint_bytes": sum(f.stat().st_size for f in files),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "rss_before": before["VmRSS"], "peak_rss": after["VmHWM"], "rss_after": after["VmRSS"],
            "anon_before": before["RssAnon"], "peak_anon": anon.peak, "seconds": seconds,
            "checksum_finite": total == total}


def child_cache(images: int, cap_bytes: int, shape: list[int], spill: str) -> dict:
    import torch

    from instructblip_peft.evaluate import VisionCache

    torch.set_num_threads(1)
    cap = None if cap_bytes < 0 else cap_bytes
    base = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    before = status()
    cache = VisionCache(max_ram_bytes=cap, spill_path=spill)
    with PeakAnon() as anon:
        t0 = time.perf_counter()
        for i in range(images):
            row = base.clone()
            row[0, 0] = i % 256  # each image its own tensor
            cache.put(f"img{i}@224", row)
        t1 = time.perf_counter()
        ok = all(float(cache.get(f"img{i}@224")[0, 0]) == i % 256 for i in range(images))
        t2 = time.perf_counter()
    after = status()
    stats = cache.stats()
    spill_path = cache.spill_path
    cache.close()
    return {"images": images, "cap_bytes": cap, "bytes_per_image": stats["bytes_per_image"],
            "ram_bytes": stats["ram_bytes"], "spilled_bytes": stats["spilled_bytes"],
            "rss_before": before["VmRSS"], "peak_rss": after["VmHWM"], "anon_before": before["RssAnon"],
            "peak_anon": anon.peak, "rss_file_after": after["RssFile"], "fill_s": t1 - t0, "read_s": t2 - t1,
            "read_back_ok": ok, "spill_removed": spill_path is None or not Path(spill_path).exists()}


def run_child(*args) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the two benchmarks

def save_model(directory: Path, tiny: bool, dtype_name: str) -> None:
    import torch

    from instructblip_peft.model import load_model, load_preset
    import _models

    preset = load_preset("tiny-t5") if tiny else _models.mid_preset("t5")
    model, processor = load_model(preset, dtype=getattr(torch, dtype_name))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    (directory / "preset.json").write_text(json.dumps(preset))


def bench_load(tiny: bool, work: Path) -> list[dict]:
    rows = []
    for saved, loaded in (("bfloat16", "bfloat16"), ("float32", "float32"), ("float32", "bfloat16")):
        directory = work / f"model-{saved}"
        if not directory.exists():
            save_model(directory, tiny, saved)
        for mode in ("plain_pytorch", "load_model"):
            r = dict(run_child("load", directory, loaded, mode), saved=saved)
            r["peak_over_checkpoint"] = (r["peak_rss"] - r["rss_before"]) / r["checkpoint_bytes"]
            r["anon_over_checkpoint"] = (r["peak_anon"] - r["anon_before"]) / r["checkpoint_bytes"]
            rows.append(r)
    print(f"\n== loading a saved model on CPU ({'tiny-t5' if tiny else 'mid-size T5'}), then reading every weight")
    print(f"{'checkpoint':>10} {'loaded as':>9} {'loader':>14} {'on disk':>9} {'peak RSS':>9} {'x disk':>7} "
          f"{'peak anon':>9} {'x disk':>7} {'s':>6}")
    for r in rows:
        print(f"{r['saved']:>10} {r['dtype']:>9} {r['mode']:>14} {r['checkpoint_bytes'] / MiB:>7.0f}MB "
              f"{(r['peak_rss'] - r['rss_before']) / MiB:>7.0f}MB {r['peak_over_checkpoint']:>6.2f}x "
              f"{(r['peak_anon'] - r['anon_before']) / MiB:>7.0f}MB {r['anon_over_checkpoint']:>6.2f}x "
              f"{r['seconds']:>6.1f}")
    by = {(r["saved"], r["dtype"], r["mode"]): r for r in rows}
    for saved, loaded in (("bfloat16", "bfloat16"), ("float32", "float32"), ("float32", "bfloat16")):
        plain, lean = by[(saved, loaded, "plain_pytorch")], by[(saved, loaded, "load_model")]
        print(f"{saved} -> {loaded}: load_model peaks at {lean['peak_over_checkpoint']:.2f}x the checkpoint "
              f"(goal <= 1.3x); plain PyTorch {plain['peak_over_checkpoint']:.2f}x "
              f"({plain['peak_over_checkpoint'] / lean['peak_over_checkpoint']:.1f}x more)")
    return rows


def bench_cache(tiny: bool, work: Path, images: int | None, uncapped_images: int | None, cap_gb: float | None):
    from instructblip_peft.config import resolve_settings

    shape = [17, 64] if tiny else list(VIT_G)
    images = images or (64 if tiny else ICONQA_EVAL_IMAGES)
    uncapped_images = uncapped_images or (images if tiny else images // 8)
    cap_gb = cap_gb if cap_gb is not None else resolve_settings().eval_vision_cache_ram_gb
    cap = int(cap_gb * 2**30) if not tiny else 16 * 17 * 64 * 2  # tiny: 16 images in RAM, the rest spilled
    capped = run_child("cache", images, cap, json.dumps(shape), work / "eval_vision_cache.0.bin")
    uncapped = run_child("cache", uncapped_images, -1, json.dumps(shape), work / "unused.bin")
    scale = images / uncapped_images
    uncapped["scaled_peak_anon_over_before"] = (uncapped["peak_anon"] - uncapped["anon_before"]) * scale
    print(f"\n== evaluation vision cache: {images:,} images of {shape[0]} x {shape[1]} bf16 "
          f"({capped['bytes_per_image'] / 1024:.0f} KiB each, {images * capped['bytes_per_image'] / 2**30:.2f} GiB)")
    rss, anon = capped["peak_rss"] - capped["rss_before"], capped["peak_anon"] - capped["anon_before"]
    print(f"capped at {(capped['cap_bytes'] or 0) / 2**30:.2f} GiB: {capped['ram_bytes'] / 2**30:.2f} GiB in RAM, "
          f"{capped['spilled_bytes'] / 2**30:.2f} GiB spilled; peak RSS +{rss / 2**30:.2f} GiB, "
          f"peak anonymous +{anon / 2**30:.2f} GiB; fill {capped['fill_s']:.0f} s, "
          f"one read pass {capped['read_s']:.0f} s; read back intact: {capped['read_back_ok']}; spill file removed: "
          f"{capped['spill_removed']}")
    print(f"uncapped ({uncapped_images:,} images measured, x{scale:.0f}): peak anonymous "
          f"+{uncapped['scaled_peak_anon_over_before'] / 2**30:.2f} GiB for {images:,} images; capped/uncapped "
          f"{(capped['peak_anon'] - capped['anon_before']) / uncapped['scaled_peak_anon_over_before']:.2f}x")
    return {"capped": capped, "uncapped": uncapped, "uncapped_scale": scale}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", nargs="+", choices=["load", "cache"], default=["load", "cache"])
    ap.add_argument("--tiny", action="store_true", help="tiny model and cache: seconds")
    ap.add_argument("--images", type=int, default=None, help=f"cache images (default {ICONQA_EVAL_IMAGES:,})")
    ap.add_argument("--uncapped-images", type=int, default=None, help="images for the uncapped run (default 1/8)")
    ap.add_argument("--cap-gb", type=float, default=None, help="default: eval_vision_cache_ram_gb")
    ap.add_argument("--work-dir", type=Path, default=None, help="where the model and the spill go (default: a "
                    "temporary directory, removed)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "load":
            out = child_load(rest[0], rest[1], rest[2])
        else:
            out = child_cache(int(rest[0]), int(rest[1]), json.loads(rest[2]), rest[3])
        print(json.dumps(out))
        return out
    import platform

    import torch
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, CPU; "
          "each measurement in a fresh process")
    results = {}
    with tempfile.TemporaryDirectory(prefix="ipeft-memory-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "load" in args.what:
            results["load"] = bench_load(args.tiny, work)
        if "cache" in args.what:
            results["cache"] = bench_cache(args.tiny, work, args.images, args.uncapped_images, args.cap_gb)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
