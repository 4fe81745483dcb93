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
    if not args.json:
        print(f"{'ID':>20}  {'LLM':9} {'group':26} {'rank':>4} {'trainable':>13} {'LoRA':>12} "
              f"{'total':>15} {'% of full Q-Former FT':>22}")
    for i in ids:
        row = account(i, args.preset)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{row['experiment']:>20}  {row['llm']:9} {row['group']:26} {row['rank'] or '-':>4} "
                  f"{row['trainable_params']:>13,} {row['lora_params']:>12,} {row['total_params']:>15,} "
                  f"{100 * row['trainable_share_of_full_qformer']:>21.2f}%", flush=True)
    return 0


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
