"""What every job shares: common flags, the run wrapper, exit codes and --json output."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.logs import LOG_FORMATS, setup_logging
from imgfeat.core.ranges import range_of
from imgfeat.core.runs import RunRecord
from imgfeat.core.workspace import ENV_WORKSPACE, Workspace

log = logging.getLogger("imgfeat")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR_RATE = 0, 1, 2, 3


@dataclass
class JobContext:
    """Handed to every job handler: the workspace and this run's record."""

    ws: Workspace
    record: RunRecord

    @property
    def run_id(self) -> str:
        return self.record.run_id


# A handler returns its summary: a dict, or a typed summary with to_json() (what --json prints).
Handler = Callable[[argparse.Namespace, JobContext], Any]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep hand-wrapped descriptions and examples; show defaults only where they say something."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        quiet = default in (None, False, [], argparse.SUPPRESS) or "default" in text
        if quiet or action.option_strings == [] or isinstance(default, bool):
            return text
        return f"{text} (default: %(default)s)"


def common_parent() -> argparse.ArgumentParser:
    """Flags every subcommand accepts."""
    parent = argparse.ArgumentParser(add_help=False)
    g = parent.add_argument_group("common options")
    g.add_argument(
        "--workspace",
        metavar="DIR",
        default=None,
        help=f"workspace root (default: ${ENV_WORKSPACE}, else ./data)",
    )
    g.add_argument(
        "--json",
        action="store_true",
        help="print one JSON summary object on the last line of stdout",
    )
    g.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="stderr log format")
    g.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="stderr log level",
    )
    return parent


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    handler: Handler,
    help: str,
    description: str,
    epilog: str = "",
    record_run: bool = True,
) -> argparse.ArgumentParser:
    """Add a subcommand whose handler returns the summary dict for ``--json``."""
    p = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        parents=[common_parent()],
        formatter_class=HelpFormatter,
    )
    p.set_defaults(handler=handler, record_run=record_run)
    return p


def run_job(args: argparse.Namespace) -> int:
    """Call the handler; map the outcome to an exit code; write and print the summary."""
    setup_logging(args.log_level, args.log_format)
    ws = Workspace.resolve(args.workspace)
    record = RunRecord(command=args.command)
    error = None
    try:
        if args.record_run:  # the commands that read or write the workspace
            ws.check_usable()
        result = args.handler(args, JobContext(ws, record))
        record.summary.update(result.to_json() if hasattr(result, "to_json") else result or {})
        code = EXIT_OK
    except ImgfeatError as exc:
        code, error = exc.exit_code, str(exc)
        log.error("%s", exc)
    except KeyboardInterrupt:
        code, error = 130, "interrupted"
        log.error("interrupted")
    except Exception as exc:  # a bug or an unexpected environment: say it, exit 1
        code, error = EXIT_FAILED, f"{type(exc).__name__}: {exc}"
        log.exception("failed: %s", error)
    if args.record_run:  # kept in runs/ only when the workspace exists: never creates one
        obj = record.finish(ws, code, error)
    else:
        obj = {**record.summary, "exit_code": code, **({"error": error} if error else {})}
    if args.json:
        sys.stdout.flush()
        print(json.dumps(obj, default=str, ensure_ascii=False), flush=True)
    return code


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def add_wait(p: argparse.ArgumentParser, what: str) -> None:
    """``--wait SECONDS``: wait for a lock another process holds on ``what`` instead of exiting 1."""
    p.add_argument("--wait", type=seconds, metavar="SECONDS", default=None,
                   help=f"wait up to this long for another process writing {what}, instead of exiting at once")


def add_memory_budget(p: argparse.ArgumentParser) -> None:
    """``--memory-budget SIZE`` (``256MB``, ``2GiB``): bytes of features a stage holds at once."""
    from imgfeat.core.sizes import parse_size

    def size(text: str) -> int:  # the name tests/test_ranges.py knows it by
        try:
            return parse_size(text, "--memory-budget")
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(f"{str(exc).split(': ', 1)[1]}, got {text!r}") from None

    p.add_argument("--memory-budget", type=size, default=None, metavar="SIZE",
                   help="memory for features held at once, e.g. 256MB or 2GiB (default: a quarter of RAM)")


def add_trust_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a head saved by an older imgfeat as a joblib pickle (loading a pickle can "
                        "run code: only for head files you trust; retraining saves it without pickles)")


def ranged(key: str) -> Callable[[str], int | float]:
    """The argparse type of a numeric flag: parsed and checked against ``key``'s range in
    core/ranges.py, the same range its job-file key and config have (exit 2 naming the flag,
    the value and the range)."""
    rng = range_of(key)

    def parse(text: str) -> int | float:
        try:
            value = int(text) if rng.integer else float(text)
        except ValueError:
            value = None
        if value is None or not rng.allows(value):
            raise argparse.ArgumentTypeError(f"expected {rng.text()}, got {text!r}")
        return value

    parse.__name__ = key  # argparse names the type in some messages
    parse.range_key = key  # type: ignore[attr-defined]  # what the tests enumerate
    return parse


# A ``--wait`` value: a number of seconds, 0 to a week (never nan, inf or negative); every
# command's --wait has this one type.
seconds = ranged("wait")


def require(condition: bool, message: str) -> None:
    """Raise a usage error (exit 2) unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
