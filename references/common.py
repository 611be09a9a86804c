"""What the scripts in references/ share: a parser that takes train.py's flags."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, where train.py lives
import train  # noqa: E402


def parser_with_train_flags(description):
    """An argument parser holding every train.py flag (dataset, model, weights, ...), so that a script reads data
    and builds models exactly as train.py does; the script's own flags of the same name replace train.py's."""
    return argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[train.get_args_parser(add_help=False)],
        conflict_handler="resolve",
    )
