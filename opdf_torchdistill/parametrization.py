"""The ``torch.nn.utils.parametrize`` parametrization that turns a weight into a function of MPO cores.

``register_parametrization(module, 'weight', MPOWeight(...))`` keeps the module's class (a generated
subclass, so ``isinstance`` holds) and its path, so hooks and configs that name the module keep
working; the cores live at ``<module>.parametrizations.weight.original0..n-1``.

Caching (why: the contraction is the only extra cost of OPDF, so it must run at most once per need):

* while cores require grad and grad mode is on, the weight built for the current core versions is
  reused by every access until backward passes through it (a tensor hook drops it then, because
  the graph is freed), so a module called several times per step contracts once;
* otherwise (``eval()`` + ``no_grad``/``inference_mode``, or frozen cores) the weight is kept until a
  core changes: validation costs the same as the plain model.

A core "changes" when its version counter, storage or dtype changes; in-place optimizer updates,
``load_state_dict`` and ``.to()`` all do. Writes through ``param.data`` bypass the version counter:
call :func:`opdf_torchdistill.clear_caches` after such writes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import mpo
from .weight_sites import WeightSite, to_matrix
from .planning import MPOPlan

__all__ = ['MPOWeight', 'set_caching']

_CACHING = True


def set_caching(enabled: bool) -> bool:
    """Turn the weight caches on or off process-wide (for benchmarks and debugging); returns the old value."""
    global _CACHING
    previous, _CACHING = _CACHING, bool(enabled)
    return previous


def _version_key(cores: tuple[Tensor, ...]) -> tuple | None:
    try:
        return tuple((c.data_ptr(), c._version, c.dtype, c.device) for c in cores)
    except RuntimeError:  # inference tensors carry no version counter: never cache them
        return None


class MPOWeight(nn.Module):
    """``weight = reshape(reconstruct(cores), weight_shape)``; ``right_inverse`` decomposes.

    Args:
        plan: the factor shapes.
        site: the module/tensor this parametrizes (for names in logs and errors).
        frozen: indices of cores stored as buffers (never trained).
        initial_cores: cores already computed (e.g. in a thread pool) to use at registration instead
            of decomposing again; consumed by the first ``right_inverse`` call.
        requires_grad: whether the original weight was trainable (restored by ``contract``).
        param_order: the module's parameter names before surgery (restored by ``contract``).
        partner: the teacher layer this weight was planned against (``align_to``), if any.
    """

    def __init__(self, plan: MPOPlan, site: WeightSite, frozen: tuple[int, ...] = (),
                 initial_cores: list[Tensor] | None = None, requires_grad: bool = True,
                 param_order: tuple[str, ...] = (), partner: str | None = None):
        super().__init__()
        self.plan = plan
        self.site = site
        self.frozen = tuple(frozen)
        self.weight_requires_grad = requires_grad
        self.param_order = tuple(param_order)
        self.partner = partner
        self._initial_cores = initial_cores
        self.clear_cache()

    @property
    def layer_name(self) -> str:
        return self.site.name

    def clear_cache(self) -> None:
        self._graph_cache: tuple | None = None
        self._value_cache: tuple | None = None

    def _release_graph(self, _grad: Tensor) -> None:
        self._graph_cache = None

    def _contract(self, cores: tuple[Tensor, ...]) -> Tensor:
        device_type = cores[0].device.type
        if torch.is_autocast_enabled(device_type):
            # Reduced precision would compound along the chain of cores; the layer casts W itself.
            with torch.autocast(device_type, enabled=False):
                matrix = mpo.reconstruct(cores)
        else:
            matrix = mpo.reconstruct(cores)
        return matrix.reshape(self.site.weight_shape)

    def forward(self, *cores: Tensor) -> Tensor:
        if not _CACHING or torch.compiler.is_compiling():
            return self._contract(cores)
        builds_graph = torch.is_grad_enabled() and any(c.requires_grad for c in cores)
        key = _version_key(cores)
        cache = self._graph_cache if builds_graph else self._value_cache
        if key is not None and cache is not None and cache[0] == key:
            return cache[1]
        weight = self._contract(cores)
        if key is not None:
            if builds_graph:
                weight.register_hook(self._release_graph)
                self._graph_cache = (key, weight)
            else:
                self._value_cache = (key, weight)
        return weight

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, ...]:
        if self._initial_cores is not None:
            cores, self._initial_cores = self._initial_cores, None
            return tuple(cores)
        if tuple(weight.shape) != self.site.weight_shape:
            raise ValueError(f'{self.site.name}: cannot assign a weight of shape {tuple(weight.shape)} to an MPO '
                             f'planned for {self.site.weight_shape}')
        try:
            cores = mpo.decompose(to_matrix(weight), self.plan.row_factors, self.plan.col_factors, self.plan.max_bond)
        except mpo.MPOError as exc:
            raise mpo.MPOError(f'{self.site.name}: {exc}') from None
        return tuple(cores)

    def __getstate__(self):
        # Cached weights may carry autograd graphs, which neither deepcopy nor pickle accept.
        state = self.__dict__.copy()
        state['_graph_cache'] = None
        state['_value_cache'] = None
        state['_initial_cores'] = None
        return state

    def extra_repr(self) -> str:
        frozen = f', frozen={list(self.frozen)}' if self.frozen else ''
        return f'{self.plan.describe()}, bonds={list(self.plan.bonds)}{frozen}'
