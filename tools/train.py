#!/usr/bin/env python
"""Train / validate / test from a torchdistill YAML, with OPDF. See opdf_torchdistill/cli/train.py."""
import sys

from opdf_torchdistill.cli.train import main

if __name__ == '__main__':
    sys.exit(main())
