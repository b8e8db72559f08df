"""Every script's command line, parsed one way; and the settings schema a script's flags can be declared in.

    p = Parser(__doc__)
    p.add_argument("--data_path", default="data/train", help="...")
    p.add_argument("--seed", type=int, default=0, bounds=(0, 2**32 - 1), help="...")
    p.add_argument("--lr", type=float, default=1e-3, bounds=(Above(0), 10), help="...")
    args = p.parse_args(argv)

Flags are declared once, in the article's snake_case; the kebab spelling (`--data-path`) is accepted too.
`--help` shows each flag's default. A bad flag is one `error: ...` line and exit 2, like bad input
(isbi_unet/errors.py), instead of argparse's usage block.

Every numeric flag takes `bounds=(lo, hi)`: inclusive ends (`Above(x)`, `Below(x)` for open ones, None for
none), the value finite, checked as the command line is parsed, before any work; outside them it is
`error: argument --seed: must be an integer in 0..4294967295, got 4294967296; see --help`. Pick ends
the libraries accept (a NumPy seed is below 2**32) and caps where a value would exhaust the machine
(`CORES` for worker processes). `check_bounds` applies the same rule to a value from elsewhere (a file).

A script with many settings declares them as a frozen dataclass whose fields are `setting(...)`: help,
default, bounds, choices and whether a resumed run may change it. `parser_for(Schema, doc)` builds its
Parser and `parse(Schema, argv)` returns the values with the names of the flags given on the command line.
"""

import argparse
import dataclasses
import math
import os
import sys

from isbi_unet.process.runtime import BAD_INPUT, fail

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Above(float):
    """An open lower end: `bounds=(Above(0), 10)` takes 0 < value <= 10."""


class Below(float):
    """An open upper end: `bounds=(Above(0), Below(1))` takes 0 < value < 1."""


def describe(bounds, kind):
    """`an integer in 0..9`, `a finite number in (0, 10]`, `a finite number >= 0`."""
    lo, hi = bounds
    if kind is int and lo is not None and hi is not None:
        return f"an integer in {lo}..{hi}"
    what = "an integer" if kind is int else "a finite number"
    if lo is not None and hi is not None:
        return f"{what} in {'(' if isinstance(lo, Above) else '['}{lo:g}, {hi:g}{')' if isinstance(hi, Below) else ']'}"
    if lo is not None:
        return f"{what} {'>' if isinstance(lo, Above) else '>='} {lo:g}"
    return f"{what} {'<' if isinstance(hi, Below) else '<='} {hi:g}" if hi is not None else what


def within(value, bounds):
    lo, hi = bounds
    if not math.isfinite(value):
        return False
    low_ok = lo is None or (value > lo if isinstance(lo, Above) else value >= lo)
    return low_ok and (hi is None or (value < hi if isinstance(hi, Below) else value <= hi))


def bounds_problem(value, bounds, kind=float):
    """None when `value` lies within `bounds`, else `must be ..., got VALUE`."""
    return None if within(value, bounds) else f"must be {describe(bounds, kind)}, got {value}"


def check_bounds(flag, value, bounds, kind=float):
    """`--FLAG must be ..., got V` when `value` lies outside `bounds`, else None."""
    problem = bounds_problem(value, bounds, kind)
    return f"{flag} {problem}" if problem else None


