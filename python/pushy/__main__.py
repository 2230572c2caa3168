"""``python -m pushy``: the pushy command line."""

__all__: list[str] = []

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
