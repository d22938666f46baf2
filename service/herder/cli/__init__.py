"""The ``herder`` command line (the console script is ``herder.cli:main``).

``options`` is its grammar and environment, ``render`` what it prints, ``commands`` what
it does; each imports only the ones before it.
"""

from herder.cli.commands import main
from herder.cli.options import CliError, add_option, build_parser, env_var

__all__ = ["CliError", "add_option", "build_parser", "env_var", "main"]
