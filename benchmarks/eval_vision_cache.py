"""Epoch-2+ evaluation time with and without the evaluation vision cache (settings.eval_vision_cache).

The first evaluation of a run fills the cache (ViT encoder outputs before post_layernorm); every later
epoch reuses them. Measured: one later-epoch evaluation with the filled cache vs one without any cache,
on a mid-size random model (benchmarks/_models.py) with a distinct random image per question.

    python benchmarks/eval_vision_cache.py              # T5, CPU
    python benchmarks/eval_vision_cache.py --family llama --device cuda --questions 128
    python benchmarks/eval_vision_cache.py --quick      # tiny preset, a few questions (smoke run)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._models import evaluation_model, machine, scienceqa_like_records, write_random_images  # noqa: E402
from instructblip_peft.evaluate import VisionCache, evaluate  # noqa: E402


def _timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["t5", "llama"], default="t5")
    ap.add_argument("--questions", type=int, default=None, help="default 16 (CPU), 128 (cuda), 6 (--quick)")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--cache-device", default="cpu", help="where the cache lives (cpu, or the model's device)")
    ap.add_argument("--repeats", type=int, default=3, help="timed evaluations of each kind (the fastest counts)")
    ap.add_argument("--vit-layers", type=int, default=None,
                    help="ViT depth of the mid-size model (default 4; the real ViT-g has 39 layers at width 1408)")
    ap.add_argument("--quick", action="store_true", help="tiny preset and a few questions: a smoke run")
    args = ap.parse_args(argv)
    if args.questions is None:
        args.questions = 6 if args.quick else (128 if args.device.startswith("cuda") else 16)
    family = args.family
    model, processor, preset, settings = evaluation_model(family, args.quick, args.device, args.dtype,
                                                          args.batch_size, vision_layers=args.vit_layers)
    for p in model.parameters():  # as after lora.apply_experiment: the ViT is frozen (else the cache is off)
        p.requires_grad_(False)
    print(f"machine: {machine()}")
    print(f"model {preset['name']} ({family}): {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params; "
          f"{args.questions} questions x {args.candidates} candidates, one image each, "
          f"image {settings.image_size}px, eval_batch_size {settings.eval_batch_size}, {args.device}, {args.dtype}, "
          f"cache on {args.cache_device}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = scienceqa_like_records(args.questions, args.candidates, seed=2)
        write_random_images(records, root, size=max(settings.image_size, 64))

        def run(cache):
            return evaluate(model, processor, records, root, "scienceqa", settings, family, vision_cache=cache,
                            progress=False)

        evaluate(model, processor, records[:2], root, "scienceqa", settings, family, progress=False)  # warm-up
        cache = VisionCache(args.cache_device)
        first, t_fill = _timed(lambda: run(cache), args.device)
        # Alternate the two and keep each one's fastest: other load on the machine then hits both alike.
        t_cached = t_plain = float("inf")
        for _ in range(args.repeats):
            cached, t = _timed(lambda: run(cache), args.device)
            t_cached = min(t_cached, t)
            plain, t = _timed(lambda: run(None), args.device)
            t_plain = min(t_plain, t)
    same = [p["predicted"] for p in cached.predictions] == [p["predicted"] for p in plain.predictions]
    rel = max(abs(a - b) / max(abs(b), 1e-12) for p, q in zip(cached.predictions, plain.predictions)
              for a, b in zip(p["scores"], q["scores"]))
    per_image = cache.get(VisionCache.key(root, records[0]["image"], settings.image_size))
    mb = cache.nbytes() / 2**20
    print(f"epoch 1 (fills the cache):       {t_fill:7.2f} s")
    print(f"epoch 2+ without cache:          {t_plain:7.2f} s  {len(records) / t_plain:7.2f} questions/s")
    print(f"epoch 2+ with cache:             {t_cached:7.2f} s  {len(records) / t_cached:7.2f} questions/s")
    print(f"speed-up {t_plain / t_cached:.2f}x; identical predictions: {same}; max relative score difference "
          f"{rel:.2e}; cache {len(cache)} images, {mb:.1f} MiB ({tuple(per_image.shape)} {per_image.dtype} each)")
    tol = 1e-4 if args.dtype == "fp32" else 2e-2
    return 0 if same and rel <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
