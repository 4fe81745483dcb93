"""The `instructblip-peft` command (also `python -m instructblip_peft`)."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import UserError


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
    for i in ids:
        row = account(i, args.preset)
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
    print(f"{args.dataset}: processed data in {out.parent} (executed notebook: {out})")
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

    result = runner.sweep(args.dataset, args.ids, args.preset, _overrides(args.param), args.outputs, args.processed,
                          shard=args.shard, force=args.force)
    print(f"sweep {args.dataset} {args.ids}: {len(result.finished)} finished, {len(result.skipped)} already "
          f"finished, {len(result.failed)} failed")
    for exp_id, message in result.failed:
        print(f"  failed {exp_id}: {message}", file=sys.stderr)
    return 1 if result.failed else 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructblip-peft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="trainable / LoRA / total parameter counts per experiment (real size, "
                                      "meta device: no download)")
    p.add_argument("ids", help="experiment IDs: 28, 1-64, 13,28,64 or a baseline name")
    p.add_argument("--preset", default=None, help="count on this preset instead of the experiment's real LLM")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
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

    p = sub.add_parser("preprocess", help="raw data -> processed splits (notebook 01)")
    p.add_argument("dataset", help="scienceqa, iconqa or custom")
    p.add_argument("--raw", default=None, help="raw data directory (default: the bundled sample, generated "
                                               "if missing); for scienceqa also hub:derek-thomas/ScienceQA")
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
                   help="run only every N-th ID starting at the K-th (1-based), e.g. one shard per GPU")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("analyze", help="collect every run into a table and figures (notebook 04)")
    p.add_argument("--outputs", default=None, help="the runs directory (default: params/paths.yaml)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="the whole pipeline on the bundled sample with the tiny presets "
                                    "(settings: params/runner.yaml)")
    p.add_argument("--outputs", default=None, help="the demo writes to OUTPUTS/demo/")
    p.set_defaults(func=cmd_demo)
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
