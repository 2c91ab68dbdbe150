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
so the alignment loss acts on the live cores and its gradient trains them.

Which layers are reported: those called since the loss last consumed the report (one training step),
so a stage that runs part of the model (``sequential:``) reports exactly that part, every step. A
change of grad mode (validation runs under ``no_grad``, training does not) also starts a fresh report,
so layers seen only by validation never leak into the next training step.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..alignment import ProbeEntry
from ..parametrization import MPOWeight
from ..surgery import mpo_cores, mpo_modules, weight_sites

__all__ = ['OPDFProbe', 'ProbeReport', 'attach_probe', 'PROBE_NAME']

PROBE_NAME = 'opdf'


class ProbeReport(Mapping):
    """The read-only ``{layer name: ProbeEntry}`` a probe returns, plus what the loss needs to know:
    ``expected`` (every MPO weight of the model, reported or not) and :meth:`consume`."""

    def __init__(self, probe: 'OPDFProbe'):
        self._probe = probe

    def __getitem__(self, name: str) -> ProbeEntry:
        return self._probe._seen[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._probe._seen)

    def __len__(self) -> int:
        return len(self._probe._seen)

    @property
    def expected(self) -> tuple[str, ...]:
        return self._probe.expected

    def consume(self) -> None:
        """Mark this step's report as used: the next layer call starts a new one."""
        self._probe._consumed = True


class OPDFProbe(nn.Module):
    """Returns a :class:`ProbeReport` of the layers called in the current pass (see module docstring)."""

    def __init__(self, expected: tuple[str, ...] = ()):
        super().__init__()
        self.expected = tuple(expected)
        self._seen: dict[str, ProbeEntry] = {}
        self._consumed = False
        self._grad_mode: bool | None = None
        self._report = ProbeReport(self)

    @property
    def entries(self) -> ProbeReport:
        return self._report


    def reset(self) -> None:
        self._seen.clear()
        self._consumed = False
        self._grad_mode = None

    def forward(self, *entries: ProbeEntry):
        grad_mode = torch.is_grad_enabled()
        if self._consumed or (self._grad_mode is not None and grad_mode != self._grad_mode):
            self.reset()
        self._grad_mode = grad_mode
        for entry in entries:
            self._seen[entry.name] = entry
        return self._report

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_seen'] = {}  # entries reference another model's tensors; a copy starts empty
        state['_report'] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._report = ProbeReport(self)

    def extra_repr(self) -> str:
        return f'{len(self._seen)} layers reported, {len(self.expected)} MPO weights'


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
                tensors = mpo_cores(module, site.tensor_name)
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
    mpo_layers = list(mpo_modules(model))
    probe = OPDFProbe(expected=tuple(p.site.name for _, _, _, p in mpo_layers))
    # A plain attribute, not a registered child: containers such as nn.Sequential call every child in
    # their forward, and the probe must change neither the forward, nor module listings, nor state.
    object.__setattr__(model, PROBE_NAME, probe)
    callers = _weight_readers(model)
    by_module: dict[int, tuple[nn.Module, list]] = {}
    for module, site in weight_sites(model)[0]:
        by_module.setdefault(id(module), (module, []))[1].append(site)
    for _, module, _, p in mpo_layers:
        by_module.setdefault(id(module), (module, []))[1].append(p.site)
    for module, sites in by_module.values():
        hooked = callers.get(id(module), module)
        hooked.register_forward_hook(_LayerHook(probe, module, sites))
    return probe


def _weight_readers(model: nn.Module) -> dict[int, nn.Module]:
    """Modules whose weight is read by a parent without calling them: ``MultiheadAttention`` uses
    ``out_proj.weight`` directly (``out_proj.forward`` never runs), so its hook goes on the parent."""
    readers = {}
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and isinstance(getattr(module, 'out_proj', None), nn.Module):
            readers[id(module.out_proj)] = module
    return readers
