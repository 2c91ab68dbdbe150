#!/usr/bin/env python
"""Launcher for opdf_torchdistill.cli.ablate (see its docstring for usage)."""
import sys

from opdf_torchdistill.cli.ablate import main

if __name__ == '__main__':
    sys.exit(main())
