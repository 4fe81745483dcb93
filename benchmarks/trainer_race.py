"""Our training loop and ranking evaluation vs the generic route: transformers `Trainer` + peft.

Training. The same mid-size model (benchmarks/_models.py; experiment 32 on T5, 64 on LLaMA: Q-Former+LLM
LoRA rank 8, built by `lora.apply_experiment`, i.e. peft's `get_peft_model`), the same records, batch size,
learning rate, AdamW (betas, weight decay), no gradient clipping, fp32 on CPU, trained by

  ours     `instructblip_peft.train.train(...)`: the package's whole loop (accelerate, the exact-resume
           bookkeeping, a train_log.csv row every --log-every steps, a resumable checkpoint every
           --checkpoint-every steps);
  Trainer  `transformers.Trainer` on the same peft-wrapped model, fed by the package's `QADataset` and
           `TrainCollator` (as data collator), `optim="adamw_torch"`, a constant learning rate (ours is constant
           within an epoch), `logging_steps` and `save_steps` equal to ours.

Every prompt is longer than max_txt_len and every answer has the same number of tokens (checked), so every
batch of either loop has the same shapes whatever the order of the records. The two loops run in two
processes (--threads torch threads each) that take turns one step at a time (see TurnClock): a step's time
runs from getting the turn at its forward to handing it on at the next step's forward, so it includes the
loop's logging, checkpointing and data loading; model building and what follows the last step (train.train's
final evaluation, the results) are not timed. samples/s is counted over --steps steps after --warmup steps.
Taking turns step by step makes other load on the machine hit both loops alike.

Evaluation. Our `evaluate.evaluate` (vision encoder, Q-Former and T5 encoder once per question; LLaMA's
prompt key/value cache shared by the candidates) vs the Trainer route: every (question, candidate) pair is
one example, `TrainCollator` batches them (--eval-batch-size examples; ours: that many questions), and
`Trainer.predict` runs one full forward per example, reducing the logits to each row's summed
cross-entropy with `preprocess_logits_for_metrics`; the lowest-scoring candidate is the prediction. Both
without a vision cache (a run's first evaluation), alternated --repeats times, each one's fastest counts.

    python benchmarks/trainer_race.py                  # mid-size T5, CPU
    python benchmarks/trainer_race.py --family llama
    python benchmarks/trainer_race.py --quick          # tiny preset, a few steps (smoke run)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._models import machine, mid_preset, scienceqa_like_records, write_random_images  # noqa: E402
from instructblip_peft.config import params_dir, resolve_settings  # noqa: E402
from instructblip_peft.data.batches import (  # noqa: E402
    QADataset, TrainCollator, encode_prompts, encode_targets, load_image, make_transform)
from instructblip_peft.data.prompts import candidate_texts, render_prompt, target_text  # noqa: E402
from instructblip_peft.evaluate import evaluate  # noqa: E402
from instructblip_peft.experiments import get_experiment  # noqa: E402
from instructblip_peft.io import write_json  # noqa: E402
from instructblip_peft.lora import apply_experiment, trainable_parameters  # noqa: E402
from instructblip_peft.model import load_model, load_preset  # noqa: E402

EXPERIMENT = {"t5": "32", "llama": "64"}  # Q-Former+LLM LoRA all, rank 8
DATASET = "scienceqa"


# ---------------------------------------------------------------- data

def training_records(n: int, seed: int = 0) -> list[dict]:
    """ScienceQA-shaped records whose prompts all exceed max_txt_len (a long context) and whose answers are
    all "(x) solid": every batch then has the same shapes, in any order."""
    records = scienceqa_like_records(n, 4, seed=seed, context_words=400)
    for r in records:
        r["choices"][r["answer_index"]] = "solid"
        r["answer"] = target_text(r)
    return records


def write_processed(root: Path, splits: dict[str, list[dict]]) -> Path:
    """`root/scienceqa/` in the processed layout, images included, for train.train."""
    d = root / DATASET
    images = d / "images"
    for split, records in splits.items():
        for i, r in enumerate(records):
            r["question_id"] = f"{split}-{i}"
        write_random_images(records, images, seed=len(split))
        write_json(d / f"{split}.json", records)
    write_json(d / "manifest.json", {"dataset": DATASET, "source": "benchmark", "image_root": str(images.absolute()),
                                     "counts": {s: len(r) for s, r in splits.items()}, "options": {}, "dropped": {}})
    return d


def params_with(preset: dict, root: Path) -> Path:
    """A copy of params/ whose presets.yaml also holds `preset` (INSTRUCTBLIP_PEFT_PARAMS points at it)."""
    dest = root / "params"
    shutil.copytree(params_dir(), dest)
    presets = yaml.safe_load((dest / "presets.yaml").read_text())
    presets[preset["name"]] = {k: v for k, v in preset.items() if k != "name"}
    (dest / "presets.yaml").write_text(yaml.safe_dump(presets, sort_keys=False))
    return dest


def uniform_shapes(processor, records, family, settings) -> tuple[bool, int, int]:
    """(all prompts and answers tokenise to one length each, that prompt length, that answer length)."""
    enc = encode_prompts(processor, [render_prompt(r, DATASET) for r in records], settings.max_txt_len)
    targets = encode_targets(processor, [target_text(r) for r in records], family, settings.max_output_txt_len)
    llm, qformer, answers = ({len(x) for x in seqs} for seqs in (enc["input_ids"], enc["qformer_input_ids"], targets))
    return len(llm) == len(qformer) == len(answers) == 1, min(llm), min(answers)


# ---------------------------------------------------------------- timing

class TurnClock:
    """Makes two training loops, each in its own process, take turns one step at a time, and times each
    step of this process's loop.

    A global forward pre-hook (the same for both loops, whatever wraps the model) fires at every training
    forward of the InstructBLIP model, i.e. at the start of each step: there this process hands the turn to
    the other one and waits for it to come back. So a step's time (from getting the turn to handing it on at
    the next step's forward) covers everything the loop does in that step: forward, backward, optimizer,
    logging, checkpointing, the next batch's loading; the two loops' steps alternate, so other load on the
    machine hits both alike."""

    def __init__(self, mine, theirs, their_done):
        from transformers import InstructBlipForConditionalGeneration
        self.cls = InstructBlipForConditionalGeneration
        self.mine, self.theirs, self.their_done = mine, theirs, their_done
        self.step_seconds, self.got_turn = [], None

    def _hand_over(self):
        if not self.their_done.is_set():
            self.theirs.release()
            self.mine.acquire()
        self.got_turn = time.perf_counter()

    def __enter__(self):
        def hook(module, args):
            if isinstance(module, self.cls) and module.training and torch.is_grad_enabled():
                if self.got_turn is not None:
                    self.step_seconds.append(time.perf_counter() - self.got_turn)
                self._hand_over()
        self.mine.acquire()  # the first turn: set-up and the first step's data
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def samples_per_s(step_seconds: list[float], warmup: int, steps: int, batch_size: int) -> float:
    if len(step_seconds) < warmup + steps:
        raise RuntimeError(f"{len(step_seconds)} steps timed, {warmup + steps} needed")
    return steps * batch_size / sum(step_seconds[warmup: warmup + steps])


def race_process(name: str, ctx: dict, out: str, turns: dict, done: dict, results) -> None:
    """One loop of the race (a spawned process): train while taking turns with the other loop."""
    other = next(n for n in turns if n != name)
    torch.set_num_threads(ctx["threads"])
    try:
        with TurnClock(turns[name], turns[other], done[other]) as clock:
            (run_ours if name == "ours" else run_trainer)(ctx, Path(out))
        results.put((name, clock.step_seconds, None))
    except BaseException as e:  # reported by the parent
        results.put((name, None, f"{type(e).__name__}: {e}"))
    finally:
        done[name].set()
        turns[other].release()  # the other loop runs on alone


def race_training(ctx: dict, root: Path) -> dict[str, list[float]]:
    """Both loops, in two processes taking turns step by step: each one's step times."""
    import multiprocessing as mp

    # The target by its importable name (this file may run as __main__ or be loaded from its path).
    from benchmarks.trainer_race import race_process as target

    spawn = mp.get_context("spawn")
    names = ("ours", "Trainer")
    turns = {"ours": spawn.Semaphore(1), "Trainer": spawn.Semaphore(0)}  # ours sets up first
    done = {n: spawn.Event() for n in names}
    results = spawn.Queue()
    procs = [spawn.Process(target=target, args=(n, ctx, str(root / n), turns, done, results)) for n in names]
    for proc in procs:
        proc.start()
    out = {}
    for _ in names:
        name, seconds, error = results.get()
        if error:
            for proc in procs:
                proc.kill()
            raise RuntimeError(f"{name} loop failed: {error}")
        out[name] = seconds
    for proc in procs:
        proc.join()
    return out


