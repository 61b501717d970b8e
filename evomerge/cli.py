"""The ``evomerge`` command.

Each subcommand lives in the module of the concept it drives and exposes two
functions: ``add_arguments(parser)`` and ``run(args) -> int``. They are imported
only when their command runs, so ``evomerge merge`` never pays for Ray or vLLM.
User errors (``EvomergeError``) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sqlite3
import sys

from evomerge.errors import EvomergeError

# command -> (module holding add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("evomerge.merge.command", "merge models from a mergekit-style YAML into OUT_DIR"),
    "eval": ("evomerge.tasks.command", "evaluate a model directory or a merge recipe on tasks"),
    "zoo": ("evomerge.zoo.command", "build the tiny model zoo used by the demo and the tests"),
    "search": ("evomerge.search.command_search", "run an evolutionary merge search from a config"),
    "resume": ("evomerge.search.command_resume", "continue a stopped or crashed search run"),
    "export": ("evomerge.search.export", "write chosen merges of a run as Hugging Face models"),
    "status": ("evomerge.search.command_status", "print the state of a search run"),
    "report": ("evomerge.search.report", "write plots and a Markdown summary of a run"),
    "estimators": ("evomerge.estimators.command", "benchmark fitness estimators on a response matrix"),
    "demo": ("evomerge.demo", "build the zoo and run the demo search end to end"),
}


def _command_name(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of the command ``argv`` names (default: sys.argv)."""
    parser = argparse.ArgumentParser(
        prog="evomerge", description="Evolve merges of language models and export the Pareto front."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    argv = sys.argv[1:] if argv is None else argv
    wanted = _command_name(argv)
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (keeps `evomerge merge` light).
        if name == wanted:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    debug = args.debug or os.environ.get("EVOMERGE_DEBUG") == "1"
    try:
        return int(args._module.run(args) or 0)
    except EvomergeError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, sqlite3.OperationalError) as exc:
        # A full disk is the user's to fix, not a bug: one line (outputs are atomic, so
        # whatever was being written is gone again).
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in str(exc)
        if not full or debug:
            raise
        where = getattr(exc, "filename", None)
        print(f"error: no space left on the device{f' (writing {where})' if where else ''}", file=sys.stderr)
        return 2


# Commands whose process may end without the interpreter's teardown: unloading torch and
# numba takes about a second, longer than many a merge, and by the time these return their
# output is complete, fsynced and renamed into place, with nothing left to close.
EXIT_WITHOUT_TEARDOWN = {"merge"}


def entry() -> None:
    """The console script: ``main()``, then for EXIT_WITHOUT_TEARDOWN commands a direct exit."""
    code = main()
    if _command_name(sys.argv[1:]) in EXIT_WITHOUT_TEARDOWN:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
