"""`flowgrpo` command line. Each subcommand lives with the code it drives; this file only
collects them. A module offering commands defines `add_commands(subparsers)` and sets
`func=` on each parser; errors that users can fix are printed as one line, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that contribute top-level subcommands, in help order.
COMMAND_MODULES = [
    "flowgrpo.commands",  # train, pretrain, sample, bench
    "flowgrpo.plan",  # plan
    "flowgrpo.model_commands",  # preprocess, export
    "flowgrpo.eval.commands",  # eval shapes | generate | score | report
    "flowgrpo.eval.headroom",  # headroom
    "flowgrpo.rewards.server",  # serve-reward
    "flowgrpo.rewards.judge_server",  # serve-judge
    "flowgrpo.rewards.references",  # make-references
    "flowgrpo.worlds.shapes.proxy",  # make-proxy
    "flowgrpo.data_fetch",  # data fetch | list
]


class UserError(Exception):
    """Raised for bad input; printed as one line."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import PromptFileError
    from .data_fetch import DataFetchError
    from .eval.benchmarks import EvalError
    from .models.sd3 import ModelLoadError
    from .rewards.base import RewardError
    from .worlds.shapes.grammar import GrammarError

    return (UserError, CheckpointError, ConfigError, ModelLoadError, RewardError, GrammarError, PromptFileError,
            EvalError, DataFetchError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowgrpo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("flowgrpo"):
                continue  # a part of the package not present in this build
            raise
        mod.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .hf_quiet import quiet_third_party

    quiet_third_party()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except _user_error_types() as exc:
        print(f"flowgrpo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
