"""``python -m mednca_jax.cli COMMAND ...``: the ``mednca`` console script without installing it."""

import sys

from mednca_jax.cli import main

sys.exit(main())
