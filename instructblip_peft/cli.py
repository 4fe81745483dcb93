"""The `instructblip-peft` command (also `python -m instructblip_peft`)."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import UserError


def cmd_init(args) -> int:
    from .config import init_project, shipped_dir

    dest = init_project(args.dir)
    print(f"{dest}: params/ and notebooks/ copied from {shipped_dir()}, to edit. Commands run in this folder (or "
          f"below it) use them, and data/ and outputs/ go here. Next: instructblip-peft preprocess scienceqa")
    return 0


class _Version(argparse.Action):
    """--version: the version, where it comes from, and the params/ and notebooks/ folders in use."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from . import __version__
        from .config import notebooks_dir, params_dir, repository_url

        print(f"instructblip-peft {__version__} ({repository_url() or 'no repository URL'})\n"
              f"params:    {params_dir()}\nnotebooks: {notebooks_dir()}")
        parser.exit()


def cmd_params(args) -> int:
    from .accounting import account
    from .experiments import parse_ids

    ids = parse_ids(args.ids)
    if args.preset:  # an unknown preset is an error before the table starts, not after its header
        from .model import load_preset
        load_preset(args.preset)
    if not args.json:
        print(f"{'ID':>20}  {'LLM':9} {'group':26} {'rank':>4} {'trainable':>13} {'LoRA':>12} "
              f"{'total':>15} {'% of full Q-Former FT':>22}")
    overrides = _overrides(args.param)
    for i in ids:
        row = account(i, args.preset, overrides)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['experiment']:>20}  {row['llm']:9} {row['label']:26} {row['rank'] or '-':>4} "
                  f"{row['trainable_params']:>13,} {row['lora_params']:>12,} {row['total_params']:>15,} "
                  f"{100 * row['trainable_share_of_full_qformer']:>21.2f}%", flush=True)
    return 0


def _overrides(pairs) -> dict:
    return {k: v for k, v in (pairs or [])}


def cmd_preprocess(args) -> int:
    from . import runner

    out = runner.execute_preprocess(args.dataset, args.raw, args.processed, _overrides(args.param))
    if not args.raw:
        from .data.download import default_source_line
        print(f"{args.dataset}: {default_source_line(args.dataset)}")
    print(f"{args.dataset}: processed data in {out.parent} (executed notebook: {out})")
    return 0


def cmd_download(args) -> int:
    from .data.download import download, raw_root

    final = download(args.dataset, args.dest, args.url, progress=sys.stderr.isatty())
    raw = "" if final.parent == raw_root() else f" --raw {final}"
    print(f"{args.dataset}: data in {final}; next: instructblip-peft preprocess {args.dataset}{raw}")
    return 0


def cmd_run(args) -> int:
    from . import runner

    plan = runner.plan_run(args.dataset, args.id, args.preset, _overrides(args.param), args.outputs, args.processed)
    status = runner.execute_run(plan, force=args.force)
    if status == "skipped":
        print(f"{args.dataset} {plan.experiment}: already finished in {plan.directory} (--force to run again)")
    else:
        print(f"{args.dataset} {plan.experiment}: finished; metrics, predictions, weights and executed notebooks "
              f"in {plan.directory}")
    return 0


def cmd_sweep(args) -> int:
    from . import runner

    if args.status:
        from . import launch

        print(launch.format_status(args.dataset, launch.sweep_status(args.dataset, args.ids, args.outputs)))
        return 0
    if args.launcher:
        from . import launch

        slurm = {key: getattr(args, key) for key in launch.SLURM_FLAGS}
        result = launch.launch_sweep(args.dataset, args.ids, args.launcher, args.preset, _overrides(args.param),
                                     args.outputs, args.processed, shard=args.shard, force=args.force,
                                     jobs=args.jobs, slurm=slurm, wait=not args.no_wait)
    else:
        given = [flag for flag, value in (("--jobs", args.jobs), ("--no-wait", args.no_wait or None),
                                          *_slurm_flags_given(args)) if value is not None]
        if given:
            raise UserError(f"{given[0]} needs --launcher (local or slurm)")
        result = runner.sweep(args.dataset, args.ids, args.preset, _overrides(args.param), args.outputs,
                              args.processed, shard=args.shard, force=args.force)
    if result.submitted:
        print(f"sweep {args.dataset} {args.ids}: {len(result.submitted)} submitted, {len(result.skipped)} already "
              f"finished")
        return 0
    print(f"sweep {args.dataset} {args.ids}: {len(result.finished)} finished, {len(result.skipped)} already "
          f"finished, {len(result.failed)} failed")
    for exp_id, message in result.failed:
        print(f"  failed {exp_id}: {message}", file=sys.stderr)
    return 1 if result.failed else 0


def _slurm_flags_given(args) -> list:
    from .launch import SLURM_FLAGS

    return [(flag, getattr(args, key)) for key, flag in SLURM_FLAGS.items()]


def cmd_analyze(args) -> int:
    from . import runner

    out = runner.analyze(args.outputs)
    _print_results(out)
    return 0


