"""``python -m optim4rl ...``: the same command line as the ``optim4rl`` script (no install needed)."""

import sys

from optim4rl.cli import main

if __name__ == "__main__":
    sys.exit(main())
