#!/usr/bin/env python
"""Launcher for opdf_torchdistill.cli.gradnorms (see its docstring for usage)."""
import sys

from opdf_torchdistill.cli.gradnorms import main

if __name__ == '__main__':
    sys.exit(main())