def run_ours(ctx, out: Path) -> None:
    from instructblip_peft.train import train

    os.environ["INSTRUCTBLIP_PEFT_PARAMS"] = str(ctx["params"])  # this process only
    train(DATASET, ctx["experiment"], out, dataset_dir=ctx["data"], preset=ctx["preset"]["name"], progress=False,
          **ctx["overrides"])


def build_model(ctx):
    """The model as train.py builds it: the preset's random weights, LoRA seeded by the run's seed."""
    s = ctx["settings"]
    model, processor = load_model(ctx["preset"], dtype=torch.float32, device="cpu", seed=s.seed)
    torch.manual_seed(s.seed)
    model = apply_experiment(model, get_experiment(ctx["experiment"]))
    for p in trainable_parameters(model).values():
        p.data = p.data.float()
    return model, processor


def run_trainer(ctx, out: Path) -> None:
    from transformers import Trainer, TrainingArguments

    s, family = ctx["settings"], ctx["family"]
    model, processor = build_model(ctx)
    records = ctx["train_records"]
    dataset = QADataset(records, ctx["image_root"], DATASET, make_transform(processor, s, train=True), seed=s.seed)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=s.batch_size, max_steps=ctx["max_steps"],
        learning_rate=s.learning_rate, weight_decay=s.weight_decay, adam_beta1=s.adam_beta1,
        adam_beta2=s.adam_beta2, optim="adamw_torch", lr_scheduler_type="constant", max_grad_norm=0.0,
        logging_steps=s.log_every_steps, save_strategy="steps", save_steps=s.checkpoint_every_steps,
        dataloader_num_workers=s.num_workers, remove_unused_columns=False, use_cpu=ctx["device"] == "cpu",
        report_to="none", disable_tqdm=True, seed=s.seed)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=TrainCollator(processor, family, s.max_txt_len, s.max_output_txt_len))
    with contextlib.redirect_stdout(io.StringIO()):  # its per-log-step prints
        trainer.train()


