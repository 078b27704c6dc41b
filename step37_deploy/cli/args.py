"""The argparse pieces every command uses: parsers whose usage errors are one line, the help
formatter that shows each option's default, number types that name the bad value, and hidden
aliases that keep an option's old name working after a rename.

Nothing here imports beyond the standard library: ``--help`` builds every command's parser.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

#: argparse's exit status for a usage error, which is the command line's ``EXIT_USER_ERROR``.
USAGE_ERROR = 2


def one_line(text: object) -> str:
    """``text`` with its line breaks and runs of spaces folded: every message the CLI prints is one line."""
    return " ".join(str(text).split())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to every option's help unless the text already states its default
    or the option is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            return text if "required" in text.lower() or not action.option_strings else f"{text} (required)"
        if "default" in text.lower():
            return text
        return super()._get_help_string(action) or ""


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, ``step37-deploy SUBCOMMAND: error: MESSAGE`` (exit 2), and no
    abbreviated options (``--over`` must not mean ``--overwrite``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        # A value such as "-1:1:8" (--batch) reads as a negative number, not as an unknown option,
        # so the option's own check names the problem instead of "expected one argument".
        self._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+(:-?\d+)+$")

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {one_line(message)}\n")


class SubcommandParser(Parser):
    """A subcommand's parser: an unknown option is refused here, so the message names the
    subcommand (the top parser would only say ``step37-deploy: error: unrecognized arguments``)."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras


# -- hidden aliases: an option's old name still works, warns once, and is not in --help -------------
class RenamedStore(argparse._StoreAction):
    """``store``, answering also to the old names :func:`add_old_name` gives it: the first use of an
    old name in a run prints one deprecation warning on stderr."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.old_names: tuple[str, ...] = ()
        self._warned = False

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        if option_string in self.old_names and not self._warned:
            self._warned = True
            new = self.option_strings[0]
            print(f"{parser.prog}: warning: {option_string} is deprecated, use {new} (same meaning)", file=sys.stderr)
        super().__call__(parser, namespace, values, option_string)


def add_old_name(parser: argparse.ArgumentParser, action: argparse.Action, old: str) -> None:
    """Let ``old`` set ``action`` (a :class:`RenamedStore`) on ``parser`` without listing it in
    ``--help``, in usage or in error messages, which name the new option only."""
    if not isinstance(action, RenamedStore) or old in parser._option_string_actions:
        raise ValueError(f"cannot make {old} an old name of {action.option_strings}")
    parser._option_string_actions[old] = action  # what argparse looks option strings up in
    action.old_names += (old,)


# -- argument types: a bad number is an argparse error (exit 2) naming the option ------------------
def int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lo`` (and <= ``hi``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(lo: float, hi: float, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [lo, hi] (or (lo, hi] with ``lo_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
            raise argparse.ArgumentTypeError(f"must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {text}")
        return value

    parse.__name__ = "number"
    return parse


def finite_above(lo: float, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number > ``lo`` (>= with ``inclusive``); inf and nan are refused,
    since an infinite tolerance or timeout would make a check that checks nothing."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (value == lo and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {lo:g}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)
PORT = int_at_least(0, 65535)
POSITIVE_FLOAT = finite_above(0)
NON_NEGATIVE_FLOAT = finite_above(0, inclusive=True)
