#!/usr/bin/env python
"""`python evaluate.py ...` from a checkout: the same as `mednca evaluate ...` (mednca_jax/cli/evaluate.py)."""

import sys

from mednca_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
