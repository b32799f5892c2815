"""``neural-bone-reg``: one entry point with subcommands; each lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: Modules whose ``add_parsers(subparsers)`` contribute subcommands, in help order.
COMMAND_MODULES = (
    'neural_bone_reg.cli.commands',
    'neural_bone_reg.cli.bag_cmd',
    'neural_bone_reg.cli.demo_cmd',
)


def build_parser() -> argparse.ArgumentParser:
    """Return the CLI parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog='neural-bone-reg',
        description='Neural UDF + multi-hypothesis registration of intraoperative bone clouds '
                    'to a preoperative bone mesh (all lengths in mm).')
    parser.add_argument('-v', '--verbose', action='store_true', help='log debug messages')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # only a missing optional command module is skipped
            if exc.name != name:
                raise
            continue
        module.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format='%(levelname)s %(name)s: %(message)s')
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:  # InputError and CheckpointError are ValueErrors
        print(f'neural-bone-reg {args.command}: error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == '__main__':
    sys.exit(main())
