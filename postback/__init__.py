"""The `postback` command."""

import sys

# The exit status of a command stopped by Ctrl-C, as shells report it.
INTERRUPTED = 130


def main() -> None:
    """`postback ...`: a Ctrl-C at any moment, even while the command is still importing its
    modules, ends it with status 130 and no traceback."""
    try:
        from postback.cli import main as run

        run()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(INTERRUPTED)
