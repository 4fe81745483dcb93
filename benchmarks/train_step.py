"""Training throughput: dynamic padding + length-grouped batches vs padding every batch to max_txt_len.

A Q-Former+LLM LoRA training step (experiment 32 for T5, 64 for LLaMA: LoRA rank 8 in the Q-Former and
the LLM) on a mid-size random InstructBLIP, fed by the package's own QADataset, TrainCollator and
length-grouped sampler, with torch.optim.AdamW. Three ways to batch the same prompt-length mix:

  static   random batches, every batch padded to max_txt_len (the baseline)
  dynamic  random batches, padded to the longest prompt in the batch (TrainCollator)
  grouped  length-grouped batches (group_by_length: true) with dynamic padding

Each mode runs the same number of batches drawn at random from its own epoch (grouped: train.py's
epoch_batches with group_by_length), and the modes take turns batch by batch so that other load on the
machine slows them alike. Before timing,
the script checks that the per-sample loss does not depend on padding or batch companions: every check
sample's loss, computed in a statically padded random batch and in a dynamically padded grouped batch,
must agree.

    python benchmarks/train_step.py                 # mid-size T5 and LLaMA, ScienceQA-like mix
    python benchmarks/train_step.py --mix iconqa    # short, uniform prompts
    python benchmarks/train_step.py --tiny          # the tiny presets, seconds (CI smoke test)
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._models import machine, mid_preset  # noqa: E402
from instructblip_peft.config import resolve_settings  # noqa: E402
from instructblip_peft.data.batches import (  # noqa: E402
    IGNORE_INDEX, ImageTransform, QADataset, TrainCollator, encode_prompts, epoch_batches)
from instructblip_peft.data.prompts import render_prompt, target_text  # noqa: E402
from instructblip_peft.experiments import get_experiment  # noqa: E402
from instructblip_peft.io import write_json  # noqa: E402
from instructblip_peft.lora import apply_experiment, trainable_parameters  # noqa: E402
from instructblip_peft.model import load_model, load_preset  # noqa: E402

MODES = ("static", "dynamic", "grouped")
EXPERIMENT = {"t5": "32", "llama": "64"}  # Q-Former+LLM LoRA all, rank 8

# Mid-size random models (benchmarks/_models.py): a ViT of 4 layers at 224 px (257 patch tokens), a
# real-width Q-Former (768 wide, 32 queries) cut to 4 layers, and a T5 of 6+6 layers at d_model 512 or a
# LLaMA of 12 layers at width 512. The vision tower takes about a third of the step, like ViT-g in the real
# model.
QFORMER_LAYERS = 4
LLM_LAYERS = {"t5": None, "llama": 12}  # None: _models.py's depth (T5: 6 + 6)


# ---------------------------------------------------------------- the prompt-length mix

@functools.lru_cache(maxsize=None)
def _single_token_words(family: str) -> tuple[str, ...]:
    """Words the tiny LLM tokenizer encodes as one token after a space and the Q-Former tokenizer knows
    whole, so word counts are token counts: the whole words of the Q-Former vocabulary (in vocabulary
    order) that are one LLM token."""
    _, processor = load_model(load_preset(f"tiny-{family}"))  # a tiny random model: only its tokenizers count
    vocab = processor.qformer_tokenizer.get_vocab()
    words = [w for w in sorted(vocab, key=vocab.get) if w.isalpha() and len(w) > 1]
    tok = processor.tokenizer
    return tuple(w for w in words if len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1)


def _text(rng: random.Random, n_tokens: int, family: str) -> str:
    return " ".join(rng.choice(_single_token_words(family)) for _ in range(max(1, n_tokens)))


def _lognormal(rng: random.Random, median: float, sigma: float) -> int:
    return int(round(median * math.exp(rng.gauss(0.0, sigma))))


def synthetic_records(n: int, mix: str, seed: int, family: str = "t5") -> list[dict]:
    """Records whose prompt lengths (in LLM tokens) follow a parametric mix.

    scienceqa: modelled on the ScienceQA paper's statistics: about 84% of questions come with a lecture
    (about 125 words on average, ~1.3 tokens a word, varying several-fold: log-normal, median 130 tokens),
    half with a hint (median 20 tokens), a question of 8-26 tokens and 2-5 choices of 1-5 tokens. The
    context is hint + lecture, as the reader builds it, so prompts run from ~50 tokens to far past
    max_txt_len. iconqa: no context, a question of 6-16 tokens and 2-5 choices of 1-3 tokens.
    The tiny tokenizers spell the template's own words ("Context:", "Options:") letter by letter, which
    adds ~35 tokens to every prompt (a real tokenizer: ~12).
    """
    rng = random.Random(seed)
    records = []
    for i in range(n):
        n_choices = rng.randint(2, 5)
        if mix == "scienceqa":
            hint = _text(rng, _lognormal(rng, 20, 0.8), family) if rng.random() < 0.5 else ""
            lecture = _text(rng, _lognormal(rng, 130, 0.6), family) if rng.random() < 0.84 else ""
            context = "" if not hint and not lecture else hint + " " + lecture
            question = _text(rng, rng.randint(8, 26), family)
            choices = [_text(rng, rng.randint(1, 5), family) for _ in range(n_choices)]
        else:
            context = ""
            question = _text(rng, rng.randint(6, 16), family)
            choices = [_text(rng, rng.randint(1, 3), family) for _ in range(n_choices)]
        rec = {"question_id": f"{mix}-{i}", "image": None, "question": question, "choices": choices,
               "answer_index": rng.randrange(n_choices), "context": context, "meta": {}}
        rec["answer"] = target_text(rec)
        records.append(rec)
    return records


# ---------------------------------------------------------------- batching modes

class StaticPadCollator:
    """TrainCollator's batch, right-padded further to max_txt_len prompt tokens (the baseline)."""

    def __init__(self, collator: TrainCollator):
        self.collator = collator

    def __call__(self, items: list[dict]) -> dict:
        c = self.collator
        batch = c(items)
        n_query = c.processor.num_query_tokens
        qpad = c.processor.qformer_tokenizer.pad_token_id
        tok = c.processor.tokenizer
        lpad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        batch["qformer_input_ids"] = _pad_to(batch["qformer_input_ids"], c.max_txt_len, qpad)
        batch["qformer_attention_mask"] = _pad_to(batch["qformer_attention_mask"], c.max_txt_len, 0)
        if c.family == "t5":
            width = n_query + c.max_txt_len
        else:  # prompt padded to max_txt_len, plus the longest answer of the batch
            width = n_query + c.max_txt_len + int((batch["labels"] != IGNORE_INDEX).sum(1).max())
            batch["labels"] = _pad_to(batch["labels"], width, IGNORE_INDEX)
        batch["input_ids"] = _pad_to(batch["input_ids"], width, lpad)
        batch["attention_mask"] = _pad_to(batch["attention_mask"], width, 0)
        return batch