# ---------------------------------------------------------------- evaluation

class CandidateExamples(torch.utils.data.Dataset):
    """One example per (question, candidate): what a Trainer user scores candidates with."""

    def __init__(self, records, image_root, transform):
        self.items = [(r, c) for r in records for c in candidate_texts(r)]
        self.image_root, self.transform = image_root, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        r, candidate = self.items[i]
        image = load_image(self.image_root, r.get("image"), self.transform.image_size)
        return {"pixel_values": self.transform(image), "prompt": render_prompt(r, DATASET), "target": candidate}


def trainer_scores(model, processor, records, image_root, settings, family, batch_size, device) -> list[list[float]]:
    from transformers import Trainer, TrainingArguments

    def summed_ce(logits, labels):  # per row: sum of the answer tokens' cross-entropies
        if family == "llama":
            logits, labels = logits[:, :-1], labels[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                               reduction="none")
        return ce.sum(-1)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_eval_batch_size=batch_size, remove_unused_columns=False,
                                 label_names=["labels"], use_cpu=device == "cpu", report_to="none", disable_tqdm=True)
        trainer = Trainer(model=model, args=args,
                          data_collator=TrainCollator(processor, family, settings.max_txt_len,
                                                      settings.max_output_txt_len),
                          preprocess_logits_for_metrics=summed_ce)
        out = trainer.predict(CandidateExamples(records, image_root, make_transform(processor, settings, train=False)),
                              ignore_keys=["vision_outputs", "qformer_outputs", "language_model_outputs"])
    flat = np.asarray(out.predictions).tolist()
    scores, k = [], 0
    for r in records:
        n = len(r["choices"])
        scores.append(flat[k:k + n])
        k += n
    return scores


