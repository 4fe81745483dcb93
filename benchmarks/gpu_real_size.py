"""Real-size training steps on one GPU: FlanT5-XL and Vicuna-7B InstructBLIP with random weights.

The architectures come from params/architectures/ (model.architecture_config), so nothing is downloaded;
the model is built directly on the GPU in bf16 with SDPA attention. For each experiment (default 28 and
32: FlanT5-XL Q-Former LoRA / Q-Former+LLM LoRA, rank 8; 60 and 64: the same on Vicuna-7B) at the
paper's per-step batch size (presets.yaml: 16 / 8), with and without gradient checkpointing, it measures
step time, samples/s, peak memory and achieved TFLOP/s.

Precision: frozen weights bf16; trainable tensors fp32 (peft keeps LoRA in fp32, the script casts the
others); forward under torch.autocast(bf16); fused AdamW. Batches are full length: 32 image placeholders
+ max_txt_len prompt tokens (most ScienceQA prompts are cut there) + an 8-token answer.

FLOPs: counted by torch.utils.flop_counter.FlopCounterMode on one untimed step without gradient
checkpointing (matmuls and attention, forward and backward; the recomputation under checkpointing is
not counted, so the figure is model FLOP/s). As a cross-check the script also prints the textbook
estimate: frozen weights that gradients flow through cost 4 x params x tokens (forward 2, backward to
activations 2), trainable ones 6 x params x tokens (backward to weights 2 more), and the vision tower,
which nothing upstream trains, 2 x params x patches.

Memory: peak allocated and reserved; a second, untimed step at half the batch gives a line through two
points (fixed + per-sample memory), hence the largest batch that fits 24, 40 and 80 GB cards. At the end,
one table (the one benchmarks/README.md takes): per ID and checkpointing mode, step time, samples/s, peak
GPU memory, TFLOP/s, MFU (against the card's dense bf16 peak) and the largest batch per card size.

    python benchmarks/gpu_real_size.py                    # GPU: experiments 28 32 60 64, under 10 minutes
    python benchmarks/gpu_real_size.py --tiny             # CPU: tiny presets, the CI smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import re
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import InstructBlipForConditionalGeneration  # noqa: E402

from instructblip_peft.config import resolve_settings  # noqa: E402
from instructblip_peft.data.batches import IGNORE_INDEX  # noqa: E402
from instructblip_peft.experiments import get_experiment  # noqa: E402
from instructblip_peft.io import write_json  # noqa: E402
from instructblip_peft.lora import apply_experiment, base_model, trainable_parameters  # noqa: E402
from instructblip_peft.model import (architecture_config, load_preset, preset_for,  # noqa: E402
                                     set_gradient_checkpointing)

GiB = 2**30
# A 24 GB card leaves about 23 GiB to tensors after the CUDA context and allocator slack.
BUDGET_24GB = 23 * GiB
# Peak allocated memory that still fits a card of each size (nominal GB), with ~1-2 GiB left for the CUDA
# context and allocator fragmentation: 24 GB = 22.4 GiB, 40 GB = 37.3 GiB (A100 40GB: 39.4), 80 GB = 74.5 GiB
# (A100/H100 80GB: 79.2).
CARD_BUDGETS_GIB = {"24 GB": 21.0, "40 GB": 37.0, "80 GB": 77.0}
ANSWER_TOKENS = 8
# Dense bf16 peak (no sparsity) by device name, TFLOP/s; --peak-tflops overrides.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.0)]


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


# ---------------------------------------------------------------- model and batch

def build_model(preset: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """Random weights, allocated and initialised on `device` in `dtype` (no CPU copy of 8B params)."""
    config = architecture_config(preset)
    config.text_config.use_cache = False
    torch.manual_seed(seed)
    with torch.device(device):
        model = InstructBlipForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def attention_implementations(model) -> dict[str, str]:
    cfg = model.config
    return {part: getattr(cfg, f"{part}_config")._attn_implementation for part in ("vision", "qformer", "text")}


def synthetic_batch(model, batch_size: int, prompt_tokens: int, device: torch.device, dtype: torch.dtype,
                    seed: int) -> dict:
    """A full-length batch: placeholders + prompt (+ answer for LLaMA) with random token ids."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    n_query, image_id = cfg.num_query_tokens, cfg.image_token_id
    vocab = min(cfg.text_config.vocab_size, image_id)  # ids below the image token: ordinary text
    size = cfg.vision_config.image_size

    def ids(n, high):
        return torch.randint(3, high, (batch_size, n), generator=g)

    batch = {"pixel_values": torch.randn(batch_size, 3, size, size, generator=g).to(dtype),
             "qformer_input_ids": ids(prompt_tokens, cfg.qformer_config.vocab_size),
             "qformer_attention_mask": torch.ones(batch_size, prompt_tokens, dtype=torch.long)}
    placeholders = torch.full((batch_size, n_query), image_id)
    prompt, answer = ids(prompt_tokens, vocab), ids(ANSWER_TOKENS, vocab)
    if cfg.use_decoder_only_language_model:
        batch["input_ids"] = torch.cat([placeholders, prompt, answer], 1)
        batch["labels"] = torch.cat([torch.full((batch_size, n_query + prompt_tokens), IGNORE_INDEX), answer], 1)
    else:
        batch["input_ids"] = torch.cat([placeholders, prompt], 1)
        batch["labels"] = answer
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return {k: v.to(device) for k, v in batch.items()}


