#!/usr/bin/env python
"""The main job: teacher, KD and KD+OPDF students, export, comparison table on the embedded digits data.

See opdf_torchdistill/cli/demo.py."""
import sys

from opdf_torchdistill.cli.demo import main

if __name__ == '__main__':
    sys.exit(main())
