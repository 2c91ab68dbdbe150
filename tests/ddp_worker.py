"""Run by tests under torchrun: train through the runner, then save this rank's student state."""
import sys

import torch
from torch import distributed as dist

from opdf_torchdistill.cli.train import get_parser, run

if __name__ == '__main__':
    out_prefix, argv = sys.argv[1], sys.argv[2:]
    metrics, student, _ = run(get_parser().parse_args(argv))
    torch.save({k: v.detach().clone() for k, v in student.state_dict().items()}, f'{out_prefix}.rank{dist.get_rank()}.pt')
    dist.destroy_process_group()
