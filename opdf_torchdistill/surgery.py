"""Module surgery: over-parameterize a model's weights as MPOs in place, and contract them back.

The PEFT-style lifecycle: :func:`overparameterize` (like ``get_peft_model``) selects weights by
pattern and type, plans their factors, decomposes them exactly and registers an
:class:`~opdf_torchdistill.parametrization.MPOWeight` parametrization on each; :func:`contract` (like
``merge_and_unload``) writes the contracted weights back as plain Parameters, after which the model
and its ``state_dict`` are exactly those of the never-modified architecture.

Checkpoints: an over-parameterized model saves its cores
(``<module>.parametrizations.weight.original<k>``); loading a *dense* checkpoint into it decomposes
each ``<module>.weight`` on the fly (a ``load_state_dict`` pre-hook), so dense ``src_ckpt`` flows work.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import mpo, planning
from .weight_sites import WeightSite, classify_module, to_matrix
from .matching import LayerInfo, resolve_match
from .options import MPOConfig, OptionError
from .parametrization import MPOWeight
from .planning import MPOPlan
from .report import LayerRow, OverparamReport, SkippedLayer

__all__ = ['overparameterize', 'plan', 'plan_alignment', 'contract', 'mpo_modules', 'mpo_cores', 'core_name',
           'core_state_keys', 'CORE_TAG', 'is_overparameterized', 'clear_caches',
           'weight_sites']

logger = logging.getLogger(__name__)

_DEFAULT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def _is_internal(name: str) -> bool:
    """Modules that parametrize itself adds (``x.parametrizations...``)."""
    return name == 'parametrizations' or name.startswith('parametrizations.') or '.parametrizations' in name


def weight_sites(model: nn.Module) -> tuple[list[tuple[nn.Module, WeightSite]], list[SkippedLayer]]:
    """Every supported weight of ``model`` and every unsupported weight matrix with its reason."""
    sites, skipped = [], []
    for name, module in model.named_modules():
        if _is_internal(name):
            continue
        found, skips = classify_module(module, name)
        sites.extend((module, site) for site in found)
        for tensor_name, reason in skips:
            if reason == 'already parametrized' and _mpo_of(module, tensor_name) is not None:
                reason = 'already over-parameterized'
            full = name if tensor_name == 'weight' else f'{name}.{tensor_name}' if name else tensor_name
            skipped.append(SkippedLayer(full, type(module).__name__, reason))
    return sites, skipped


def _mpo_of(module: nn.Module, tensor_name: str) -> MPOWeight | None:
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    first = module.parametrizations[tensor_name][0]
    return first if isinstance(first, MPOWeight) else None


def mpo_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, MPOWeight]]:
    """``(module_name, module, tensor_name, parametrization)`` for every MPO weight of ``model``."""
    for name, module in model.named_modules():
        if _is_internal(name) or not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations.keys()):
            p = _mpo_of(module, tensor_name)
            if p is not None:
                yield name, module, tensor_name, p


#: Attribute set on every core Parameter, ``(num_cores, num_dummy)``: how ``OPDFOptimizer`` finds cores
#: among plain parameters (``copy.deepcopy`` drops it; the optimizer re-tags a module it is given).
CORE_TAG = '_opdf_core'


def core_name(k: int) -> str:
    """``torch.nn.utils.parametrize`` names the tensors a parametrization's ``right_inverse`` returns
    ``original0..N`` (``<module>.parametrizations.<tensor>.original<k>`` in a state_dict)."""
    return f'original{k}'


def core_state_keys(prefix: str, tensor_name: str, num_cores: int) -> list[str]:
    """The state_dict keys of a module's MPO cores (``prefix`` is the module path plus a dot, or '')."""
    return [f'{prefix}parametrizations.{tensor_name}.{core_name(k)}' for k in range(num_cores)]


