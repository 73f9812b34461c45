"""Join the results of runs that were split over processes (other seeds or methods, otherwise the same options).

    python benchmarks/merge_results.py OUTDIR RUN_DIR [RUN_DIR ...]

Each RUN_DIR is the OUTDIR of a `sdlora-cil` or `sdlora-clm` run: its `results.json`, or, for a run cut short, the
(method, seed) runs it finished. OUTDIR gets the merged `results.json`, `results.md` and the plots, as one process
running every seed and method would have written them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sdlora_peft.continual.plots import write_plots
from sdlora_peft.continual.report import merge_results, write_results
from sdlora_peft.continual.runs import finished_results


def read_run(folder: Path) -> dict:
    """A run's results; those of its finished (method, seed) runs if it was cut short."""
    results = folder / "results.json"
    return json.loads(results.read_text()) if results.is_file() else finished_results(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    try:
        merged = merge_results([read_run(run) for run in args.runs])
    except ValueError as error:
        parser.error(str(error))
    write_results(merged, args.output)
    write_plots(merged, args.output)
    print(f"merged {len(args.runs)} runs into {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
