"""Run by tests under torchrun: ``opdf-glue``'s command (guards, lock, DDP training, test), then save this
rank's trained student (its MPO cores) for the test to compare ranks."""
import sys

import torch
from torch import distributed as dist

from opdf_torchdistill.cli.glue import command, get_parser
from opdf_torchdistill.hf import core_state_dict

if __name__ == '__main__':
    out_prefix, argv = sys.argv[1], sys.argv[2:]
    result = command(get_parser().parse_args(argv))
    with core_state_dict(result['trained_student']):
        state = {k: v.detach().clone() for k, v in result['trained_student'].state_dict().items()}
    torch.save({'state': state, 'student': result['student'], 'validation': result['validation']},
               f'{out_prefix}.rank{dist.get_rank()}.pt')
    dist.destroy_process_group()