def mpo_cores(module: nn.Module, tensor_name: str = 'weight') -> tuple[Tensor, ...]:
    """The live cores (Parameters, or buffers when frozen) of one MPO weight, in chain order."""
    mpo = _mpo_of(module, tensor_name)
    if mpo is None:
        raise ValueError(f'{type(module).__name__}.{tensor_name} is not an MPO weight')
    plist = module.parametrizations[tensor_name]
    return tuple(getattr(plist, core_name(k)) for k in range(mpo.plan.num_cores))


def is_overparameterized(model: nn.Module) -> bool:
    return next(mpo_modules(model), None) is not None


def clear_caches(model: nn.Module) -> None:
    """Drop cached contracted weights (needed only after writing cores through ``.data``)."""
    for _, _, _, p in mpo_modules(model):
        p.clear_cache()


# ----------------------------------------------------------------------------------------------
# Selection and planning
# ----------------------------------------------------------------------------------------------
def _first_match(patterns, name: str) -> str | None:
    for pattern in patterns:
        if re.search(pattern, name):
            return pattern
    return None


def _select(model: nn.Module, cfg: MPOConfig):
    sites, skipped = weight_sites(model)
    selected: list[tuple[nn.Module, WeightSite, dict]] = []
    used: set[str] = set()
    for module, site in sites:
        override_key = _first_match(cfg.overrides, site.name)
        override = dict(cfg.overrides[override_key]) if override_key is not None else {}
        if override_key is not None:
            used.add(('overrides', override_key))
        include = _first_match(cfg.include, site.name)
        exclude = _first_match(cfg.exclude, site.name)
        used.update({('include', include), ('exclude', exclude)})
        weight = module._parameters[site.tensor_name]
        reason = None
        if site.kind not in cfg.types:
            reason = f'type {site.kind} not in types {list(cfg.types)}'
        elif cfg.include and include is None:
            reason = 'not matched by include'
        elif exclude is not None:
            reason = f'excluded by {exclude!r}'
        elif override.get('skip'):
            reason = f'skip: true in overrides[{override_key!r}]'
        elif site.numel < cfg.min_numel:
            reason = f'{site.numel} elements < min_numel {cfg.min_numel}'
        elif weight.device.type != 'meta' and not bool(torch.isfinite(weight.detach()).all()):
            raise mpo.MPOError(f'{site.name}: weight contains NaN or Inf; cannot decompose it')
        elif weight.device.type != 'meta' and not bool(weight.detach().any()):
            reason = 'all-zero weight: every core would be zero and never receive a gradient'
        elif 'rows' not in override and not planning.is_splittable(site.matrix_shape):
            reason = f'{site.matrix_shape[0]}x{site.matrix_shape[1]} matrix has no non-trivial MPO split'
        if reason is None:
            selected.append((module, site, override))
        else:
            skipped.append(SkippedLayer(site.name, site.module_type, reason))
    names = [site.name for _, site in sites]
    for option in ('include', 'exclude', 'overrides'):
        for pattern in getattr(cfg, option):
            if (option, pattern) not in used:
                raise OptionError(f'{option} pattern {pattern!r} matches no supported weight; weights: {names}')
    return selected, skipped


def _plan_one(site: WeightSite, cfg: MPOConfig, override: Mapping[str, Any]) -> MPOPlan:
    max_bond = override.get('max_bond', cfg.max_bond)
    try:
        if 'rows' in override:
            return planning.explicit_plan(site.matrix_shape, override['rows'], override['cols'], max_bond)
        return planning.balanced_plan(site.matrix_shape, override.get('num_factors', cfg.num_factors),
                                      override.get('num_dummy', cfg.effective_num_dummy), max_bond, cfg.factor_order)
    except mpo.MPOError as exc:
        raise mpo.MPOError(f'{site.name}: {exc}') from None


