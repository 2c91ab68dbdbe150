#!/usr/bin/env python
"""GLUE knowledge distillation with OPDF (torchdistill's HF recipes). See opdf_torchdistill/cli/glue.py."""
import sys

from opdf_torchdistill.cli.glue import main

if __name__ == '__main__':
    sys.exit(main())
