"""How long `instructblip-peft demo` takes, and where the time goes.

Runs the demo once in a fresh process, as `make demo` does (into a temporary outputs directory unless
--outputs is given), then prints its wall time, the CPU time of all its processes, the largest process's
peak memory and the phase breakdown, all measured in this one run:

- preprocess, per dataset: the executed `01_preprocess` notebook;
- each run: `02_train` (its kernel start and import cell; then train(): training steps, evaluations and the
  rest, model construction and saving, from the run's metrics.json) and `03_results` (kernel start and
  import cell, then its cells);
- analysis: the executed `04_analysis` notebook.

Notebook times come from papermill's per-cell timings in the executed notebooks: "start-up" is the time
from the kernel's launch to the end of the notebook's import cell. With several runs at once (the demo's
`parallel_runs`) the phases overlap, so their sum exceeds the wall time.

    python benchmarks/demo_time.py                  # run the demo and report
    python benchmarks/demo_time.py --report DIR     # report on an existing demo directory (<outputs>/demo)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from instructblip_peft.artifacts import run_dirs  # noqa: E402
from instructblip_peft.config import load_yaml  # noqa: E402


def _time(stamp: str | None) -> datetime | None:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None


def notebook_times(path: Path) -> dict | None:
    """Seconds of an executed notebook: total, kernel (launch -> first cell), imports (the cell importing
    instructblip_peft), work (the rest); start/end as datetimes. None while it is still running."""
    nb = json.loads(path.read_text())
    meta = nb["metadata"].get("papermill", {})
    cells = [c for c in nb["cells"] if c["cell_type"] == "code" and c["metadata"].get("papermill", {}).get("start_time")]
    start, end = _time(meta.get("start_time")), _time(meta.get("end_time"))
    if start is None or end is None:
        return None
    total = (end - start).total_seconds()
    kernel = (_time(cells[0]["metadata"]["papermill"]["start_time"]) - start).total_seconds() if cells else 0.0
    imports = sum(c["metadata"]["papermill"].get("duration") or 0.0 for c in cells
                  if "instructblip_peft import" in "".join(c["source"]) or "from instructblip_peft" in "".join(c["source"]))
    return {"total": total, "kernel": kernel, "imports": imports, "work": total - kernel - imports,
            "start": start, "end": end}


def report(demo_dir: Path) -> dict:
    """The phase breakdown of a finished demo directory (<outputs>/demo)."""
    demo = load_yaml("runner.yaml")["demo"]
    names = load_yaml("runner.yaml")["notebooks"]
    processed = demo_dir / demo["processed_subdir"]
    phases = {"preprocess": {}, "runs": {}, "analysis": None}
    for dataset in demo["datasets"]:
        nb = processed / dataset / names["preprocess"]
        if nb.is_file() and notebook_times(nb):
            phases["preprocess"][dataset] = notebook_times(nb)
    for run in run_dirs(demo_dir):
        train_nb, results_nb = run.notebook("train"), run.notebook("results")
        if not (train_nb.is_file() and results_nb.is_file()):
            continue
        metrics = run.metrics() or {}
        t02, t03 = notebook_times(train_nb), notebook_times(results_nb)
        if not (t02 and t03):
            continue
        wall = metrics.get("wall_time_s") or 0.0
        steps, evals = metrics.get("train_time_s") or 0.0, metrics.get("eval_time_s") or 0.0
        phases["runs"][f"{run.path.parent.name} {run.path.name}"] = {
            "startup_02": t02["kernel"] + t02["imports"], "train_steps": steps, "eval": evals,
            "train_other": wall - steps - evals, "notebook_02_rest": t02["work"] - wall,
            "startup_03": t03["kernel"] + t03["imports"], "work_03": t03["work"],
            "total": (t03["end"] - t02["start"]).total_seconds(), "start": t02["start"], "end": t03["end"],
            "test_accuracy": metrics.get("test_accuracy"), "val_accuracy": metrics.get("val_accuracy"),
            "epochs_run": metrics.get("epochs_run")}
    nb = demo_dir / load_yaml("runner.yaml")["analysis_subdir"] / names["analysis"]
    if nb.is_file():
        phases["analysis"] = notebook_times(nb)  # None while still running
    return phases


def _span(items) -> float:
    items = list(items)
    if not items:
        return 0.0
    return (max(i["end"] for i in items) - min(i["start"] for i in items)).total_seconds()


def timeline(phases: dict, started: datetime, ended: datetime) -> list[tuple[str, float]]:
    """The demo's wall time as consecutive phases (they add up to the total)."""
    pre, runs, analysis = list(phases["preprocess"].values()), list(phases["runs"].values()), phases["analysis"]
    if not (pre and runs and analysis):
        return []
    marks = [("CLI start-up, sample check", started, min(p["start"] for p in pre)),
             ("preprocess (both datasets)", min(p["start"] for p in pre), max(p["end"] for p in pre)),
             ("planning the runs", max(p["end"] for p in pre), min(r["start"] for r in runs)),
             ("runs", min(r["start"] for r in runs), max(r["end"] for r in runs)),
             ("analysis", max(r["end"] for r in runs), analysis["end"]),
             ("results table, exit", analysis["end"], ended)]
    return [(name, (b - a).total_seconds()) for name, a, b in marks]


