"""The probe: how live MPO cores (student) and weights (teacher) reach a torchdistill loss.

torchdistill losses see only the io_dict that forward hooks fill, so the probe is a parameter-free
module, attached to a model as the attribute ``<model>.opdf`` (not a registered child), whose output is ``{layer name: ProbeEntry}``. It is
*called* from a forward hook on every supported layer (not from the root module), so:

* ``forward_hook: {output: ['opdf']}`` is one path per model, however many layers there are;
* it keeps working when a stage redesigns the model with ``sequential:`` (the root is not called
  then, but the layers are), under DistributedDataParallel (hooks live inside the wrapped module),
  and across stages (torchdistill re-hooks the probe each stage);
* it adds no state_dict keys, so strict checkpoint reloads are unaffected.

Entries hold references to the model's own Parameters (cores or weights), looked up at call time,
so the alignment loss acts on the live cores and its gradient trains them. A layer stays in the
output once it has been called (a stage that runs part of the model reports that part first).
"""
from __future__ import annotations

from types import MappingProxyType

from torch import nn
from torch.nn.utils import parametrize

from ..alignment import ProbeEntry
from ..parametrization import MPOWeight
from ..surgery import mpo_modules, weight_sites

__all__ = ['OPDFProbe', 'attach_probe', 'PROBE_NAME']

PROBE_NAME = 'opdf'


class OPDFProbe(nn.Module):
    """Returns a read-only ``{name: ProbeEntry}`` view of every probed layer called so far."""

    def __init__(self):
        super().__init__()
        self._seen: dict[str, ProbeEntry] = {}
        self._view = MappingProxyType(self._seen)

    def forward(self, *entries: ProbeEntry):
        for entry in entries:
            self._seen[entry.name] = entry
        return self._view

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_seen'] = {}  # entries reference another model's tensors; a copy starts empty
        state['_view'] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._view = MappingProxyType(self._seen)

    def extra_repr(self) -> str:
        return f'{len(self._seen)} layers seen'


class _LayerHook:
    """Forward hook on one layer: reports its current weight tensors to the probe.

    It reads the tensors of the module it was registered on, not of the module that calls it: under
    DataParallel the caller is a per-GPU replica whose weights are fresh broadcast copies every step,
    while the original's are the stable tensors the loss should train (student) or cache (teacher).
    """

    def __init__(self, probe: OPDFProbe, module: nn.Module, sites):
        self.probe = probe
        self.module = module
        self.sites = sites

    def __call__(self, _caller, args, output):
        module = self.module
        entries = []
        for site in self.sites:
            mpo = None
            if parametrize.is_parametrized(module, site.tensor_name):
                plist = module.parametrizations[site.tensor_name]
                mpo = plist[0] if isinstance(plist[0], MPOWeight) else None
            if mpo is not None:
                tensors = tuple(getattr(plist, f'original{k}') for k in range(mpo.plan.num_cores))
                entries.append(ProbeEntry(site.name, site.kind, site.matrix_shape, tensors, mpo.plan,
                                          mpo.partner))
            else:
                entries.append(ProbeEntry(site.name, site.kind, site.matrix_shape, (getattr(module, site.tensor_name),)))
        self.probe(*entries)
        return None  # a hook that returns a value would replace the layer's output


def attach_probe(model: nn.Module) -> OPDFProbe:
    """Attach (once) an :class:`OPDFProbe` as ``model.opdf`` and hook every supported layer.

    Idempotent: torchdistill calls auxiliary model wrappers again at every stage.
    """
    existing = getattr(model, PROBE_NAME, None)
    if isinstance(existing, OPDFProbe):
        return existing
    if existing is not None:
        raise ValueError(f'{type(model).__name__} already has an attribute {PROBE_NAME!r} '
                         f'({type(existing).__name__}); cannot attach the OPDF probe')
    probe = OPDFProbe()
    # A plain attribute, not a registered child: containers such as nn.Sequential call every child in
    # their forward, and the probe must change neither the forward, nor module listings, nor state.
    object.__setattr__(model, PROBE_NAME, probe)
    by_module: dict[int, tuple[nn.Module, list]] = {}
    for module, site in weight_sites(model)[0]:
        by_module.setdefault(id(module), (module, []))[1].append(site)
    for _, module, _, p in mpo_modules(model):
        by_module.setdefault(id(module), (module, []))[1].append(p.site)
    for module, sites in by_module.values():
        module.register_forward_hook(_LayerHook(probe, module, sites))
    return probe
