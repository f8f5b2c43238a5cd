"""``python -m mishkit info | plot``.

Subcommands live in a table: each maps to ``module:add_arguments`` and ``module:run``, so a new
one is one entry, and heavy modules (matplotlib) import only when used. The benchmark harness is
repository tooling outside the package: ``python -m benchmarks`` from a source checkout.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "info": ("mishkit.info", "versions, available backends (and why others are not), activations"),
    "plot": ("mishkit.plot", "draw activations, their derivatives and output landscapes"),
}
# Former subcommands -> where they went (said instead of argparse's "invalid choice").
MOVED = {"bench": "the benchmark harness lives outside the package now: run "
                  "`python -m benchmarks` from a mishkit source checkout"}


def main(argv: list[str] | None = None) -> int:
    if argv_command(argv) in MOVED:
        print(f"python -m mishkit {argv_command(argv)}: {MOVED[argv_command(argv)]}",
              file=sys.stderr)
        return 2
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
