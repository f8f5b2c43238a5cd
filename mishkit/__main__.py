"""``python -m mishkit info | plot | bench``.

Subcommands live in a table: each maps to ``module:add_arguments`` and ``module:run``, so a new
one is one entry, and heavy modules (matplotlib, the benchmark harness) import only when used.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "info": ("mishkit.info", "versions, available backends (and why others are not), activations"),
    "plot": ("mishkit.plot", "draw activations, their derivatives and output landscapes"),
    "bench": ("mishkit.bench", "kernel / BN+act / network speed and memory benchmarks"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mishkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(module_name=module_name)
        # argument definitions import lazily too: parse the chosen command's only
        if argv_command(argv) == name:
            importlib.import_module(module_name).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    return importlib.import_module(args.module_name).run(args) or 0


def argv_command(argv: list[str] | None) -> str | None:
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), None)


if __name__ == "__main__":
    sys.exit(main())
