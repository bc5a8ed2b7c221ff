"""``python -m diffmem`` runs the command-line interface (also under ``accelerate launch -m``)."""

import sys

from diffmem.cli import main

if __name__ == "__main__":
    sys.exit(main())
