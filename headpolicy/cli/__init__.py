"""`headpolicy` command line: the only place that parses argv.

One module per subcommand (cli/compile.py, cli/eval.py, ...), each registering itself with
`@command`; shared argument types live in cli/args.py.

Exit codes: 0 success; 2 bad input (a HeadPolicyError, or a bad option: the one-line reason is
printed); 141 when the reader of stdout went away (`headpolicy inspect P | head -1`: quietly, as
a standard tool killed by SIGPIPE); 130 on Ctrl-C; 1 anything unexpected (a bug).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from headpolicy.errors import HeadPolicyError

# The subcommand modules, in --help order. Add yours here.
COMMAND_MODULES = [f"headpolicy.cli.{m}" for m in
                   ("compile", "eval", "generate", "export", "import_", "inspect", "diff", "attach")]  # fmt: skip

# 128 + SIGPIPE: what a shell reports for `cat`, `grep`... when the reader of their output exits
# first, so scripts with `set -o pipefail` see headpolicy behave like any other tool.
EXIT_BROKEN_PIPE = 141

_COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register `run(args) -> int` as subcommand `name`; `configure(parser)` adds its options."""

    def deco(run):
        _COMMANDS[name] = (configure or (lambda p: None), run, help)
        return run

    return deco


def build_parser() -> argparse.ArgumentParser:
    for mod in COMMAND_MODULES:
        importlib.import_module(mod)
    parser = argparse.ArgumentParser(prog="headpolicy", description="profile a causal LM, decide which KV heads "
                                     "keep the full cache, run it smaller")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (configure, run, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, where it can be caught, not at interpreter exit
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args._run(args) or 0)
    except HeadPolicyError as e:
        print(f"headpolicy {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"headpolicy {args.command}: interrupted", file=sys.stderr)
        return 130


def _stdout_to_devnull() -> None:
    """Python flushes stdout once more at exit; with the reader gone that would print 'Exception ignored'."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # stdout is no file descriptor (a test's capture): nothing reaches a pipe at exit


if __name__ == "__main__":
    sys.exit(main())
