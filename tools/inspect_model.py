#!/usr/bin/env python
"""Launcher for opdf_torchdistill.cli.inspect (see its docstring for usage)."""
import sys

from opdf_torchdistill.cli.inspect import main

if __name__ == '__main__':
    sys.exit(main())