def print_report(phases: dict) -> None:
    pre, runs, analysis = phases["preprocess"], phases["runs"], phases["analysis"]
    print("\nphase                           seconds  (start-up = kernel launch + import cell)")
    for dataset, t in pre.items():
        print(f"  preprocess {dataset:20s} {t['total']:6.1f}  start-up {t['kernel'] + t['imports']:.1f}, "
              f"preprocessing and samples {t['work']:.1f}")
    print(f"  preprocess, wall              {_span(pre.values()):6.1f}")
    print(f"\n  {'run':30s} {'total':>6} {'02 start-up':>11} {'train':>6} {'eval':>6} {'other':>6} "
          f"{'03 start-up':>11} {'03 rest':>7}   test acc")
    for name, r in runs.items():
        other = r["train_other"] + r["notebook_02_rest"]
        acc = f"{100 * r['test_accuracy']:.1f}%" if r["test_accuracy"] is not None else "-"
        print(f"  {name:30s} {r['total']:6.1f} {r['startup_02']:11.1f} {r['train_steps']:6.1f} {r['eval']:6.1f} "
              f"{other:6.1f} {r['startup_03']:11.1f} {r['work_03']:7.1f}   {acc}")
    keys = ("startup_02", "train_steps", "eval", "startup_03", "work_03")
    sums = {k: sum(r[k] for r in runs.values()) for k in keys}
    other = sum(r["train_other"] + r["notebook_02_rest"] for r in runs.values())
    print(f"  {'sum of runs':30s} {sum(r['total'] for r in runs.values()):6.1f} {sums['startup_02']:11.1f} "
          f"{sums['train_steps']:6.1f} {sums['eval']:6.1f} {other:6.1f} {sums['startup_03']:11.1f} "
          f"{sums['work_03']:7.1f}")
    print(f"  runs, wall                    {_span(runs.values()):6.1f}")
    print("  (train: training steps; eval: every val/test evaluation; other: data and model set-up, saving, "
          "the loss plot)")
    if analysis:
        print(f"\n  analysis                      {analysis['total']:6.1f}  start-up "
              f"{analysis['kernel'] + analysis['imports']:.1f}, tables and figures {analysis['work']:.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outputs", default=None, help="run the demo into OUTPUTS/demo (default: a temporary "
                                                     "directory, removed afterwards)")
    ap.add_argument("--report", default=None, metavar="DIR", help="only report on an existing demo directory")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    result = {}
    if args.report:
        demo_dir = Path(args.report)
    else:
        tmp = None
        outputs = Path(args.outputs) if args.outputs else Path(tmp := tempfile.mkdtemp(prefix="demo-time-"))
        demo_dir = outputs / load_yaml("runner.yaml")["demo"]["outputs_subdir"]
        print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} CPUs usable, load average "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} before; Python {platform.python_version()}")
        start, started = time.monotonic(), datetime.now(timezone.utc)
        proc = subprocess.run([sys.executable, "-m", "instructblip_peft", "demo", "--outputs", str(outputs)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall, ended = time.monotonic() - start, datetime.now(timezone.utc)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gb": usage.ru_maxrss / 2**20,
                  "exit_code": proc.returncode}
        lines = proc.stdout.splitlines()
        if proc.returncode != 0:
            print("\n".join(lines[-30:]))
        print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} after")
        print(f"demo: {wall:.0f} s wall ({wall / 60:.1f} min), exit code {proc.returncode}; CPU time of all its "
              f"processes {result['cpu_s']:.0f} s; largest process's peak memory {result['peak_rss_gb']:.2f} GB")
    phases = report(demo_dir)
    if not args.report:
        steps = timeline(phases, started, ended)
        result["timeline"] = dict(steps)
        if steps:
            print("\nwall time, phase after phase: " + ", ".join(f"{name} {t:.1f} s" for name, t in steps))
    print_report(phases)
    if not args.report and not args.outputs:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        def plain(x):
            return x.isoformat() if isinstance(x, datetime) else x
        result["phases"] = json.loads(json.dumps(phases, default=plain))
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result.get("exit_code", 0)


if __name__ == "__main__":
    sys.exit(main())