def _plan(selected, cfg: MPOConfig, model_params: int) -> tuple[list[MPOPlan], list[str | None]]:
    partners: list[str | None] = [None] * len(selected)
    plans: list[MPOPlan | None] = [None] * len(selected)
    try:
        if cfg.target_ratio is not None:
            if cfg.align_to is not None:
                raise OptionError('target_ratio and align_to cannot be combined: aligned layers need three '
                                  'real factors, the ratio planner plans two')
            free = [k for k, (_, _, ov) in enumerate(selected) if not ov]
            for k, (_, site, ov) in enumerate(selected):
                if ov:
                    plans[k] = _plan_one(site, cfg, ov)
            fixed_extra = sum(plans[k].num_params - selected[k][1].numel for k in range(len(selected)) if plans[k])
            free_numel = sum(selected[k][1].numel for k in free)
            target = cfg.target_ratio - fixed_extra / model_params
            if free:
                chosen = planning.plan_target_ratio([selected[k][1].matrix_shape for k in free],
                                                    model_params - free_numel, target, cfg.num_dummy)
                for k, p in zip(free, chosen):
                    plans[k] = p if cfg.max_bond is None else MPOPlan(p.row_factors, p.col_factors, cfg.max_bond)
            return plans, partners
        if cfg.align_to is not None:
            teacher_sites, _ = weight_sites(cfg.align_to)
            teacher_info = {s.name: LayerInfo(s.name, s.kind, s.matrix_shape) for _, s in teacher_sites}
            student_info = [LayerInfo(s.name, s.kind, s.matrix_shape) for _, s, _ in selected]
            pairs = resolve_match(cfg.layer_map, student_info, list(teacher_info.values()), key='mpo.layer_map')
            for k, (_, site, ov) in enumerate(selected):
                partner = pairs.get(site.name)
                plans[k] = _plan_one(site, cfg, ov)
                if partner is None:
                    continue
                t_shape = teacher_info[partner].shape
                if not planning.auxiliary_compatible(plans[k], planning.teacher_plan(plans[k], t_shape)) and not ov:
                    aligned = planning.aligned_plans(site.matrix_shape, t_shape, cfg.effective_num_dummy)
                    if aligned is not None:
                        plans[k] = aligned[0]
                if planning.auxiliary_compatible(plans[k], planning.teacher_plan(plans[k], t_shape)):
                    partners[k] = partner
            return plans, partners
        return [_plan_one(site, cfg, ov) for _, site, ov in selected], partners
    except mpo.MPOError as exc:
        raise OptionError(str(exc)) from None


def _frozen_indices(cfg: MPOConfig, plan: MPOPlan) -> tuple[int, ...]:
    if cfg.freeze == 'central':
        return (plan.central,)
    if cfg.freeze == 'auxiliary':
        return plan.auxiliary
    return ()


