"""``python -m nf4lib``: the command line (see ``nf4lib/tools/cli.py``)."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
