"""Write (or check) the configs of the ImageNet study, ``configs/ilsvrc2012/study/*.yaml``.

Each is a recipe of ``configs/ilsvrc2012/`` (KD, AT, CRD, with and without OPDF, ResNet-18 <- ResNet-34)
with only the data changed, so that no test image chooses anything:

* training on the ``fit`` part of ImageNet's training set: all of it but 50 images per class (1,231,167
  of 1,281,167 images; ``opdf_torchdistill.data.HeldOut``, a fixed seeded choice);
* ``train.val_data_loader`` (the best epoch and the learning-rate selection) on the ``holdout`` part
  (those 50,000 images, with the validation transform);
* ``test.test_data_loader`` on ImageNet's validation set (the report split), as in the recipe;
* CRD's memory bank sized for the fit part (``num_samples`` 1,231,167).

    python tools/ilsvrc2012_study_configs.py           # write them
    python tools/ilsvrc2012_study_configs.py --check   # exit status 1 if a committed one differs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ['kd', 'opdf-kd', 'at', 'opdf-at', 'crd', 'opdf-crd']
PER_CLASS, TRAIN_IMAGES, CLASSES = 50, 1281167, 1000
FIT_IMAGES = TRAIN_IMAGES - PER_CLASS * CLASSES

HEADER = """# The ImageNet study's {name} (configs/ilsvrc2012/study.yaml), written by tools/ilsvrc2012_study_configs.py
# from ../{name}-resnet18_from_resnet34.yaml with only the data changed: training on the fit part of
# ImageNet's training set (all but {per_class} images per class: {fit:,} images), the best epoch and the lr
# chosen on the held-out {held:,} (train.val_data_loader), tested on ImageNet's validation set (the report
# split){crd}. Diff the two files.
"""


def study_config(name: str) -> str:
    src = (ROOT / 'configs' / 'ilsvrc2012' / f'{name}-resnet18_from_resnet34.yaml').read_text()
    lines = src.splitlines()
    start = lines.index('  &imagenet_train ilsvrc2012/train: !import_call')
    val = lines.index('  &imagenet_val ilsvrc2012/val: !import_call')
    models = lines.index('models:')
    train_block = lines[start:val]
    head = train_block[:3]  # the anchor line, _name, _root
    assert train_block[3] == "    key: 'torchvision.datasets.ImageFolder'" and train_block[6] == \
        "        root: !join [*root_dir, '/train']", name
    wrapped = head + ["    key: 'opdf_torchdistill.data.HeldOut'", '    init:', '      kwargs:', "        part: 'fit'",
                      f'        per_class: &per_class {PER_CLASS}', '        split_seed: &split_seed 0',
                      '        dataset: !import_call', "          key: 'torchvision.datasets.ImageFolder'",
                      '          init:', '            kwargs:',
                      "              root: &train_root !join [*root_dir, '/train']"]
    wrapped += ['      ' + line for line in train_block[7:]]
    val_block = list(lines[val:models])
    while val_block and not val_block[-1].strip():
        val_block.pop()
    transform = val_block.index('        transform: !import_call')
    val_block[transform] = '        transform: &val_transform !import_call'
    holdout = ['  &imagenet_holdout ilsvrc2012/holdout: !import_call', "    key: 'opdf_torchdistill.data.HeldOut'",
               '    init:', '      kwargs:', "        part: 'holdout'", '        per_class: *per_class',
               '        split_seed: *split_seed', '        dataset: !import_call',
               "          key: 'torchvision.datasets.ImageFolder'", '          init:', '            kwargs:',
               '              root: *train_root', '              transform: *val_transform', '']
    out = lines[:start] + wrapped + val_block + holdout + lines[models:]
    loader = out.index('  val_data_loader:')
    assert out[loader + 1] == '    dataset_id: *imagenet_val', name
    out[loader + 1] = '    dataset_id: *imagenet_holdout'
    crd = ''
    for i, line in enumerate(out):
        if f'&num_samples {TRAIN_IMAGES}' in line:
            out[i] = line.replace(f'&num_samples {TRAIN_IMAGES}', f'&num_samples {FIT_IMAGES}')
            crd = f'; CRD\'s memory bank holds the fit part ({FIT_IMAGES:,} entries)'
    header = HEADER.format(name=name, per_class=PER_CLASS, fit=FIT_IMAGES, held=PER_CLASS * CLASSES, crd=crd)
    return header + '\n'.join(out) + '\n'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--check', action='store_true', help='compare with the committed files instead of writing')
    args = p.parse_args(argv)
    folder = ROOT / 'configs' / 'ilsvrc2012' / 'study'
    differ = []
    for name in RECIPES:
        path = folder / f'{name}-resnet18_from_resnet34.yaml'
        text = study_config(name)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                differ.append(str(path))
        else:
            folder.mkdir(exist_ok=True)
            path.write_text(text)
            print(f'wrote {path}')
    if differ:
        print('differ from tools/ilsvrc2012_study_configs.py: ' + ', '.join(differ), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
