"""Recipes shipped inside the package, so the main job runs from an installed wheel in any folder.

``digits/`` holds the digits recipes (teacher, student alone, KD, KD + OPDF and the ablation variants).
In a checkout it is a symbolic link to ``configs/digits/``, so the repository keeps one copy; a wheel
holds the files themselves. Checkpoint paths inside the recipes (``./runs/digits/...``) are relative to
the working directory, as in every torchdistill recipe.

    opdf-train --config "$(opdf-recipes digits/kd_opdf)"    # or python -m opdf_torchdistill.recipes
"""
from __future__ import annotations

import sys
from pathlib import Path

__all__ = ['ROOT', 'available', 'recipe_path']

ROOT = Path(__file__).parent


def available() -> list[str]:
    """Every shipped recipe as ``'<folder>/<name>'`` (no ``.yaml``), sorted."""
    return sorted(str(p.relative_to(ROOT).with_suffix('')) for p in ROOT.glob('*/*.yaml'))


def recipe_path(name: str) -> Path:
    """The file of a shipped recipe, ``'digits/kd_opdf'`` (``.yaml`` optional); unknown names are errors."""
    stem = name[:-len('.yaml')] if name.endswith('.yaml') else name
    path = ROOT / f'{stem}.yaml'
    if stem not in available():
        raise FileNotFoundError(f'no shipped recipe {name!r} in {ROOT}; shipped recipes: {", ".join(available())}')
    return path


def main(argv=None) -> int:
    """Print the path of each recipe named on the command line (all of them without arguments)."""
    names = sys.argv[1:] if argv is None else list(argv)
    try:
        paths = [recipe_path(n) for n in names] if names else [recipe_path(n) for n in available()]
    except FileNotFoundError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    print('\n'.join(str(p) for p in paths))
    return 0
