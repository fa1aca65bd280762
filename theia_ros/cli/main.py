"""`theia-ros` command line: one entry point, one sub-command per module.

Each verb group is a module of theia_ros.cli that registers itself through a function
`add_parser(subparsers)` that sets `func` on its parser; this file only lists them.
"""
import argparse
import importlib
import sys

# module path of each sub-command provider, in the order `--help` lists them
SUBCOMMAND_MODULES = [
    "theia_ros.cli.model",
    "theia_ros.cli.backends",
    "theia_ros.cli.bags",
    "theia_ros.cli.distill",
    "theia_ros.cli.bringup",
    "theia_ros.cli.collect",
]


def build_parser():
    parser = argparse.ArgumentParser(prog="theia-ros", description="Theia visual features for ROS 2 robots.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a dependency of the provider is missing: say so, do not hide it
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
