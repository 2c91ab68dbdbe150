#!/usr/bin/env python
"""Launcher for opdf_torchdistill.cli.bench (see its docstring for usage)."""
import sys

from opdf_torchdistill.cli.bench import main

if __name__ == '__main__':
    sys.exit(main())
