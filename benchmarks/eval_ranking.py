"""Batched candidate ranking (evaluate) vs the original one-forward-per-candidate method (score_naive).

Mid-size random models (benchmarks/_models.py), ScienceQA-like prompts (~128 tokens), 4 candidates.
Prints questions/s of both, the speed-up, and whether predictions are identical and scores equal.

    python benchmarks/eval_ranking.py                 # both families, CPU
    python benchmarks/eval_ranking.py --device cuda --questions 64
    python benchmarks/eval_ranking.py --quick         # tiny presets, a few questions (smoke run)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._models import evaluation_model, machine, scienceqa_like_records  # noqa: E402
from instructblip_peft.evaluate import evaluate, score_naive  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare(family: str, args) -> dict:
    model, processor, preset, settings = evaluation_model(family, args.quick, args.device, args.dtype,
                                                          args.batch_size)
    records = scienceqa_like_records(args.questions, args.candidates, seed=1)
    print(f"\n[{family}] model {preset['name']}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
          f"{args.questions} questions x {args.candidates} candidates, eval_batch_size {settings.eval_batch_size}, "
          f"max_txt_len {settings.max_txt_len}, image {settings.image_size}px, {args.device}, {args.dtype}")
    # Warm-up (allocator, kernels, lazy imports) for both methods.
    evaluate(model, processor, records[:2], None, "scienceqa", settings, family, progress=False)
    score_naive(model, processor, records[:1], None, "scienceqa", settings, family)

    _sync(args.device)
    t = time.perf_counter()
    naive = score_naive(model, processor, records, None, "scienceqa", settings, family)
    _sync(args.device)
    t_naive = time.perf_counter() - t

    t = time.perf_counter()
    result = evaluate(model, processor, records, None, "scienceqa", settings, family, progress=False)
    _sync(args.device)
    t_batched = time.perf_counter() - t

    same = all(p["predicted"] == min(range(len(s)), key=s.__getitem__) for p, s in zip(result.predictions, naive))
    rel = max(abs(a - b) / max(abs(b), 1e-12) for p, s in zip(result.predictions, naive)
              for a, b in zip(p["scores"], s))
    q = len(records)
    out = {"family": family, "naive_qps": q / t_naive, "batched_qps": q / t_batched, "speedup": t_naive / t_batched,
           "same_predictions": same, "max_rel_score_diff": rel}
    print(f"  naive (1 forward per candidate, batch 1): {t_naive:7.2f} s  {out['naive_qps']:7.2f} questions/s")
    print(f"  batched (shared encoders{'' if family == 't5' else ' + prompt KV cache'}): {t_batched:7.2f} s  "
          f"{out['batched_qps']:7.2f} questions/s")
    print(f"  speed-up {out['speedup']:.2f}x; identical predictions: {same}; max relative score difference {rel:.2e}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["t5", "llama", "both"], default="both")
    ap.add_argument("--questions", type=int, default=None, help="default 8 (CPU), 64 (cuda), 4 (--quick)")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8, help="questions per batch (eval_batch_size)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--quick", action="store_true", help="tiny presets and a few questions: a smoke run")
    args = ap.parse_args(argv)
    if args.questions is None:
        args.questions = 4 if args.quick else (64 if args.device.startswith("cuda") else 8)
    torch.manual_seed(0)
    print(f"machine: {machine()}")
    results = [compare(f, args) for f in (["t5", "llama"] if args.family == "both" else [args.family])]
    print("\nsummary: " + "; ".join(f"{r['family']} {r['speedup']:.2f}x ({r['naive_qps']:.2f} -> "
                                    f"{r['batched_qps']:.2f} q/s, same predictions: {r['same_predictions']})"
                                    for r in results))
    tol = 1e-4 if args.dtype == "fp32" else 2e-2
    return 0 if all(r["same_predictions"] and r["max_rel_score_diff"] <= tol for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
