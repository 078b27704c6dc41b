"""``step37-deploy``: the command line over the pipeline stages.

Every long command shows progress bars and logs at INFO; ``--quiet`` silences both.  Exit status:
0 success; 1 a missed accuracy threshold; 2 an error the user can cause (a bad argument or file:
:class:`~step37_deploy.errors.Step37Error`, one line naming it); 3 anything unexpected (one line
``internal error``, the traceback with ``--verbose``); 4 ``serve`` only: a served process crashed or
stalled and the whole server was taken down (:class:`~step37_deploy.errors.ServerCrashed`), for a
supervisor to restart it.  Heavy modules (torch, onnx, TensorRT) are
imported inside the commands, so ``--help`` answers at once.

One module per command family, each holding its parsers and the handlers that run them side by
side (pip's ``commands/``): it has ``register(sub)``, which adds its subcommands and sets each one's
``func(args, progress) -> exit status``.  Shared pieces: :mod:`.args` (parser classes, help
formatter, argument types) and :mod:`.options` (option groups several commands take).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import traceback
import warnings

from ..errors import ServerCrashed, Step37Error, ThresholdError
from . import accuracy, artifacts, corpus, embed, handoff, loadtest, model, serving
from .args import USAGE_ERROR, HelpFormatter, Parser, SubcommandParser, one_line

log = logging.getLogger("step37_deploy")

EXIT_OK, EXIT_THRESHOLD, EXIT_USER_ERROR, EXIT_INTERNAL = 0, 1, USAGE_ERROR, 3
#: ``serve``: a served process crashed or stalled and the server was taken down (restart it).
EXIT_CRASH = 4

#: The command families, in the order ``--help`` lists their commands.
FAMILIES = (model, artifacts, accuracy, embed, serving, loadtest, handoff, corpus)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="step37-deploy",
        description=__doc__.splitlines()[0],
        epilog="exit status: 0 ok, 1 accuracy threshold missed, 2 bad argument or input, 3 internal error",
    )
    # Every subcommand (those added later included) shows each option's default in its --help.
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=functools.partial(SubcommandParser, formatter_class=HelpFormatter),
    )
    for family in FAMILIES:
        family.register(sub)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Third-party chatter (torch.onnx's registration notes, deprecation warnings): errors only
    # unless --verbose.
    # torch's ONNX exporter registration ("torchvision is not installed. Skipping torchvision::nms" x20):
    # named explicitly because importing torch resets the levels of its registered loggers (torch.onnx).
    for noisy in (
        "torch",
        "torch.onnx._internal.exporter._registration",
        "onnxscript",
        "onnx_ir",
        "polygraphy",
        "transformers",
    ):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    if not args.verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    progress = not args.quiet
    try:
        return args.func(args, progress)
    except ThresholdError as exc:
        print(f"step37-deploy: {one_line(exc)}", file=sys.stderr)
        return EXIT_THRESHOLD
    except ServerCrashed as exc:
        print(f"step37-deploy: crash: {one_line(exc)}", file=sys.stderr)
        return EXIT_CRASH
    except Step37Error as exc:
        print(f"step37-deploy: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("step37-deploy: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else " (run with --verbose for the traceback)"
        print(f"step37-deploy: internal error: {type(exc).__name__}: {one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_INTERNAL