def _build_report(selected, skipped, plans, partners, cfg, model, applied) -> OverparamReport:
    report = OverparamReport(skipped=skipped, applied=applied,
                             model_params=sum(p.numel() for p in model.parameters()),
                             model_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    for (module, site, _), p, partner in zip(selected, plans, partners):
        report.layers.append(LayerRow(site.name, site.module_type, site.weight_shape, p, site.numel,
                                      _frozen_indices(cfg, p), partner, kind=site.kind))
    return report


def plan(model: nn.Module, config: MPOConfig | Mapping[str, Any] | None = None, **options: Any) -> OverparamReport:
    """What :func:`overparameterize` would do, without touching the model (no SVD: instant)."""
    cfg = MPOConfig.from_options(config, **options)
    selected, skipped = _select(model, cfg)
    model_params = sum(p.numel() for p in model.parameters())
    plans, partners = _plan(selected, cfg, model_params)
    return _build_report(selected, skipped, plans, partners, cfg, model, applied=False)


def plan_alignment(report: OverparamReport, teacher: nn.Module, cores='auxiliary', layer_map=None):
    """Which of a planned (or applied) student's MPO weights the alignment loss would align with
    ``teacher``, without any forward pass or SVD: ``(pairs, coverage)`` as in
    :func:`~opdf_torchdistill.alignment.pair_layers` (``teacher`` may live on the meta device)."""
    from .alignment import ProbeEntry, pair_layers
    student = [ProbeEntry(r.name, r.kind, r.plan.shape, (), r.plan, r.partner) for r in report.layers]
    teacher_layers = [LayerInfo(s.name, s.kind, s.matrix_shape) for _, s in weight_sites(teacher)[0]]
    return pair_layers(student, teacher_layers, cores, layer_map)


# ----------------------------------------------------------------------------------------------
# Surgery
# ----------------------------------------------------------------------------------------------
def overparameterize(model: nn.Module, config: MPOConfig | Mapping[str, Any] | None = None,
                     **options: Any) -> OverparamReport:
    """Replace the selected weights of ``model`` (in place) by exact full-bond MPOs.

    Args:
        model: any ``nn.Module``; already over-parameterized weights are skipped (idempotent).
        config: an :class:`~opdf_torchdistill.options.MPOConfig` or a mapping of options.
        **options: options (see :mod:`opdf_torchdistill.options`), overriding ``config``.

    Returns:
        An :class:`~opdf_torchdistill.report.OverparamReport`; ``print(report)`` shows the table.

    Raises:
        OptionError: invalid options, patterns that match nothing, unreachable ``target_ratio``.
        MPOError: a weight with NaN/Inf, or a decomposition above ``tolerance`` (names the layer).
    """
    start = time.perf_counter()
    cfg = MPOConfig.from_options(config, **options)
    _check_materialized(model)
    selected, skipped = _select(model, cfg)
    _check_untied(model, selected)
    model_params = sum(p.numel() for p in model.parameters())
    plans, partners = _plan(selected, cfg, model_params)
    report = _build_report(selected, skipped, plans, partners, cfg, model, applied=True)

    jobs = [(to_matrix(module._parameters[site.tensor_name].detach()), p.row_factors, p.col_factors, p.max_bond)
            for (module, site, _), p in zip(selected, plans)]
    try:
        all_cores = mpo.decompose_many(jobs, cfg.workers)
    except mpo.MPOError as exc:  # pragma: no cover - finite inputs were checked; LAPACK failure only
        raise mpo.MPOError(f'decomposition failed: {exc}') from None

    for (module, site, _), p, cores, row, job in zip(selected, plans, all_cores, report.layers, jobs):
        if cfg.verify or not p.exact:
            with mpo.single_threaded():
                row.error = mpo.relative_error(mpo.reconstruct(cores), job[0])
            tol = cfg.tolerance if cfg.tolerance is not None else _DEFAULT_TOLERANCE.get(job[0].dtype, 1e-2)
            if cfg.verify and p.exact and not row.error <= tol:
                raise mpo.MPOError(f'{site.name}: reconstruction error {row.error:.3e} exceeds tolerance {tol:.1e} '
                                   f'(factors {p.describe()}); the weight may be badly scaled, pass tolerance= to accept')
        _register(module, site, p, cores, row.frozen, row.partner)
    if selected:
        _install_root_hook(model)
    report.seconds = time.perf_counter() - start
    logger.info('over-parameterized %d weights in %.2f s (ratio %.3f)', len(selected), report.seconds, report.ratio)
    return report


def _check_materialized(model: nn.Module) -> None:
    """Lazy modules before their first forward and meta-device weights have no values to decompose."""
    for name, module in model.named_modules():
        if _is_internal(name):
            continue
        for tensor_name, param in module._parameters.items():
            if param is None:
                continue
            where = f'{name}.{tensor_name}' if name else tensor_name
            if isinstance(param, nn.parameter.UninitializedParameter):
                raise OptionError(f'{where} ({type(module).__name__}) is not initialised yet (a lazy module): run one '
                                  f'forward pass with a real input before overparameterize, or give its sizes')
            if param.device.type == 'meta':
                raise OptionError(f'{where} ({type(module).__name__}) is on the meta device (shapes only, no '
                                  f'values): materialise the model (to_empty() and load its weights) before '
                                  f'overparameterize; plan() works on meta models')


def _check_untied(model: nn.Module, selected) -> None:
    """A Parameter shared by two modules (tied embedding/decoder, weight sharing) would become two
    independent MPOs and silently untie: refuse, naming both modules."""
    owners: dict[int, dict[int, str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if _is_internal(name):
            continue
        for tensor_name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), {}).setdefault(id(module), (name, tensor_name))
    for module, site, _ in selected:
        paths = owners.get(id(module._parameters[site.tensor_name]), {})
        if len(paths) > 1:
            full = {k: f'{n}.{t}' if n else t for k, (n, t) in paths.items()}
            others = [p for k, p in full.items() if k != id(module)]
            patterns = [f'^{re.escape(n)}$' for n, _ in paths.values()]
            raise OptionError(f'{full[id(module)]} is the same Parameter as {", ".join(others)} (tied weights); '
                              f'separate MPOs would untie them. Leave them dense with exclude: {patterns}, or untie '
                              f'them in the model first')


def _register(module: nn.Module, site: WeightSite, p: MPOPlan, cores: list[Tensor], frozen: tuple[int, ...],
              partner: str | None) -> None:
    weight = module._parameters[site.tensor_name]
    # Several tensors of one module (attention q/k/v) share the order recorded before the first.
    earlier = [p for _, _, _, p in mpo_modules(module) if p.param_order]
    order = earlier[0].param_order if earlier else tuple(module._parameters.keys())
    param = MPOWeight(p, site, frozen, initial_cores=[c.to(weight.device) for c in cores],
                      requires_grad=weight.requires_grad, param_order=order, partner=partner)
    parametrize.register_parametrization(module, site.tensor_name, param, unsafe=True)
    plist = module.parametrizations[site.tensor_name]
    for k in range(p.num_cores):
        core = getattr(plist, core_name(k))
        setattr(core, CORE_TAG, (p.num_cores, p.num_dummy))
    for k in frozen:
        core = plist._parameters.pop(core_name(k))
        plist.register_buffer(core_name(k), core.detach())
    if not any(isinstance(h, _DenseCheckpointHook) for h in _pre_hooks(module)):
        module.register_load_state_dict_pre_hook(_DenseCheckpointHook())


def _pre_hooks(module: nn.Module) -> list:
    return [getattr(h, 'hook', h) for h in module._load_state_dict_pre_hooks.values()]


def _remove_pre_hooks(module: nn.Module, kind: type) -> None:
    for key in [k for k, h in module._load_state_dict_pre_hooks.items() if isinstance(getattr(h, 'hook', h), kind)]:
        del module._load_state_dict_pre_hooks[key]


def contract(model: nn.Module) -> nn.Module:
    """Contract every MPO weight of ``model`` back to a plain Parameter, in place; returns ``model``.

    Afterwards the module classes, parameter names and their order are those of the never-modified
    model, so ``state_dict()`` loads with ``strict=True`` into a freshly built base model. Optimizers
    built on the cores do not follow: contract after training.
    """
    for _, module, tensor_name, p in list(mpo_modules(model)):
        cls = type(module)
        if cls.__name__.startswith('Parametrized') and parametrize.is_parametrized(module):
            # deepcopy shares parametrize's generated class between copies; removing the property
            # from it would break every copy (an EMA model, a kept MPO twin), so work on a private one.
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        with torch.no_grad():
            # The no-grad path reuses a cached weight, so removal below contracts nothing twice.
            weight = getattr(module, tensor_name).detach().clone()
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
        module._buffers.pop(tensor_name, None)
        module._parameters.pop(tensor_name, None)
        module.register_parameter(tensor_name, nn.Parameter(weight, requires_grad=p.weight_requires_grad))
        order = [k for k in p.param_order if k in module._parameters]
        rest = [k for k in module._parameters if k not in order]
        reordered = [(k, module._parameters[k]) for k in order + rest]
        module._parameters.clear()
        module._parameters.update(reordered)
        if not parametrize.is_parametrized(module):
            _remove_pre_hooks(module, _DenseCheckpointHook)
    for module in model.modules():
        _remove_pre_hooks(module, _RootDenseCheckpointHook)
    return model


# ----------------------------------------------------------------------------------------------
# Dense checkpoints
# ----------------------------------------------------------------------------------------------
class _DenseCheckpointHook:
    """Per-module load pre-hook: decompose a dense weight found in the state_dict into this module's
    cores, and refuse MPO cores whose shapes do not match this model's plan (naming the layer)."""

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        if not parametrize.is_parametrized(module):
            return
        for tensor_name in list(module.parametrizations.keys()):
            p = _mpo_of(module, tensor_name)
            if p is None:
                continue
            keys = core_state_keys(prefix, tensor_name, p.plan.num_cores)
            dense_key = prefix + tensor_name
            if dense_key in state_dict:
                if any(k in state_dict for k in keys):
                    raise ValueError(f'{prefix}{tensor_name}: the checkpoint holds both a dense weight and MPO cores')
                dense = state_dict.pop(dense_key)
                if tuple(dense.shape) != p.site.weight_shape:
                    raise ValueError(f'{dense_key}: checkpoint weight has shape {tuple(dense.shape)}, this model '
                                     f'expects {p.site.weight_shape}')
                for key, core in zip(keys, p.right_inverse(dense)):
                    state_dict[key] = core
                continue
            _check_core_shapes(state_dict, prefix, tensor_name, p)


def _check_core_shapes(state_dict, prefix: str, tensor_name: str, p: MPOWeight) -> None:
    base = f'{prefix}parametrizations.{tensor_name}.original'
    found = {int(k[len(base):]): tuple(v.shape) for k, v in state_dict.items()
             if k.startswith(base) and k[len(base):].isdigit()}
    if not found:
        return
    expected = dict(enumerate(p.plan.core_shapes))
    if found != expected:
        raise ValueError(
            f'{prefix.rstrip(".") or p.site.module_name}: checkpoint MPO cores {[found[k] for k in sorted(found)]} do not '
            f'match this model\'s cores {list(p.plan.core_shapes)} (factors {p.plan.describe()}); build the model '
            f'with the same mpo options as the checkpoint, or load a contracted (dense) checkpoint')
    bad = [f'{base}{k}' for k in sorted(found) if not bool(torch.isfinite(state_dict[f'{base}{k}']).all())]
    if bad:
        raise mpo.MPOError(f'{prefix.rstrip(".") or p.site.module_name}: checkpoint MPO cores contain NaN or Inf '
                           f'({", ".join(bad)}); the checkpoint comes from a diverged run: load an earlier one')


class _RootDenseCheckpointHook:
    """Model-level load pre-hook: decompose all dense weights of a checkpoint at once, in parallel
    (the per-module hooks would do them one by one)."""

    def __call__(self, module, state_dict, prefix, *args):
        jobs, targets = [], []
        for name, sub, tensor_name, p in mpo_modules(module):
            sub_prefix = f'{prefix}{name}.' if name else prefix
            dense_key = sub_prefix + tensor_name
            dense = state_dict.get(dense_key)
            if dense is None or tuple(dense.shape) != p.site.weight_shape or \
                    any(k in state_dict for k in core_state_keys(sub_prefix, tensor_name, 1)):
                continue  # left to the per-module hook, which reports problems by name
            if not bool(torch.isfinite(dense).all()):
                raise mpo.MPOError(f'{dense_key}: checkpoint weight contains NaN or Inf; cannot decompose it')
            jobs.append((to_matrix(dense), p.plan.row_factors, p.plan.col_factors, p.plan.max_bond))
            targets.append((dense_key, sub_prefix, tensor_name, p))
        if not jobs:
            return
        for (dense_key, sub_prefix, tensor_name, p), cores in zip(targets, mpo.decompose_many(jobs)):
            del state_dict[dense_key]
            for key, core in zip(core_state_keys(sub_prefix, tensor_name, p.plan.num_cores), cores):
                state_dict[key] = core


def _install_root_hook(model: nn.Module) -> None:
    if not any(isinstance(h, _RootDenseCheckpointHook) for h in _pre_hooks(model)):
        model.register_load_state_dict_pre_hook(_RootDenseCheckpointHook())
