"""Regenerate the tables and plots of a run or a sweep, and print the markdown table.

    uv run python scripts/report.py multirun/2026-11-25/10-00-00   # a -m sweep
    uv run python scripts/report.py outputs/2026-11-25/10-00-00    # one run

A sweep directory gets sweep_summary.md, sweep_summary.csv, sweep_points.csv and
privacy_utility.png; a run directory gets run_summary.md and a redrawn
metrics.png (see :mod:`fedsim.results.sweep`). A missing or unrecognised directory is
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from fedsim.errors import FedsimError
from fedsim.results.sweep import write_report

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    """Write the report of the directory given on the command line; print its markdown."""
    parser = argparse.ArgumentParser(
        prog="report.py", description="Tables and plots of a fedsim run or multirun sweep.")
    parser.add_argument("directory", help="a run directory (outputs/<date>/<time>) or a "
                                          "sweep directory (multirun/<date>/<time>)")
    args = parser.parse_args(argv)
    try:
        text, files = write_report(args.directory)
    except FedsimError as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(text)
    print("wrote " + ", ".join(str(f) for f in files if f.exists()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