def race_evaluation(ctx, root: Path, args) -> dict:
    s, family = ctx["eval_settings"], ctx["family"]
    model, processor = build_model(ctx)
    model.eval()
    records = scienceqa_like_records(args.eval_questions, 4, seed=5)
    write_random_images(records, root / "eval_images")
    image_root = root / "eval_images"

    def ours():
        return evaluate(model, processor, records, image_root, DATASET, s, family, progress=False)

    def generic():
        return trainer_scores(model, processor, records, image_root, s, family, args.eval_batch_size, ctx["device"])

    ours_t, generic_t = [], []
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate(model, processor, records[:2], image_root, DATASET, s, family, progress=False)  # warm-up
        trainer_scores(model, processor, records[:2], image_root, s, family, args.eval_batch_size, ctx["device"])
        for _ in range(args.repeats):
            t = time.perf_counter()
            result = ours()
            ours_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            scores = generic()
            generic_t.append(time.perf_counter() - t)
    assert len(result.predictions) == len(scores) == len(records)
    same = [p["predicted"] for p in result.predictions] == [min(range(len(x)), key=x.__getitem__) for x in scores]
    rel = max(abs(a - b) / max(abs(b), 1e-12) for p, x in zip(result.predictions, scores)
              for a, b in zip(p["scores"], x, strict=True))
    q = len(records)
    return {"questions": q, "candidates": sum(len(r["choices"]) for r in records),
            "ours_s": ours_t, "trainer_s": generic_t, "ours_qps": q / min(ours_t), "trainer_qps": q / min(generic_t),
            "speedup": min(generic_t) / min(ours_t), "same_predictions": same, "max_rel_score_diff": rel}


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["t5", "llama"], default="t5")
    ap.add_argument("--steps", type=int, default=None, help="timed steps of each loop (default 8; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads of each loop (they take turns; default: torch's, here %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--log-every", type=int, default=1, help="log_every_steps / logging_steps")
    ap.add_argument("--checkpoint-every", type=int, default=4, help="checkpoint_every_steps / save_steps")
    ap.add_argument("--eval-questions", type=int, default=None, help="default 8 (4 with --quick)")
    ap.add_argument("--eval-batch-size", type=int, default=8, help="questions (ours) / examples (Trainer) per batch")
    ap.add_argument("--repeats", type=int, default=None, help="evaluations of each kind (default 2; 1 --quick)")
    ap.add_argument("--no-eval", action="store_true", help="only the training race")
    ap.add_argument("--quick", action="store_true", help="tiny preset, a few steps: a smoke run")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 8)
    args.eval_questions = args.eval_questions or (4 if args.quick else 8)
    args.repeats = args.repeats or (1 if args.quick else 2)
    family, device = args.family, "cpu"
    preset = load_preset(f"tiny-{family}") if args.quick else mid_preset(family)
    max_steps = args.warmup + args.steps + 1
    overrides = {"batch_size": args.batch_size, "grad_accum_steps": 1, "max_steps": max_steps,
                 "log_every_steps": args.log_every, "checkpoint_every_steps": args.checkpoint_every,
                 "max_eval_samples": 4, "eval_batch_size": args.eval_batch_size, "max_grad_norm": None,
                 "num_workers": 0}  # mixed_precision auto: none on CPU
    exp = get_experiment(EXPERIMENT[family])
    settings = resolve_settings(DATASET, exp, preset, overrides)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine(device)}")
    results = {"family": family, "model": preset["name"], "experiment": exp.id, "batch_size": settings.batch_size,
               "learning_rate": settings.learning_rate, "warmup": args.warmup, "steps": args.steps,
               "threads": args.threads, "log_every": args.log_every, "checkpoint_every": args.checkpoint_every}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Enough records that the timed steps stay inside the first epoch (no evaluation among them).
        train_records = training_records(settings.batch_size * (max_steps + 2))
        data = write_processed(root / "processed", {"train": train_records, "val": training_records(4, seed=1),
                                                    "test": training_records(4, seed=2)})
        ctx = {"family": family, "experiment": exp.id, "preset": preset, "settings": settings, "overrides": overrides,
               "params": params_with(preset, root), "data": data, "image_root": data / "images", "device": device,
               "train_records": train_records, "warmup": args.warmup, "steps": args.steps, "max_steps": max_steps,
               "threads": args.threads,
               # evaluation (not train.train's val/test) takes every question
               "eval_settings": resolve_settings(DATASET, exp, preset, {**overrides, "max_eval_samples": None})}
        model, processor = load_model(preset)  # only its tokenizers count here
        uniform, prompt_len, answer_len = uniform_shapes(processor, train_records, family, settings)
        del model
        n_params = sum(p.numel() for p in build_model(ctx)[0].parameters())
        print(f"model {preset['name']} ({family}), experiment {exp.id}: {n_params / 1e6:.0f}M params; batch "
              f"{settings.batch_size}, lr {settings.learning_rate:g}, AdamW, fp32, {device}; prompts "
              f"{prompt_len} LLM tokens, answers {answer_len} (same in every batch: {uniform}); log every "
              f"{args.log_every} step(s), checkpoint every {args.checkpoint_every}; {args.warmup} warm-up + "
              f"{args.steps} timed steps each, taking turns step by step; {args.threads} torch thread(s)")
        seconds = race_training(ctx, root)
        rate = {name: samples_per_s(t, args.warmup, args.steps, settings.batch_size) for name, t in seconds.items()}
        for name, t in seconds.items():
            timed = t[args.warmup: args.warmup + args.steps]
            print(f"  {name:8s} step seconds " + " ".join(f"{x:.2f}" for x in timed)
                  + f"  -> {rate[name]:.2f} samples/s")
        # Steps i of the two loops ran back to back: their differences are paired measurements.
        timed = {n: t[args.warmup: args.warmup + args.steps] for n, t in seconds.items()}
        diffs = [a - b for a, b in zip(timed["ours"], timed["Trainer"])]
        mean = statistics.fmean(diffs)
        sem = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        results.update(uniform_shapes=uniform, step_seconds=seconds, ours_samples_per_s=rate["ours"],
                       trainer_samples_per_s=rate["Trainer"], train_ratio=rate["ours"] / rate["Trainer"],
                       paired_step_diff_s=[mean, sem])
        print(f"training: ours {rate['ours']:.2f} samples/s, Trainer + peft {rate['Trainer']:.2f} samples/s: ratio "
              f"{results['train_ratio']:.2f}x; step time ours - Trainer {mean:+.2f} s +- {sem:.2f} s (mean +- "
              f"standard error of the paired steps)")
        if not args.no_eval:
            ev = race_evaluation(ctx, root, args)
            results["eval"] = ev
            print(f"evaluation, {ev['questions']} questions ({ev['candidates']} candidates), no vision cache: "
                  f"ours {min(ev['ours_s']):.2f} s ({ev['ours_qps']:.2f} questions/s), Trainer.predict one forward "
                  f"per candidate {min(ev['trainer_s']):.2f} s ({ev['trainer_qps']:.2f} questions/s): speed-up "
                  f"{ev['speedup']:.2f}x; identical predictions: {ev['same_predictions']}; max relative score "
                  f"difference {ev['max_rel_score_diff']:.2e}")
    if args.json:
        write_json(args.json, results)
    ok = uniform and ("eval" not in results or (results["eval"]["same_predictions"]
                                                 and results["eval"]["max_rel_score_diff"] <= 1e-4))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
