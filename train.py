#!/usr/bin/env python
"""`python train.py ...` from a checkout: the same as `mednca train ...` (mednca_jax/cli/train.py)."""

import sys

from mednca_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
