"""Every script's command line, parsed one way.

    p = Parser(__doc__)
    p.add_argument("--data_path", default="data/train", help="...")
    args = p.parse_args(argv)

Flags are declared once, in the article's snake_case; the kebab spelling (`--data-path`) is accepted too.
`--help` shows each flag's default. A bad flag is one `error: ...` line and exit 2, like bad input
(isbi_unet/errors.py), instead of argparse's usage block.
"""

import argparse
import sys

from isbi_unet.errors import fail
from isbi_unet.runtime import BAD_INPUT


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and `(default: X)` after every help text whose flag has a default."""

    def _get_help_string(self, action):
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        shown = not hidden and "%(default)" not in text
        return f"{text} (default: %(default)s)" if shown and action.option_strings else text


class Parser(argparse.ArgumentParser):
    def __init__(self, doc, **kwargs):
        super().__init__(description=doc, formatter_class=HelpFormatter, **kwargs)

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
        declared = {option.lower(): option for option in self._option_string_actions}
        return declared[snake.lower()] + eq + value if snake.lower() in declared else arg

    def error(self, message):
        fail(f"error: {message}; see --help", BAD_INPUT)