def _print_results(analysis_dir) -> None:
    from .analysis import REPORT_FILES
    from .artifacts import notebook_name

    table = analysis_dir / REPORT_FILES["markdown"]
    if table.is_file():
        print(table.read_text(), end="")
    print(f"results table: {table} (and {REPORT_FILES['csv']}); figures: "
          f"{', '.join(str(p) for p in sorted(analysis_dir.glob('*.png')))}; "
          f"executed notebook: {analysis_dir / notebook_name('analysis')}")


def cmd_demo(args) -> int:
    import time

    from . import runner
    from .artifacts import notebook_name, shown_outputs

    start = time.monotonic()
    result = runner.run_demo(args.outputs, log=lambda line: print(line, flush=True))
    _print_results(result.analysis_dir)
    print(f"demo took {time.monotonic() - start:.0f} s")
    # With their defaults the notebooks show the demo's runs, unless it ran elsewhere or real runs exist.
    where = "" if shown_outputs()[0] == result.outputs_dir else \
        f" with outputs_dir = \"{result.outputs_dir}\" in its parameters cell"
    print(f"next: open notebooks/{notebook_name('analysis')} in JupyterLab (`make lab`) and Run All{where}: "
          f"these runs' table and figures; notebooks/{notebook_name('explore')} browses their predictions")
    for dataset, exp_id, message in result.failed:
        print(f"failed {dataset} {exp_id}: {message}", file=sys.stderr)
    return 1 if result.failed else 0


# ---------------------------------------------------------------- use and share a fine-tuned model

def cmd_predict(args) -> int:
    from .data.prompts import LETTERS
    from .predict import predict, predict_file

    single = [f"--{name}" for name in ("image", "question", "choice", "context")
              if getattr(args, name) not in (None, [])]
    if args.input:
        if single:
            raise UserError(f"predict: give either --input FILE or a single question, not both ({', '.join(single)} "
                            "with --input)")
        out, rows = predict_file(args.run, args.input, args.output, device=args.device)
        ranked = [r for r in rows if "correct" in r]
        right = sum(r["correct"] for r in ranked)
        score = f"; {right}/{len(ranked)} correct where answers were given" if ranked else ""
        print(f"{len(rows)} predictions written to {out}{score}")
        return 0
    if args.question is None:
        raise UserError("predict: give --question TEXT (with --image PATH and --choice A --choice B ...), or "
                        "--input FILE.jsonl")
    if args.output:
        raise UserError("predict: --output goes with --input FILE.jsonl")
    result = predict(args.run, args.question, args.choice, args.image, args.context or "", device=args.device)
    if "generated" in result:
        print(f"answer (generated): {result['generated']}")
        return 0
    width = max(len(c) for c in result["choices"]) + 4
    print(f"{'choice':<{width}}  {'score':>9}  {'share':>6}   (score: summed cross-entropy, lower is better)")
    for i, (choice, s, p) in enumerate(zip(result["choices"], result["scores"], result["probabilities"])):
        mark = "  <- answer" if i == result["predicted"] else ""
        print(f"{f'({LETTERS[i]}) {choice}':<{width}}  {s:>9.4f}  {p:>6.1%}{mark}")
    print(f"answer: {result['predicted_answer']}")
    return 0


def cmd_export(args) -> int:
    from .export import export, exported_files

    dest = export(args.run, args.dest, merged=args.merged)
    kind = "merged transformers checkpoint" if args.merged else "adapter folder"
    print(f"exported {args.run} to {dest} ({kind}): {', '.join(exported_files(dest))}")
    return 0


def cmd_push(args) -> int:
    from .export import push

    url = push(args.run, args.repo_id, private=args.private, merged=args.merged)
    print(f"pushed {args.run} to {url}")
    return 0


