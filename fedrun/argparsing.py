"""The one command-line style of every ``fedrun`` subcommand: argparse, with its errors as
``ConfigError``.

argparse prints its usage and exits with code 2 by itself; fedrun's rule is one
``fedrun: error:`` line naming the option and the fix, said once (by rank 0 under torchrun), so
``ArgParser.error`` raises instead and ``fedrun.__main__`` reports it like any config error.
No torch here: a bad command line answers at once.
"""

from __future__ import annotations

import argparse
import re
from typing import NoReturn

from .errors import ConfigError


class ArgParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` for ``fedrun COMMAND``: no -h (``fedrun --help`` prints the
    usage of every command), no abbreviated options (``--max`` is not ``--max-members``), and
    a bad command line raises ConfigError with ``usage`` as the fix.

    An option's ``metavar`` is what an error calls a missing value ("--config: missing file name").
    """

    def __init__(self, command: str, usage: str):
        super().__init__(prog=f"fedrun {command}".strip(), usage=usage, add_help=False, allow_abbrev=False)
        self.command = command

    def error(self, message: str) -> NoReturn:
        missing = re.fullmatch(r"argument (\S+): expected one argument", message)
        if missing:
            action = self._option_string_actions.get(missing.group(1))
            what = action.metavar if action is not None and action.metavar else "value"
            message = f"{missing.group(1)}: missing {what}"
        elif message.startswith("argument "):
            message = message[len("argument "):]
        prefix = f"{self.command}: " if self.command else ""
        raise ConfigError(f"{prefix}{message}; usage: {self.usage}")
