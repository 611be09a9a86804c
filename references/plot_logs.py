"""Training curves of one or more runs in one PNG: every loss (train, and validation when logged), lr and AP.

    python references/plot_logs.py work_dirs/run --out curves.png
    python references/plot_logs.py work_dirs/a work_dirs/b/log.jsonl --out compare.png    # one line per run

Reads each run's log.jsonl (one JSON object per epoch, plus the per-iteration ones train.py writes every
--print-freq steps, drawn as a thinner line) and draws it with report.plot_curves, the function train.py uses for the
curves of its report.md. matplotlib is optional for the project: pip install matplotlib.
From Python: plot_logs(paths, out_file).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where utils.py lives
from extras import report  # noqa: E402


def log_file(path):
    """A run folder (its log.jsonl) or a log file -> (run name for the legend, log file)."""
    path = Path(path)
    file = path / "log.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no training log at {file} (train.py writes OUTPUT_DIR/log.jsonl)")
    name = file.parent if file.name == "log.jsonl" else file.with_suffix("")
    return (str(name) if str(name) != "." else Path.cwd().name), file


def plot_logs(paths, out_file):
    """Write one PNG to `out_file` with the curves of every run in `paths` (run folders or log files)."""
    names, files = zip(*map(log_file, paths))
    try:
        drawn = report.plot_curves(list(files), out_file, names=list(names))
    except json.JSONDecodeError as e:  # typically the last line of a run killed while writing it
        raise ValueError(f"a line of {' or '.join(map(str, files))} is not JSON: {e}") from e
    if not drawn:
        raise ImportError("plot_logs needs matplotlib: pip install matplotlib")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_LOG", help="run folders (holding log.jsonl) or logs")
    parser.add_argument("--out", default="curves.png", help="PNG file to write (default curves.png)")
    return parser


def main(args):
    try:
        import matplotlib  # noqa: F401 -- only checks that the optional dependency is installed
    except ImportError:
        print("plot_logs needs matplotlib: pip install matplotlib", file=sys.stderr)
        sys.exit(2)
    try:
        plot_logs(args.runs, args.out)
    except (OSError, ValueError) as e:  # a missing log or output folder, a log line that is not JSON
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