def _add_sharing_commands(sub) -> None:
    where = "a run directory, an exported folder or a hub repo id (owner/name)"
    p = sub.add_parser("predict", help="ask a finished run about an image: rank choices as evaluation does, or "
                                       "generate a free answer")
    p.add_argument("run", help=where)
    p.add_argument("--image", default=None, help="the picture (without it: the blank image of text-only questions)")
    p.add_argument("--question", default=None, help="the question")
    p.add_argument("--choice", action="append", default=[], metavar="TEXT",
                   help="a candidate answer (repeat: 2 to 5); none: generate a free answer")
    p.add_argument("--context", default=None, help="context text (ScienceQA's hint and lecture)")
    p.add_argument("--input", default=None, metavar="FILE.jsonl",
                   help="many questions, one JSON per line in the custom data format (answer_index and choices "
                        "optional; images relative to the file)")
    p.add_argument("--output", default=None, metavar="FILE.jsonl",
                   help="with --input: where the predictions go (default: beside it, <name>.predictions.jsonl)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="a finished run as a self-contained folder with a model card; --merged: "
                                      "a plain transformers checkpoint")
    p.add_argument("run", help=where)
    p.add_argument("dest", help="the new folder (must not exist)")
    p.add_argument("--merged", action="store_true",
                   help="merge LoRA into the base weights: loads with transformers alone")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="export a finished run and upload it to the Hugging Face Hub")
    p.add_argument("run", help=where)
    p.add_argument("repo_id", help="owner/name on the hub (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--merged", action="store_true", help="upload the merged checkpoint instead of the adapter")
    p.set_defaults(func=cmd_push)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructblip-peft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action=_Version, help="the version, and the params/ and notebooks/ folders in use")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="copy params/ and notebooks/ into a folder to edit; commands run there use them")
    p.add_argument("dir", nargs="?", default=".", help="the folder (default: the working directory)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("params", help="trainable / LoRA / total parameter counts per experiment (real size, "
                                      "meta device: no download)")
    p.add_argument("ids", help="experiment IDs: 28, 1-64, 13,28,64 or a baseline name")
    p.add_argument("--preset", default=None, help="count on this preset instead of the experiment's real LLM")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="a setting that changes the counts, e.g. -p peft_method dora")
    p.set_defaults(func=cmd_params)

    def run_options(p, preset_default):
        p.add_argument("--preset", default=preset_default,
                       help=f"model preset: auto (the experiment's real model), tiny, or a name from "
                            f"params/presets.yaml (default {preset_default})")
        p.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                       help="override a setting of params/train.yaml or data.yaml (repeatable)")
        p.add_argument("--outputs", default=None, help="runs go to OUTPUTS/<dataset>/<id>/ "
                                                       "(default: outputs_dir of params/paths.yaml)")
        p.add_argument("--processed", default=None, help="processed data directory (default: params/paths.yaml)")
        p.add_argument("--force", action="store_true", help="run again even if finished")

    p = sub.add_parser("download", help="fetch scienceqa or iconqa from the official sources (params/download.yaml);"
                                       " resumes an interrupted download")
    p.add_argument("dataset", help="scienceqa or iconqa")
    p.add_argument("--dest", default=None, help="put the data in DEST/<dataset>/ (default: raw_dir of "
                                                "params/paths.yaml, where preprocess finds it without --raw)")
    p.add_argument("--url", default=None, help="download from here instead (a mirror): for iconqa the archive's "
                                               "URL; for scienceqa, made of several files, a folder URL holding "
                                               "them under their names in params/download.yaml")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("preprocess", help="raw data -> processed splits (notebook 01)")
    p.add_argument("dataset", help="scienceqa, iconqa or custom")
    p.add_argument("--raw", default=None, help="raw data directory (default: the `download` in raw_dir of "
                                               "params/paths.yaml if there is one, else the bundled sample); for "
                                               "scienceqa also hub:derek-thomas/ScienceQA")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                   help="keep_text_only or skip_invalid (params/data.yaml)")
    p.add_argument("--processed", default=None, help="processed data directory (default: params/paths.yaml)")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("run", help="train and evaluate one experiment (notebooks 02, 03); resumes")
    p.add_argument("dataset")
    p.add_argument("id", help="experiment ID (1-64) or a baseline name")
    run_options(p, "auto")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="run many experiments: skips finished ones, resumes a partial one, "
                                     "continues past failures")
    p.add_argument("dataset")
    p.add_argument("ids", help="e.g. 1-32, 13,28,64 or 1-4,zeroshot-flant5xl")
    run_options(p, "auto")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run only every N-th ID starting at the K-th (1-based), e.g. one shard per machine "
                        "where there is no scheduler")
    p.add_argument("--launcher", choices=("local", "slurm"), default=None,
                   help="run each experiment as a task: slurm, one SLURM job array; local, up to --jobs processes "
                        "on this machine, one GPU each (default: one after another in this process). Settings: "
                        "params/launch.yaml")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="--launcher local: experiments at once (default: one per GPU; 1 without GPUs)")
    p.add_argument("--status", action="store_true",
                   help="show where each run stands (pending, running, stopped, failed, finished) and exit")
    p.add_argument("--no-wait", action="store_true",
                   help="--launcher slurm: return once the job array is submitted (see --status)")
    g = p.add_argument_group("Slurm (--launcher slurm; defaults in params/launch.yaml slurm:)")
    g.add_argument("--partition", default=None)
    g.add_argument("--gpus", type=int, default=None, help="GPUs per task: 1, or 0 on a CPU partition")
    g.add_argument("--cpus", type=int, default=None, help="CPUs per task")
    g.add_argument("--mem-gb", dest="mem_gb", type=float, default=None, help="host memory per task, in GB")
    g.add_argument("--time-min", dest="time_min", type=int, default=None,
                   help="time limit per task, in minutes (a task reaching it checkpoints and is requeued)")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None, help="node features, e.g. a100")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("analyze", help="collect every run into a table and figures (notebook 04)")
    p.add_argument("--outputs", default=None, help="the runs directory (default: params/paths.yaml)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="the whole pipeline on the bundled sample with the tiny presets "
                                    "(settings: params/runner.yaml)")
    p.add_argument("--outputs", default=None, help="the demo writes to OUTPUTS/demo/")
    p.set_defaults(func=cmd_demo)
    _add_sharing_commands(sub)
    for p in sub.choices.values():  # -v also after the subcommand; SUPPRESS keeps a -v given before it
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks for errors")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