def component_tokens(model, batch: dict) -> dict[str, int]:
    """Tokens each group of weights processes in one step (for the FLOP estimate)."""
    cfg = model.config
    b = batch["input_ids"].shape[0]
    patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + 1
    queries, text = b * cfg.num_query_tokens, b * batch["qformer_input_ids"].shape[1]
    return {"vision": b * patches, "queries": queries, "qformer_text": text, "qformer_all": queries + text,
            "llm": b * batch["input_ids"].shape[1], "decoder": b * batch["labels"].shape[1]}


def _part(name: str, t5: bool) -> str:
    if name.startswith("vision_model"):
        return "vision"
    if name.startswith("language_projection") or re.search(r"crossattention|_query\.", name):
        return "queries"  # only the query tokens cross-attend and use the query FFN, then get projected
    if re.search(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.", name):
        return "qformer_text"
    if name.startswith("qformer"):
        return "qformer_all"
    if t5 and (".decoder." in name or "lm_head" in name):
        return "decoder"
    return "llm"


def flops_by_part(model, batch: dict) -> dict[str, float]:
    """Per group of weights (component_tokens' keys): (2 forward + 2 backward-to-activations + 2
    backward-to-weights if it trains) x params x the tokens it sees; the vision tower, which nothing upstream
    trains, only runs forward (2x). Embeddings are lookups, not matmuls; attention scores are not counted."""
    tokens = component_tokens(model, batch)
    t5 = not model.config.use_decoder_only_language_model
    parts = dict.fromkeys(tokens, 0.0)
    for name, p in base_model(model).named_parameters():
        if p.ndim < 2 or re.search(r"embed|shared|query_tokens", name):
            continue
        part = _part(name, t5)
        per_token = 2 if part == "vision" else 4
        if p.requires_grad:
            per_token += 2
        parts[part] += per_token * p.numel() * tokens[part]
    return parts


def estimated_flops(model, batch: dict) -> float:
    """A training step's FLOPs, textbook (flops_by_part summed)."""
    return sum(flops_by_part(model, batch).values())


# ---------------------------------------------------------------- one measured configuration

def train_parameters_in_fp32(model) -> list[torch.nn.Parameter]:
    params = list(trainable_parameters(model).values())
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    return params


def measure(model, batch: dict, device: torch.device, dtype: torch.dtype, checkpointing: bool, warmup: int,
            steps: int, count_flops: bool) -> dict:
    set_gradient_checkpointing(base_model(model), checkpointing)
    model.train()
    params = train_parameters_in_fp32(model)
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    flops = None
    if count_flops:  # before anything else, so the optimizer state exists in every timed step alike
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = float(counter.get_total_flops())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    losses = [step() for _ in range(warmup)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    losses += [step() for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    finite = bool(torch.isfinite(torch.stack(losses)).all())  # one sync, after timing
    out = {"checkpointing": checkpointing, "step_s": elapsed / steps,
           "samples_per_s": batch["input_ids"].shape[0] * steps / elapsed, "losses_finite": finite}
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GiB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GiB
        out["fits_24gb"] = torch.cuda.max_memory_reserved(device) <= BUDGET_24GB
    optimizer.state.clear()  # frees the Adam moments before the next configuration is measured
    if flops is not None:
        out["counted_flops"] = flops
    return out


def largest_batches(batch_size: int, peak_gib: float, small_batch: int, small_peak_gib: float) -> dict[str, int]:
    """The largest batch whose peak allocated memory stays within each card's budget, from two measured
    batch sizes: memory = fixed + per_sample x batch (weights, optimizer state and the CUDA workspace are the
    fixed part; activations grow with the batch)."""
    if batch_size == small_batch:
        return {}
    per_sample = (peak_gib - small_peak_gib) / (batch_size - small_batch)
    fixed = peak_gib - per_sample * batch_size
    out = {}
    for card, budget in CARD_BUDGETS_GIB.items():
        if fixed > budget:
            out[card] = 0
        elif per_sample <= 0:
            out[card] = batch_size  # no growth measured: at least the measured batch
        else:
            out[card] = int((budget - fixed) // per_sample)
    return out


def run_preset(preset: dict, experiment_ids: list[str], args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    settings = resolve_settings("scienceqa", None, preset)
    prompt_tokens = args.prompt_tokens or settings.max_txt_len
    batch_size = args.batch_size or settings.batch_size
    t0 = time.perf_counter()
    model = build_model(preset, device, dtype, args.seed)
    build_s = time.perf_counter() - t0
    batch = synthetic_batch(model, batch_size, prompt_tokens, device, dtype, args.seed)
    small = max(1, batch_size // 2)
    small_batch = synthetic_batch(model, small, prompt_tokens, device, dtype, args.seed) if (
        device.type == "cuda" and args.max_batch and small != batch_size) else None
    total_params = sum(p.numel() for p in model.parameters())
    results = []
    for exp_id in experiment_ids:
        experiment = get_experiment(exp_id)
        peft_model = apply_experiment(model, experiment)
        trainable = sum(p.numel() for p in trainable_parameters(peft_model).values())
        row = {"experiment": experiment.id, "label": experiment.label, "rank": experiment.rank,
               "preset": preset["name"], "batch_size": batch_size, "prompt_tokens": prompt_tokens,
               "answer_tokens": ANSWER_TOKENS, "total_params": total_params, "trainable_params": trainable,
               "build_s": build_s, "attention": attention_implementations(model),
               "estimated_flops": estimated_flops(peft_model, batch), "runs": []}
        flops = None
        for checkpointing in args.checkpointing:
            r = measure(peft_model, batch, device, dtype, checkpointing, args.warmup, args.steps,
                        count_flops=flops is None and not checkpointing)
            flops = r.pop("counted_flops", flops)
            if small_batch is not None:  # a second batch size (one untimed step) for the memory line
                r2 = measure(peft_model, small_batch, device, dtype, checkpointing, 0, 1, count_flops=False)
                r["small_batch"], r["small_batch_peak_allocated_gib"] = small, r2["peak_allocated_gib"]
                r["largest_batch"] = largest_batches(batch_size, r["peak_allocated_gib"], small,
                                                     r2["peak_allocated_gib"])
            row["runs"].append(r)
        if flops is None:  # only checkpointed runs asked for: count on an extra plain step
            flops = measure(peft_model, batch, device, dtype, False, 0, 1, count_flops=True)["counted_flops"]
        row["counted_flops"] = flops
        for r in row["runs"]:
            r["tflops"] = flops / r["step_s"] / 1e12
            r["estimated_tflops"] = row["estimated_flops"] / r["step_s"] / 1e12
            if args.peak:
                r["share_of_peak"] = r["tflops"] / args.peak
        results.append(row)
        report(row, args.peak)
        # Back to the bare model for the next experiment: LoRA removed, everything in the base dtype.
        model = peft_model.unload() if hasattr(peft_model, "unload") else peft_model
        for p in model.parameters():
            p.requires_grad_(False)
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
        set_gradient_checkpointing(base_model(model), False)
    del model, batch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def report(row: dict, peak: float | None) -> None:
    print(f"\n== experiment {row['experiment']} ({row['label']}, r={row['rank']}) on {row['preset']}: "
          f"batch {row['batch_size']} x ({row['prompt_tokens']} prompt + {row['answer_tokens']} answer tokens), "
          f"trainable {row['trainable_params']:,} of {row['total_params']:,} params; built in {row['build_s']:.1f}s")
    print(f"FLOPs per step: counted {row['counted_flops'] / 1e9:,.1f} G, formula {row['estimated_flops'] / 1e9:,.1f} G; "
          f"attention: {row['attention']}")
    for r in row["runs"]:
        mem = (f"peak {r['peak_allocated_gib']:.1f} GiB allocated / {r['peak_reserved_gib']:.1f} GiB reserved "
               f"({'fits' if r['fits_24gb'] else 'does NOT fit'} 24 GB)") if "peak_allocated_gib" in r else "memory n/a on CPU"
        share = f" = {100 * r['share_of_peak']:.0f}% of bf16 peak" if "share_of_peak" in r else ""
        print(f"  checkpointing {'on ' if r['checkpointing'] else 'off'}: {r['step_s'] * 1000:.0f} ms/step, "
              f"{r['samples_per_s']:.1f} samples/s, {r['tflops']:.3g} TFLOP/s{share} "
              f"(formula {r['estimated_tflops']:.3g}); {mem}; losses finite: {r['losses_finite']}")


def print_table(results: list[dict], peak: float | None) -> None:
    """One line per experiment and checkpointing mode: the figures benchmarks/README.md's table takes."""
    cards = list(CARD_BUDGETS_GIB)
    print(f"\n| ID | model | checkpointing | batch | step s | samples/s | peak GiB | TFLOP/s | MFU | "
          f"largest batch {' / '.join(cards)} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        for r in row["runs"]:
            mem = f"{r['peak_allocated_gib']:.1f}" if "peak_allocated_gib" in r else "n/a"
            mfu = f"{100 * r['share_of_peak']:.0f}%" if "share_of_peak" in r else "n/a"
            fits = " / ".join(str(r["largest_batch"].get(c, "?")) for c in cards) if r.get("largest_batch") else "n/a"
            print(f"| {row['experiment']} | {row['preset']} | {'on' if r['checkpointing'] else 'off'} | "
                  f"{row['batch_size']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | {mem} | {r['tflops']:.3g} | "
                  f"{mfu} | {fits} |")
    print(f"MFU: counted model FLOP/s / the card's dense bf16 peak ({peak or 'unknown'} TFLOP/s). Largest batch: "
          f"peak allocated memory within {', '.join(f'{v:g} GiB ({k})' for k, v in CARD_BUDGETS_GIB.items())}, "
          "from a line through two measured batch sizes (the preset's and half of it).")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny presets instead of the real architectures (CPU)")
    ap.add_argument("--experiments", nargs="+", default=["28", "32", "60", "64"])
    ap.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's (16 FlanT5, 8 Vicuna)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default: max_txt_len (params/data.yaml)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not known")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--no-max-batch", dest="max_batch", action="store_false",
                    help="skip the second batch size that estimates the largest batch per card")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        ap.error("the real-size architectures need a GPU; on CPU run with --tiny")
    args.steps = args.steps or (1 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.checkpointing = [c == "on" for c in dict.fromkeys(args.checkpointing)]
    args.peak = peak_tflops(device, args.peak_tflops)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"machine: {machine}, torch {torch.__version__}; {args.dtype}, SDPA attention, fused AdamW on CUDA; "
          f"bf16 peak {args.peak or 'unknown'} TFLOP/s; {args.warmup} warm-up + {args.steps} timed steps")

    by_preset: dict[str, list[str]] = {}
    for exp_id in args.experiments:
        experiment = get_experiment(exp_id)
        preset = preset_for(experiment, "tiny" if args.tiny else None)
        by_preset.setdefault(preset["name"], []).append(experiment.id)
    results = []
    t0 = time.perf_counter()
    for name, ids in by_preset.items():
        results += run_preset(load_preset(name), ids, args, device, dtype)
    print_table(results, args.peak)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")
    if args.json:
        write_json(args.json, {"machine": machine, "dtype": args.dtype, "peak_bf16_tflops": args.peak,
                               "results": results})
    return results


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
