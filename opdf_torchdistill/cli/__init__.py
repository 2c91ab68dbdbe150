"""Command-line programs (``tools/*.py`` are thin launchers of these; pip installs them as ``opdf-*``)."""
