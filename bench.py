"""Benchmarks: each mode measures one thing and compares against its baseline in the same run.

  python bench.py --mode data-prep ...   data_prep.py throughput vs a single-process tiktoken loop
  python bench.py --mode generate ...    generation with the KV cache vs recomputing the context

Every mode prints a table and, with --out FILE, writes its figures as JSON.
"""
import argparse
import json
import sys
from pathlib import Path

from cli import main_entry

MODES = {}  # mode name -> (add_arguments(parser), run(args) -> dict of figures)


def write_json(result: dict, out) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")


@main_entry
def main(argv=None):
    mode_parser = argparse.ArgumentParser(add_help=False)
    mode_parser.add_argument("--mode", choices=sorted(MODES), default="train" if "train" in MODES else None)
    known, _ = mode_parser.parse_known_args(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[mode_parser])
    parser.add_argument("--out", help="write the figures as JSON to this file")
    if known.mode:
        MODES[known.mode][0](parser)
    args = parser.parse_args(argv)
    if not args.mode:
        parser.error("choose a --mode")
    write_json(MODES[args.mode][1](args), args.out)


if __name__ == "__main__":
    main()
