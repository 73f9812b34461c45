"""Join the results of runs that were split over processes (other seeds or methods, otherwise the same options).

    python benchmarks/merge_results.py OUTDIR RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds a `results.json` written by `sdlora-cil` or `sdlora-clm`; OUTDIR gets the merged
`results.json`, `results.md` and the plots, as one process running every seed and method would have written them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sdlora_peft.continual.plots import write_plots
from sdlora_peft.continual.report import merge_results, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    missing = [str(run) for run in args.runs if not (run / "results.json").is_file()]
    if missing:
        parser.error(f"no results.json in {', '.join(missing)}; pass the folders that sdlora-cil/-clm wrote.")
    merged = merge_results([json.loads((run / "results.json").read_text()) for run in args.runs])
    write_results(merged, args.output)
    write_plots(merged, args.output)
    print(f"merged {len(args.runs)} runs into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
