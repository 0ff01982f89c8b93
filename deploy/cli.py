"""The ``d3`` command. Each step's package adds its own sub-commands (``add_commands(subparsers)``), so
this file only dispatches and turns expected errors into one clear line and exit status 2."""
from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order of `d3 --help`: model -> graph -> profile -> plan -> tiers -> traces -> deploy.
COMMAND_MODULES = [
    "partitioner.cli",
    "partitioner.plan_cli",
    "partitioner.edge_strategies.cli",
    "predictor.cli",
    "tiers.cli",
    "traces.cli",
    "deploy.commands",
    "deploy.testbed_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d3", description="Run a PyTorch CNN across device, edge cluster and cloud.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # that step is not built yet
                continue
            raise
        module.add_commands(subparsers)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    from partitioner.graph import ModelTraceError

    return (ValueError, KeyError, OSError, ModelTraceError, TimeoutError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.handler(args)
    except KeyboardInterrupt:
        print(f"d3 {args.command}: interrupted", file=sys.stderr)
        return 130
    except _expected_errors() as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"d3 {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
