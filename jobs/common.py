"""What every job shares: common flags, the run wrapper, exit codes and --json output."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass
from typing import Any, TypeAlias

from imgfeat.core.errors import ConfigError, ImgfeatError
from imgfeat.core.logs import LOG_FORMATS, setup_logging
from imgfeat.core.options import Option, options
from imgfeat.core.ranges import RANGES, range_of
from imgfeat.core.results import JsonObject, Result
from imgfeat.core.runs import RunRecord
from imgfeat.core.sizes import parse_size
from imgfeat.core.stores import parse_storage_options, redact, set_storage_options
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


# A handler returns its summary: a typed stage result, or a JSON object (to_json() of it is what --json prints).
Summary: TypeAlias = "Result | JsonObject"
Handler = Callable[[argparse.Namespace, JobContext], "Summary | None"]


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
    g.add_argument(
        "--storage-option",
        action="append",
        dest="storage_option",
        default=[],
        metavar="KEY=VALUE",
        help="an object-store option for s3:// gs:// az:// paths, e.g. region=eu-west-1 (repeatable; "
        "credentials and endpoint come from the store's environment, e.g. AWS_ENDPOINT_URL)",
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
    record = RunRecord(command=args.command)
    error = None
    ws = None
    try:
        set_storage_options(parse_storage_options(getattr(args, "storage_option", None)))
        ws = Workspace.resolve(args.workspace)
        if args.record_run:  # the commands that read or write the workspace
            ws.check_usable()
        if getattr(args, "reads_workspace", args.record_run) and ws.mirror is not None:
            ws.mirror.pull()  # a workspace in a bucket: what it holds now (or exit 2 at once)
        result = args.handler(args, JobContext(ws, record))
        record.summary.update(result.to_json() if hasattr(result, "to_json") else result or {})
        code = EXIT_OK
    except ImgfeatError as exc:
        code, error = exc.exit_code, redact(str(exc))
        log.error("%s", error)
    except KeyboardInterrupt:
        code, error = 130, "interrupted"
        log.error("interrupted")
    except Exception as exc:  # a bug or an unexpected environment: say it, exit 1
        code, error = EXIT_FAILED, redact(f"{type(exc).__name__}: {exc}")
        log.exception("failed: %s", error)
    if args.record_run and ws is not None:  # kept in runs/ only when the workspace exists: never creates one
        obj = record.finish(ws, code, error)
        if ws.mirror is not None and ws.root.is_dir():
            try:
                ws.mirror.push()  # what the command wrote outside its locks, and its run record
            except ImgfeatError as exc:
                log.error("%s", redact(str(exc)))
                code = obj["exit_code"] = exc.exit_code
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
    p.add_argument(
        "--wait",
        type=seconds,
        metavar="SECONDS",
        default=None,
        help=f"wait up to this long for another process writing {what}, instead of exiting at once",
    )


def size(text: str) -> int:
    """``--memory-budget SIZE`` (``256MB``, ``2GiB``) in bytes (tests/test_ranges.py knows the name)."""
    try:
        return parse_size(text, "--memory-budget")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{str(exc).split(': ', 1)[1]}, got {text!r}") from None


SIZE_FIELDS = {"memory_budget": size}  # config fields whose flag reads a size, not a plain number


def add_trust_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a head saved by an older imgfeat as a joblib pickle (loading a pickle can "
        "run code: only for head files you trust; retraining saves it without pickles)",
    )


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


# A parser or an argument group: what add_config_flags adds to.
Adder = argparse.ArgumentParser | argparse._ArgumentGroup


def add_config_flags(
    p: Adder, config: type, names: Sequence[str] | None = None, types: dict[str, Callable[[str], Any]] | None = None
) -> None:
    """Add the flags of a stage config's ``opt`` fields (``names``, in that order; default: all of
    them in field order): flag, short alias, default from the dataclass, help, metavar, choices;
    a numeric field's type is ``ranged(field)``, a False default a switch; ``types`` overrides a
    field's type (a list flag's parser)."""
    opts = options(config)
    for name in names if names is not None else list(opts):
        _add_option(p, opts[name], (types or {}).get(name))


def _add_option(p: Adder, o: Option, parse: Callable[[str], Any] | None) -> None:
    flags = [o.short, o.flag] if o.short else [o.flag]
    if o.is_bool:
        p.add_argument(*flags, action="store_true", help=o.help)
        return
    kw: dict[str, Any] = {"required": True} if o.default is MISSING else {"default": o.default}
    if parse is None:
        parse = SIZE_FIELDS.get(o.name) or (ranged(o.name) if o.name in RANGES else None)
    if parse is not None:
        kw["type"] = parse
    if o.choices:
        kw["choices"] = o.choices
    if o.metavar:
        kw["metavar"] = o.metavar
    p.add_argument(*flags, help=o.help, **kw)


def config_values(config: type, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed values of ``config``'s flags that this command has, by field name."""
    return {name: getattr(args, o.dest) for name, o in options(config).items() if hasattr(args, o.dest)}
