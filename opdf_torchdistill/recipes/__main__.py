"""``python -m opdf_torchdistill.recipes [digits/kd_opdf ...]``: print the paths of shipped recipes."""
import sys

from . import main

sys.exit(main())
