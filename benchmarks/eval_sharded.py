"""Evaluation split across processes: two processes (each evaluating half) vs one, on the same records.

The script launches itself as a user launches training, `accelerate launch --multi_gpu --num_processes 2`
(on a machine without GPUs: two CPU processes in a gloo group), and inside that one launch alternates these
configurations on the same mid-size model and records:

  1 process, T threads     rank 0 evaluates every question alone (`evaluate(...)`, as a single-process run
                           does) with T torch threads, while rank 1 waits at a barrier (its CPU time there is
                           reported: ~0);
  1 process, T/2 threads   the same with T/2 threads (only when T > 1);
  2 processes, T/2 each    each rank evaluates every 2nd batch of the length-sorted order
                           (`evaluate(..., accelerator=...)`); the predictions are gathered in the records' order.

T is --threads (default: all CPUs, `os.cpu_count()`); each process's torch threads are set with
torch.set_num_threads before each timed evaluation (and OMP_NUM_THREADS=T/2 at launch). Two ratios:
  - 2 processes vs 1 process on the same T cores in total: what splitting gains over intra-op threading;
  - 2 processes vs 1 process at T/2 threads each: the split itself (ideal 0.5). On a machine shared with
    other work this one is the robust figure: a multi-threaded process stalls whenever one of its threads
    is descheduled (OpenMP waits for all at every parallel region), which inflates the first ratio's
    baseline.
The configurations take turns --repeats times, so other load on the machine hits all alike; each one's
fastest counts. Timed: from a barrier before the evaluation to the gathered result (the launch, model
building and a warm-up excluded). The vision cache is off (every evaluation encodes its images, as a run's
first epoch does).

    python benchmarks/eval_sharded.py                  # mid-size T5, CPU
    python benchmarks/eval_sharded.py --family llama --questions 32
    python benchmarks/eval_sharded.py --quick          # tiny preset, a few questions (smoke run)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._models import evaluation_model, machine, scienceqa_like_records, write_random_images  # noqa: E402
from instructblip_peft.evaluate import evaluate  # noqa: E402

PROCESSES = 2


def worker(args) -> None:
    """One process of the launch: alternate the configurations; rank 0 writes the figures."""
    import torch.distributed as dist
    from accelerate import Accelerator

    acc = Accelerator(cpu=args.device == "cpu")
    device = str(acc.device)
    model, processor, preset, settings = evaluation_model(args.family, args.quick, device, args.dtype,
                                                          args.batch_size)
    root = Path(args.workdir)
    records = json.loads((root / "records.json").read_text())
    share = max(1, args.threads // acc.num_processes)
    # name -> (processes, torch threads of each); "one-share" only when it differs from "one".
    configs = {"one": (1, args.threads), "one-share": (1, share), "split": (acc.num_processes, share)}
    if share == args.threads:
        del configs["one-share"]

    def run(processes, subset=None):
        return evaluate(model, processor, subset or records, root, "scienceqa", settings, args.family,
                        progress=False, accelerator=acc if processes > 1 else None)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        acc.wait_for_everyone()

    def timed(processes, threads, subset=None):
        """(result on rank 0, seconds from a barrier to all processes done, this process's CPU seconds)."""
        torch.set_num_threads(threads)
        sync()
        t, cpu = time.perf_counter(), time.process_time()
        result = run(processes, subset) if processes > 1 or acc.is_main_process else None
        sync()
        return result, time.perf_counter() - t, time.process_time() - cpu

    for processes, threads in configs.values():  # warm-up: allocator, kernels, thread pools
        timed(processes, threads, records[: processes * args.batch_size])
    seconds = {name: [] for name in configs}
    results, idle_cpu = {}, 0.0
    for _ in range(args.repeats):
        for name, (processes, threads) in configs.items():
            results[name], t, cpu = timed(processes, threads)
            seconds[name].append(t)
            if processes == 1 and not acc.is_main_process:
                idle_cpu = max(idle_cpu, cpu)

    idle = [None] * acc.num_processes
    dist.all_gather_object(idle, idle_cpu)
    if acc.is_main_process:
        one, split = results["one"], results["split"]
        best = {name: min(t) for name, t in seconds.items()}
        same = all([p["predicted"] for p in r.predictions] == [p["predicted"] for p in one.predictions]
                   for r in results.values())
        rel = max(abs(a - b) / max(abs(b), 1e-12) for r in results.values()
                  for p, q in zip(r.predictions, one.predictions) for a, b in zip(p["scores"], q["scores"]))
        out = {"family": args.family, "model": preset["name"],
               "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
               "questions": len(records), "candidates": args.candidates, "eval_batch_size": settings.eval_batch_size,
               "max_txt_len": settings.max_txt_len, "image_size": settings.image_size,
               "processes": acc.num_processes, "configs": configs, "seconds": seconds, "best": best,
               "ratio": best["split"] / best["one"],
               "ratio_same_threads": best["split"] / best.get("one-share", best["one"]),
               "same_predictions": same, "max_rel_score_diff": rel,
               "same_order": [p["question_id"] for p in split.predictions] == [r["question_id"] for r in records],
               "idle_rank_cpu_s": max(idle[1:]), "machine": machine(device).replace(
                   f"{torch.get_num_threads()} torch threads", f"{os.cpu_count()} CPUs")}
        Path(args.json).write_text(json.dumps(out, indent=1))
    acc.wait_for_everyone()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=["t5", "llama"], default="t5")
    ap.add_argument("--questions", type=int, default=None, help="default 16 (6 with --quick)")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=None, help="eval_batch_size (default 4; 2 with --quick)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads of the one process; each of the two gets half (default: all CPUs)")
    ap.add_argument("--repeats", type=int, default=None, help="turns of each configuration (default 2; 1 --quick)")
    ap.add_argument("--device", default="cpu", help="cpu (GPUs: each process takes one)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--quick", action="store_true", help="tiny preset and a few questions: a smoke run")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.questions = args.questions or (6 if args.quick else 16)
    args.batch_size = args.batch_size or (2 if args.quick else 4)
    args.repeats = args.repeats or (1 if args.quick else 2)
    if args.worker:
        worker(args)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        # The records and their images (one random 224 px picture per question), shared by both processes.
        records = scienceqa_like_records(args.questions, args.candidates, seed=3)
        write_random_images(records, tmp)
        (Path(tmp) / "records.json").write_text(json.dumps(records))
        figures = Path(tmp) / "figures.json"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(PROCESSES),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
               str(Path(__file__).resolve()), "--worker", "--workdir", tmp, "--json", str(figures),
               "--family", args.family, "--questions", str(args.questions), "--candidates", str(args.candidates),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--device", args.device, "--dtype", args.dtype] + (["--quick"] if args.quick else [])
        # Each process starts with T/2 OpenMP threads; the one-process turns raise rank 0's to T.
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // PROCESSES)))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:] + proc.stderr[-5000:], file=sys.stderr)
            return proc.returncode
        r = json.loads(figures.read_text())
    print(f"machine: {r['machine']}")
    print(f"model {r['model']} ({r['family']}): {r['params_m']:.0f}M params; {r['questions']} questions x "
          f"{r['candidates']} candidates, one image each, eval_batch_size {r['eval_batch_size']}, max_txt_len "
          f"{r['max_txt_len']}, image {r['image_size']}px, {args.device}, {args.dtype}, vision cache off")
    label = {"one": "1 process", "one-share": "1 process", "split": f"{r['processes']} processes"}
    for name, (processes, threads) in r["configs"].items():
        each = " each" if processes > 1 else ""
        print(f"{label[name] + ',':12s} {threads} torch thread(s){each:5s}: "
              + "  ".join(f"{t:7.2f}" for t in r["seconds"][name])
              + f" s  (best {r['best'][name]:.2f} s, {r['questions'] / r['best'][name]:.2f} questions/s)")
    print(f"(the idle rank used {r['idle_rank_cpu_s']:.2f} s of CPU while one process evaluated)")
    print(f"wall-time ratio, {r['processes']} processes / 1, the same {args.threads} cores in total: "
          f"{r['ratio']:.2f}x (speed-up {1 / r['ratio']:.2f}x)")
    if "one-share" in r["configs"]:
        print(f"wall-time ratio, {r['processes']} processes / 1, {r['configs']['split'][1]} thread(s) per process: "
              f"{r['ratio_same_threads']:.2f}x (the split itself; ideal {1 / r['processes']:.2f}x)")
    print(f"identical predictions: {r['same_predictions']}, in the records' order: {r['same_order']}; "
          f"max relative score difference {r['max_rel_score_diff']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    tol = 1e-4 if args.dtype == "fp32" else 2e-2
    return 0 if r["same_predictions"] and r["same_order"] and r["max_rel_score_diff"] <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
