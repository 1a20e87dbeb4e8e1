"""``python -m nf4lib``: the command line (see ``nf4lib/_cli.py``)."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