class Bounded:
    """argparse `type` for a number within `bounds` (a bad one becomes argparse's one-line error)."""

    def __init__(self, kind, bounds):
        self.kind, self.bounds = kind, bounds
        self.__name__ = kind.__name__  # argparse names the type in `invalid int value: 'x'`

    def __call__(self, text):
        value = self.kind(text)
        problem = bounds_problem(value, self.bounds, self.kind)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and `(default: X)` after every help text whose flag has a default."""

    def _get_help_string(self, action):
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        shown = not hidden and "%(default)" not in text
        return f"{text} (default: %(default)s)" if shown and action.option_strings else text


class Parser(argparse.ArgumentParser):
    def __init__(self, doc, **kwargs):
        self.spellings = {}  # --lowercase_flag -> the flag as declared
        super().__init__(description=doc, formatter_class=HelpFormatter, **kwargs)

    def add_argument(self, *names, bounds=None, group=None, **kwargs):
        """argparse's, with `bounds` (see above) and `group` (an argument group of this parser to add it to)."""
        if bounds is not None:
            kwargs["type"] = Bounded(kwargs.get("type", float), bounds)
        action = (group or super()).add_argument(*names, **kwargs)
        self.spellings.update({option.lower(): option for option in action.option_strings})
        return action

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self.snake_case(arg) for arg in argv], namespace)

    def snake_case(self, arg):
        """`--data-path[=X]` becomes `--data_path[=X]`, and `--test-data-path` the article's `--Test_Data_path`,
        when that is one of this parser's flags."""
        if not arg.startswith("--") or "-" not in arg[2:].split("=", 1)[0]:
            return arg
        flag, eq, value = arg.partition("=")
        snake = "--" + flag[2:].replace("-", "_")
        return self.spellings[snake.lower()] + eq + value if snake.lower() in self.spellings else arg

    def error(self, message):
        fail(f"error: {message}; see --help", BAD_INPUT)


def setting(default=None, help="", bounds=None, choices=None, may_change=False, flag=True, group=None, stored=True):
    """A schema field: a flag `--NAME` (unless flag=False: a value the run derives) with its help, default (None
    for a recipe's), `bounds`, `choices`, whether a resumed run may change it, and whether records store it."""
    meta = dict(help=help, bounds=bounds, choices=choices, may_change=may_change, flag=flag, group=group)
    meta.update(stored=stored)
    return dataclasses.field(default=default, metadata=meta)


def kind(field):
    """A field's value type: int for `Optional[int]`."""
    args = getattr(field.type, "__args__", None)
    return args[0] if args else field.type


def flag_fields(schema):
    return [f for f in dataclasses.fields(schema) if f.metadata.get("flag")]


def parser_for(schema, doc):
    """The Parser of `schema`'s flags: every default SUPPRESSed, so that the namespace holds only flags given."""
    p = Parser(doc, argument_default=argparse.SUPPRESS)
    groups = {}
    for f in flag_fields(schema):
        meta, group = f.metadata, None
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = p.add_argument_group(meta["group"])
            group = groups[meta["group"]]
        shown = "" if f.default is None or f.default is False else f" (default: {f.default})"
        help_text = meta["help"].replace("%", "%%") + shown
        if kind(f) is bool:
            p.add_argument(f"--{f.name}", action="store_true", help=help_text, group=group)
        else:
            typed = dict(type=kind(f), bounds=meta["bounds"], choices=meta["choices"])
            p.add_argument(f"--{f.name}", **typed, help=help_text, group=group)
    return p


def parse(schema, doc, argv=None):
    """(every flag's value, the names of the flags given on the command line), defaults from `schema`."""
    given = vars(parser_for(schema, doc).parse_args(argv))
    values = {f.name: f.default for f in flag_fields(schema)}
    return dict(values, **given), frozenset(given)


def stored(settings):
    """A schema instance's stored fields, as a dict (what a record such as config.json holds)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.metadata["stored"]}


def may_change(schema):
    """The flags of `schema` a resumed run may change, in declaration order."""
    return tuple(f.name for f in flag_fields(schema) if f.metadata["may_change"])


def out_of_bounds(settings):
    """The first `--NAME must be ..., got V` among a schema instance's bounded fields, or None."""
    for f in dataclasses.fields(settings):
        value, bounds = getattr(settings, f.name), f.metadata.get("bounds")
        if bounds is not None and value is not None:
            problem = check_bounds(f"--{f.name}", value, bounds, kind(f))
            if problem:
                return problem
    return None
