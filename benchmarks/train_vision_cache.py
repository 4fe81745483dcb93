"""Training samples/s with the training vision cache (train_vision_cache, vision_reuse.py): epoch 2, which skips
the frozen ViT, against epoch 1, which fills the cache, and against epoch 2 without the cache.

The model is random, sized so that its ViT : Q-Former : LLM shares of a training step's FLOPs are those of
FlanT5-XL InstructBLIP: both are counted with gpu_real_size.flops_by_part (weight matmuls: the ViT forward
only, the Q-Former and the LLM forward and backward; ~128-token prompts, 8-token answers). FlanT5-XL is
built on the meta device for that (no weights). Two copies of the model train side by side on the same
batches from the same initial state (Q-Former + LLM LoRA, experiment 31), one with the cache and one
without, alternating step by step so that other load on the machine hits both alike; each keeps its own
RNG stream (dropout). The losses of the two must agree (<= 1e-6 relative).

    python benchmarks/train_vision_cache.py --threads 1   # CPU, ~30 s
    python benchmarks/train_vision_cache.py --quick       # tiny preset, a smoke run

One thread: on a shared 2-core machine, 2 threads made whichever model stepped first after the data loading
pay the thread pool's wake-up (measured 0.56x "speed-up" before the order was swapped every step).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._models import machine, mid_preset, scienceqa_like_records, write_random_images  # noqa: E402
from benchmarks.gpu_real_size import build_model, flops_by_part, synthetic_batch  # noqa: E402
from instructblip_peft.config import resolve_settings  # noqa: E402
from instructblip_peft.data.batches import QADataset, TrainCollator, make_transform  # noqa: E402
from instructblip_peft.evaluate import VisionCache  # noqa: E402
from instructblip_peft.experiments import get_experiment  # noqa: E402
from instructblip_peft.lora import apply_experiment, base_model, trainable_parameters  # noqa: E402
from instructblip_peft.model import load_model, load_preset  # noqa: E402
from instructblip_peft.vision_reuse import TrainVisionCache  # noqa: E402

PROMPT_TOKENS = 128
# Widths and depths that give the FlanT5-XL shares (the script prints both to check).
SHAPE = {"vision": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 6},
         "qformer": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 1, "num_attention_heads": 4,
                     "cross_attention_frequency": 2},
         "text": {"d_model": 512, "d_ff": 1024, "d_kv": 64, "num_layers": 5, "num_decoder_layers": 5, "num_heads": 8,
                  "initializer_factor": 0.05}}


def shares(model) -> dict[str, float]:
    """Each part's share of a training step's FLOPs (one sample, PROMPT_TOKENS-token prompt)."""
    batch = synthetic_batch(model, 1, PROMPT_TOKENS, torch.device("cpu"), torch.float32, 0)
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)  # LoRA's own FLOPs are negligible: count the frozen weights' passes
    parts = flops_by_part(model, batch)
    for n, p in model.named_parameters():
        p.requires_grad_(frozen[n])
    groups = {"vit": 0.0, "qformer": 0.0, "llm": 0.0}
    for part, f in parts.items():
        groups["vit" if part == "vision" else "llm" if part in ("llm", "decoder") else "qformer"] += f
    total = sum(groups.values())
    return {k: v / total for k, v in groups.items()} | {"gflop_per_sample": total / 1e9}


def bench_preset(quick: bool) -> dict:
    if quick:
        return load_preset("tiny-t5")
    preset = mid_preset("t5")
    preset["name"] = "vit-share-t5"
    preset["tiny"].update(vision=SHAPE["vision"], qformer=SHAPE["qformer"], text=SHAPE["text"])
    return preset


def trained_copy(preset, settings):
    model, processor = load_model(preset, seed=0)
    torch.manual_seed(0)
    model = apply_experiment(model, get_experiment("31"), settings)
    model.train()
    params = list(trainable_parameters(model).values())
    return model, processor, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=None, help="training images (default 24; --quick 8)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, a few samples: a smoke run")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.samples or (8 if args.quick else 24)
    preset = bench_preset(args.quick)
    settings = resolve_settings("scienceqa", get_experiment("31"), preset, {"augment": False})
    real = shares(build_model(load_preset("flant5xl"), torch.device("meta"), torch.float32, 0))
    models = {"cache": trained_copy(preset, settings), "plain": trained_copy(preset, settings)}
    ours = shares(models["plain"][0])
    print(f"machine: {machine()}")
    print("FLOP shares of a training step, ViT : Q-Former : LLM (ViT forward only; the rest forward + backward):")
    for name, s in (("FlanT5-XL InstructBLIP", real), (f"this model ({preset['name']})", ours)):
        print(f"  {name:28s} {s['vit']:.1%} : {s['qformer']:.1%} : {s['llm']:.1%}   "
              f"({s['gflop_per_sample']:.1f} GFLOP per sample)")
    cache = TrainVisionCache(base_model(models["cache"][0]), VisionCache(setting="train_vision_cache"), "bench")
    processor = models["cache"][1]
    rng = {k: torch.get_rng_state() for k in models}
    seconds = {(k, e): 0.0 for k in models for e in (1, 2)}
    losses = {k: [] for k in models}
    with tempfile.TemporaryDirectory() as tmp:
        records = scienceqa_like_records(n, 4, seed=3)
        write_random_images(records, tmp, size=settings.image_size)
        data = QADataset(records, Path(tmp), "scienceqa", make_transform(processor, settings, train=True))
        collate = TrainCollator(processor, "t5", settings.max_txt_len, settings.max_output_txt_len, image_keys=True)
        for epoch in (1, 2):
            data.set_epoch(epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).tolist()
            for lo in range(0, n - args.batch_size + 1, args.batch_size):
                batch = collate([data[i] for i in order[lo: lo + args.batch_size]])
                keys = batch.pop("image_keys")
                # Alternate, and swap which goes first each step: the same conditions for both.
                step = lo // args.batch_size
                for k in (("cache", "plain") if step % 2 == 0 else ("plain", "cache")):
                    model, _, optimizer = models[k]
                    torch.set_rng_state(rng[k])
                    start = time.perf_counter()
                    with cache.batch(keys) if k == "cache" else contextlib.nullcontext():
                        loss = model(**batch).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses[k].append(loss.item())
                    seconds[k, epoch] += time.perf_counter() - start
                    rng[k] = torch.get_rng_state()
    per_epoch = (n // args.batch_size) * args.batch_size
    rate = {key: per_epoch / s for key, s in seconds.items()}
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["cache"], losses["plain"]))
    out = {"real_shares": real, "model_shares": ours, "samples": per_epoch, "batch_size": args.batch_size,
           "cache_epoch1_samples_per_s": rate["cache", 1], "cache_epoch2_samples_per_s": rate["cache", 2],
           "plain_epoch2_samples_per_s": rate["plain", 2], "plain_epoch1_samples_per_s": rate["plain", 1],
           "epoch2_vs_epoch1": rate["cache", 2] / rate["cache", 1],
           "epoch2_vs_no_cache": rate["cache", 2] / rate["plain", 2], "max_rel_loss_diff": rel,
           "vit_batches": cache.vit_batches, "reused_batches": cache.reused_batches}
    print(f"{per_epoch} samples per epoch, batch {args.batch_size}, fp32, "
          f"{torch.get_num_threads()} thread(s); samples/s:")
    print(f"  epoch 1, fills the cache:  {rate['cache', 1]:6.2f}   (without cache: {rate['plain', 1]:6.2f})")
    print(f"  epoch 2, ViT skipped:      {rate['cache', 2]:6.2f}   (without cache: {rate['plain', 2]:6.2f})")
    print(f"epoch 2 vs epoch 1: {out['epoch2_vs_epoch1']:.2f}x; epoch 2 vs no cache: {out['epoch2_vs_no_cache']:.2f}x; "
          f"max relative loss difference {rel:.1e} ({len(losses['cache'])} steps); ViT ran on "
          f"{cache.vit_batches} batches, skipped on {cache.reused_batches}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    cache.close()
    return 0 if rel <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