def _pad_to(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    extra = width - t.shape[1]
    return torch.nn.functional.pad(t, (0, extra), value=value) if extra > 0 else t


def mode_batches(mode: str, records: list[dict], dataset: str, batch_size: int, seed: int) -> list[list[int]]:
    """One epoch's batches as train.py builds them (group_by_length sorts by rendered prompt length)."""
    lengths = [len(render_prompt(r, dataset)) for r in records] if mode == "grouped" else None
    return epoch_batches(len(records), batch_size, seed, 0, lengths, group_by_length=mode == "grouped")


def prompt_tokens(processor, records: list[dict], dataset: str, max_txt_len: int) -> list[int]:
    """LLM prompt tokens of each record after truncation, image placeholders not counted."""
    ids = encode_prompts(processor, [render_prompt(r, dataset) for r in records], max_txt_len)["input_ids"]
    return [len(x) - processor.num_query_tokens for x in ids]


# ---------------------------------------------------------------- measuring

class SavedActivations:
    """Bytes of activations kept for backward (parameters excluded): the memory padding inflates.
    Used on CPU, where torch has no peak-memory counter; on CUDA the script reads the allocator's peak."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: dict[int, int] = {}

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.params:
            self.seen[ptr] = storage.nbytes()
        return t

    @contextlib.contextmanager
    def step(self):
        self.seen = {}
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def per_sample_losses(model, batch: dict, family: str) -> torch.Tensor:
    """Mean token cross-entropy of each sample (the batch loss is the mean over all answer tokens)."""
    out = model(**batch)
    logits, labels = out.logits.float(), batch["labels"]
    if family == "llama":  # causal LM: position t predicts token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                            reduction="none")
    keep = (labels != IGNORE_INDEX).float()
    return (tok * keep).sum(1) / keep.sum(1)


def check_padding_invariance(model, dataset, collators, lengths, batch_size, seed, device, family) -> float:
    """Largest per-sample loss difference between static-padded random batches and dynamic grouped ones."""
    model.eval()
    check = list(range(min(len(dataset), 2 * batch_size)))
    losses = {}
    with torch.no_grad():
        for mode in ("static", "grouped"):
            if mode == "grouped":  # same samples, regrouped by length with different companions
                order = sorted(check, key=lambda i: lengths[i])
            else:
                order = [check[i] for i in torch.randperm(len(check), generator=torch.Generator().manual_seed(seed))]
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = to_device(collators[mode]([dataset[i] for i in idx]), device)
                for i, loss in zip(idx, per_sample_losses(model, batch, family).tolist()):
                    losses.setdefault(i, []).append(loss)
    model.train()
    return max(abs(a - b) for a, b in losses.values())


def run_family(family: str, args, device: torch.device) -> dict:
    tiny = args.tiny
    preset = (load_preset(f"tiny-{family}") if tiny
              else mid_preset(family, qformer_layers=QFORMER_LAYERS, llm_layers=LLM_LAYERS[family]))
    experiment = get_experiment(EXPERIMENT[family])
    settings = resolve_settings("scienceqa", experiment, load_preset(f"tiny-{family}") if tiny else None)
    max_txt_len = args.max_txt_len or settings.max_txt_len
    image_size = preset["tiny"]["image_size"]
    model, processor = load_model(preset, dtype=torch.float32, device=device, seed=args.seed)
    model = apply_experiment(model, experiment)
    model.config.use_cache = False
    trainable = list(trainable_parameters(model).values())
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")

    records = synthetic_records(args.samples, args.mix, args.seed, family)
    dataset_name = "iconqa" if args.mix == "iconqa" else "scienceqa"
    transform = ImageTransform(processor.image_processor, image_size, train=True)
    dataset = QADataset(records, None, dataset_name, transform, seed=args.seed)
    collator = TrainCollator(processor, family, max_txt_len, settings.max_output_txt_len)
    collators = {"static": StaticPadCollator(collator), "dynamic": collator, "grouped": collator}
    lengths = prompt_tokens(processor, records, dataset_name, max_txt_len)

    loss_diff = check_padding_invariance(model, dataset, collators, lengths, args.batch_size, args.seed, device,
                                         family)

    result = {"family": family, "experiment": experiment.id, "model": preset["name"],
              "trainable_params": sum(p.numel() for p in trainable),
              "total_params": sum(p.numel() for p in model.parameters()),
              "max_txt_len": max_txt_len, "batch_size": args.batch_size, "batches": args.batches,
              "prompt_tokens": {"mean": statistics.mean(lengths), "median": statistics.median(lengths),
                                "min": min(lengths), "max": max(lengths),
                                "share_at_max_txt_len": sum(n >= max_txt_len for n in lengths) / len(lengths)},
              "max_per_sample_loss_diff": loss_diff, "modes": {}}
    memory = SavedActivations(model)
    pick = random.Random(args.seed + 1)
    loaders, stats = {}, {}
    for mode in MODES:
        all_batches = mode_batches(mode, records, dataset_name, args.batch_size, args.seed)
        chosen = pick.sample(all_batches, min(args.batches, len(all_batches)))
        # The first batch is repeated as an untimed warm-up (allocators, kernels, worker start-up).
        loaders[mode] = iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=[chosen[0]] + chosen, collate_fn=collators[mode], num_workers=args.num_workers,
            pin_memory=device.type == "cuda"))
        stats[mode] = {"seconds": 0.0, "samples": 0, "widths": [], "losses": [], "memory": 0, "flops": 0}
    # Modes take turns batch by batch, so a machine shared with other work slows them alike.
    for step in range(args.batches + 1):
        for mode in MODES:
            st = stats[mode]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            batch = to_device(next(loaders[mode]), device)
            counter = FlopCounterMode(display=False) if args.count_flops else contextlib.nullcontext()
            with counter:
                with memory.step() if device.type == "cpu" else contextlib.nullcontext():
                    loss = model(**batch).loss
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            used = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else memory.total
            st["memory"] = max(st["memory"], used)
            if step > 0:
                st["seconds"] += elapsed
                st["samples"] += batch["input_ids"].shape[0]
                st["widths"].append(batch["input_ids"].shape[1])
                st["losses"].append(loss.detach())
                if args.count_flops:
                    st["flops"] += counter.get_total_flops()
    for mode, st in stats.items():
        result["modes"][mode] = {
            "samples_per_s": st["samples"] / st["seconds"], "seconds": st["seconds"],
            "mean_llm_width": statistics.mean(st["widths"]), "peak_memory_mb": st["memory"] / 2**20,
            "memory_kind": "cuda peak allocated" if device.type == "cuda" else "activations saved for backward",
            "mean_loss": float(torch.stack(st["losses"]).mean()),
            "gflop_per_sample": st["flops"] / st["samples"] / 1e9 if args.count_flops else None,
        }
    base, dyn = result["modes"]["static"]["samples_per_s"], result["modes"]["dynamic"]["samples_per_s"]
    result["speedup_grouped_vs_static"] = result["modes"]["grouped"]["samples_per_s"] / base
    result["speedup_dynamic_vs_static"] = dyn / base
    result["speedup_grouped_vs_dynamic"] = result["modes"]["grouped"]["samples_per_s"] / dyn
    if args.count_flops:
        result["flop_ratio_static_vs_grouped"] = (result["modes"]["static"]["gflop_per_sample"]
                                                  / result["modes"]["grouped"]["gflop_per_sample"])
        result["flop_ratio_static_vs_dynamic"] = (result["modes"]["static"]["gflop_per_sample"]
                                                  / result["modes"]["dynamic"]["gflop_per_sample"])
    return result


def report(result: dict) -> None:
    r, p = result, result["prompt_tokens"]
    print(f"\n== {r['model']} (experiment {r['experiment']}), trainable {r['trainable_params']:,} of "
          f"{r['total_params']:,} params; batch {r['batch_size']}, {r['batches']} timed batches per mode")
    print(f"prompt tokens: mean {p['mean']:.1f}, median {p['median']}, range {p['min']}-{p['max']}, "
          f"{100 * p['share_at_max_txt_len']:.0f}% cut at max_txt_len={r['max_txt_len']}")
    print(f"per-sample loss, static-padded vs grouped dynamic batches: max |diff| = "
          f"{r['max_per_sample_loss_diff']:.2e}")
    print(f"{'mode':<8} {'samples/s':>10} {'LLM width':>10} {'memory MB':>10} {'GFLOP/sample':>13}  memory measured")
    for mode, m in r["modes"].items():
        gflop = f"{m['gflop_per_sample']:.2f}" if m["gflop_per_sample"] is not None else "-"
        print(f"{mode:<8} {m['samples_per_s']:>10.2f} {m['mean_llm_width']:>10.1f} {m['peak_memory_mb']:>10.1f} "
              f"{gflop:>13}  {m['memory_kind']}")
    print(f"speedup: grouped vs static {r['speedup_grouped_vs_static']:.2f}x, dynamic vs static "
          f"{r['speedup_dynamic_vs_static']:.2f}x, grouped vs dynamic {r['speedup_grouped_vs_dynamic']:.2f}x")
    if "flop_ratio_static_vs_grouped" in r:
        print(f"compute per sample (FLOPs): static / grouped {r['flop_ratio_static_vs_grouped']:.2f}x, "
              f"static / dynamic {r['flop_ratio_static_vs_dynamic']:.2f}x")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny presets, few batches: a smoke run in seconds")
    ap.add_argument("--family", nargs="+", choices=["t5", "llama"], default=["t5", "llama"])
    ap.add_argument("--mix", choices=["scienceqa", "iconqa"], default="scienceqa")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 (tiny: 4)")
    ap.add_argument("--batches", type=int, default=None, help="timed batches per mode (default 8; tiny 2)")
    ap.add_argument("--samples", type=int, default=800, help="records in the epoch the batches come from")
    ap.add_argument("--max-txt-len", type=int, default=None, help="default: params/data.yaml (tiny: preset)")
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--count-flops", action=argparse.BooleanOptionalAction, default=None,
                    help="count FLOPs of every timed step (default: on CPU only; it adds Python overhead)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    args.batch_size = args.batch_size or (4 if args.tiny else 8)
    args.batches = args.batches or (2 if args.tiny else 8)
    if args.tiny:
        args.samples = min(args.samples, 64)
    device = torch.device(args.device)
    if args.count_flops is None:
        args.count_flops = device.type == "cpu"
    torch.manual_seed(args.seed)
    print(f"machine: {machine(device)}; mix {args.mix}; fp32; num_workers {args.num_workers}")
    results = {"machine": machine(device), "mix": args.mix, "num_workers": args.num_workers,
               "results": []}
    for family in args.family:
        result = run_family(family, args, device)
        report(result)
        results["results"].append(result)
    if args.json:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
