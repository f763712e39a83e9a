"""Drop-in acceleration of HF ``transformers`` vision towers: :func:`patch` / :func:`unpatch`.

The hot paths of HF's Gemma 4, Gemma 3 (SigLIP) and Llama 4 vision classes are rerouted through
vitops ops by rebinding single methods, either on the classes (``model=None``: every model built
later is covered, as vLLM builds Gemma 4's tower from HF's own classes) or on the modules of one
model. Nothing else changes: parameters, buffers and their names, the ``nn.Linear`` children (which
vLLM swaps for quantised / LoRA layers; the patched methods call them as HF does), the inputs HF
takes (padded ``[B, L, 3p^2]`` patches with ``(-1, -1)`` positions) and the outputs it returns. The
patched methods never read device values on the host, so they are CUDA-graph capturable.

Each family module (``vitops.hf.gemma4``, ``gemma3``, ``llama4``) lists its :class:`Site` s: the HF
class and method replaced, the replacement, and the fingerprints of the HF code the replacement
reproduces (the method itself and the helpers whose math it assumes). A fingerprint is a hash of the
function's syntax tree without docstrings, so comments and docs may change but code may not: a
transformers release whose code differs from the supported ones (``SUPPORTED_TRANSFORMERS``) is
refused with :class:`UnsupportedTransformersError` naming the functions, before anything is patched.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import logging
import textwrap
import types
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["PatchReport", "Site", "UnsupportedTransformersError", "SUPPORTED_TRANSFORMERS", "FLAGS", "patch",
           "unpatch", "is_patched", "fingerprint"]

logger = logging.getLogger("vitops.hf")

SUPPORTED_TRANSFORMERS = ("5.17.0", "5.18.0")
FAMILIES = ("gemma4", "gemma3", "llama4")
# What each flag of patch() switches, for the error message of an unknown flag.
FLAGS = {
    "posemb": "Gemma 4's factorized position embedding (vitops.factorized_posemb)",
    "rope": "the q/k(/v) norms and RoPE of the attention (vitops.qkv_norm_rope): Gemma 4, Llama 4",
    "pooler": "the exit pooling: Gemma 4's pooler (vitops.avg_pool_by_positions), Gemma 3's projector "
              "(vitops.avg_pool_rms_norm)",
    "patch_embedding": "the patch embedding as vitops.patchify + one GEMM: Llama 4's unfold convolution, "
                       "SigLIP's convolution (on the CPU in bfloat16, where it is faster)",
    "pixel_shuffle": "Llama 4's pixel shuffle (vitops.pixel_shuffle)",
}


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers' code differs from what a vitops patch reproduces."""


class Site(NamedTuple):
    """One patched method: ``module.cls.attr`` becomes ``replacement`` when ``flag`` is on.

    ``fingerprints`` maps each HF function the replacement reproduces (``"Class.method"`` or a
    module-level ``"function"`` of ``module``; the patched method first) to the fingerprints of the
    supported releases."""

    family: str
    flag: str
    module: str
    cls: str
    attr: str
    replacement: Callable
    fingerprints: dict[str, frozenset[str]]

    @property
    def name(self) -> str:
        return f"{self.cls}.{self.attr}"


class PatchReport(NamedTuple):
    """What :func:`patch` / :func:`unpatch` did: ``patched`` lists ``"Class.method (flag)"`` entries
    (with the number of modules for an instance patch), ``skipped`` the sites already in the state
    asked for, ``target`` the model's class name or ``"classes"``."""

    target: str
    patched: tuple[str, ...]
    skipped: tuple[str, ...]

    def __str__(self) -> str:
        done = ", ".join(self.patched) or "nothing"
        return f"{self.target}: {done}" + (f" (already: {', '.join(self.skipped)})" if self.skipped else "")


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------
def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def fingerprint(fn: Callable) -> str:
    """A hash of ``fn``'s code: its syntax tree without docstrings (comments, blank lines and
    docstrings may change, code may not)."""
    fn = inspect.unwrap(getattr(fn, "__func__", fn))
    tree = _strip_docstrings(ast.parse(textwrap.dedent(inspect.getsource(fn))))
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()[:16]


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _hf_module(site: Site) -> types.ModuleType:
    try:
        return importlib.import_module(site.module)
    except ImportError as e:
        raise UnsupportedTransformersError(
            f"vitops.hf.patch: transformers {_transformers_version()} has no {site.module} ({e}); vitops patches "
            f"the {site.family} classes of transformers {', '.join(SUPPORTED_TRANSFORMERS)}") from e


def _original(site: Site, module: types.ModuleType) -> Callable:
    """HF's function at the site (the one a class patch replaced, if it is in place)."""
    cls = getattr(module, site.cls, None)
    if cls is None:
        raise UnsupportedTransformersError(
            f"vitops.hf.patch: transformers {_transformers_version()}'s {site.module} has no class {site.cls}; "
            f"vitops patches transformers {', '.join(SUPPORTED_TRANSFORMERS)}")
    fn = cls.__dict__.get(site.attr)
    if fn is None:
        raise UnsupportedTransformersError(
            f"vitops.hf.patch: transformers {_transformers_version()}'s {site.cls} defines no {site.attr}; vitops "
            f"patches transformers {', '.join(SUPPORTED_TRANSFORMERS)}")
    return _CLASS_ORIGINALS.get((site.module, site.cls, site.attr), fn)


def _check_sources(sites: list[Site]) -> None:
    """Every function the sites reproduce must match a supported release; one error lists all that differ."""
    differing = []
    for site in sites:
        module = _hf_module(site)
        for qualname, known in site.fingerprints.items():
            if qualname == site.name:
                fn = _original(site, module)
            else:
                owner, _, attr = qualname.rpartition(".")
                fn = getattr(getattr(module, owner), attr) if owner else getattr(module, attr, None)
                fn = _CLASS_ORIGINALS.get((site.module, owner, attr), fn) if owner else fn
            if fn is None:
                differing.append(f"{qualname} (missing)")
            elif fingerprint(fn) not in known:
                differing.append(f"{qualname} (fingerprint {fingerprint(fn)})")
    if differing:
        raise UnsupportedTransformersError(
            f"vitops.hf.patch: the installed transformers {_transformers_version()} differs from the releases "
            f"vitops supports ({', '.join(SUPPORTED_TRANSFORMERS)}) in {', '.join(sorted(set(differing)))}; "
            "the patched methods reproduce that code, so nothing was patched. Install a supported transformers "
            "or run the model unpatched.")


# ---------------------------------------------------------------------------------------------
# Sites
# ---------------------------------------------------------------------------------------------
@functools.cache
def _family_sites(family: str) -> tuple[Site, ...]:
    """The family's sites; [] when the installed transformers has no such model (an old release)."""
    try:
        return tuple(importlib.import_module(f"vitops.hf.{family}").patch_sites())
    except ImportError:
        return ()


def _select(flags: dict[str, bool], families) -> list[Site]:
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"vitops.hf.patch: `families` must name some of {FAMILIES}, got {unknown}")
    sites = []
    for fam in families:
        found = _family_sites(fam)
        if not found:
            raise UnsupportedTransformersError(
                f"vitops.hf.patch: transformers {_transformers_version()} has no {fam} model; vitops patches "
                f"transformers {', '.join(SUPPORTED_TRANSFORMERS)}")
        sites += [s for s in found if flags[s.flag]]
    return sites


def _flags(kwargs: dict) -> dict[str, bool]:
    unknown = sorted(set(kwargs) - set(FLAGS))
    if unknown:
        listing = "; ".join(f"{k}: {v}" for k, v in FLAGS.items())
        raise TypeError(f"vitops.hf.patch: unknown option(s) {unknown}; the options are {listing}")
    return {flag: bool(kwargs.get(flag, True)) for flag in FLAGS}


_CLASS_ORIGINALS: dict[tuple[str, str, str], Callable] = {}  # (module, class, attr) -> HF's function


def make_sites(family: str, rows: list[tuple[str, str, str, str, Callable]],
               fingerprints: dict[str, dict[str, frozenset[str]]], originals: dict[str, Callable]) -> list[Site]:
    """A family's Sites from ``(flag, module, class, attr, replacement)`` rows (the fingerprint table
    is keyed by flag, one site per flag); HF's functions are recorded in ``originals`` (the family
    module's dict the replacements read, see :func:`hf_originals`). Imports the HF modules."""
    sites = [Site(family, flag, module, cls, attr, fn, fingerprints[flag]) for flag, module, cls, attr, fn in rows]
    originals.update(hf_originals(sites))
    return sites


def hf_originals(sites: list[Site]) -> dict[str, Callable]:
    """HF's own function of each site (``"Class.attr"`` -> function), for the cases a replacement
    leaves to HF. Read when the family's sites are first built, before anything is patched; the
    replacements look them up in a plain dict, which torch.compile traces."""
    return {site.name: _original(site, _hf_module(site)) for site in sites}


def _site_of(fn) -> Site | None:
    """The Site whose replacement ``fn`` is (a function or a method bound to a module), else None."""
    fn = getattr(fn, "__func__", fn)
    for fam in FAMILIES:
        for site in _family_sites(fam):
            if site.replacement is fn:
                return site
    return None


# ---------------------------------------------------------------------------------------------
# patch / unpatch
# ---------------------------------------------------------------------------------------------
def patch(model: torch.nn.Module | None = None, *, families: tuple[str, ...] | None = None, **flags: bool
          ) -> PatchReport:
    """Route the HF vision towers' hot paths through vitops ops, in place.

    Args:
      model: a transformers model holding a Gemma 4, Gemma 3 or Llama 4 vision tower (the
        conditional-generation model, its inner model, or the vision model alone). None patches the
        HF classes themselves, so every model built afterwards (e.g. by vLLM) is covered.
      families: with ``model=None``, which families' classes to patch (default: all three).
      posemb, rope, pooler, patch_embedding, pixel_shuffle: switch single pieces (see ``FLAGS``);
        all default to True.

    Returns a :class:`PatchReport` (also logged at INFO on the ``vitops.hf`` logger). Patching twice
    is a no-op. Raises :class:`UnsupportedTransformersError` when the installed transformers' code
    differs from the supported releases', and ``TypeError`` for a model with no known vision tower.
    """
    chosen = _flags(flags)
    if model is None:
        sites = _select(chosen, families or FAMILIES)
        _check_sources(sites)
        patched, skipped = [], []
        for site in sites:
            cls = getattr(_hf_module(site), site.cls)
            current = cls.__dict__[site.attr]
            if _site_of(current) is not None:
                skipped.append(site.name)
                continue
            _CLASS_ORIGINALS[(site.module, site.cls, site.attr)] = current
            setattr(cls, site.attr, site.replacement)
            patched.append(f"{site.name} ({site.flag})")
        return _report("classes", patched, skipped, "patched")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"vitops.hf.patch: `model` must be a transformers model (torch.nn.Module) or None, got "
                        f"{type(model).__name__}")
    if families is not None:
        raise TypeError("vitops.hf.patch: `families` applies to the class patch (model=None); a model's families "
                        "are found from its modules")
    present = {(type(m).__module__, type(m).__name__) for m in model.modules()}
    known = [s for fam in FAMILIES for s in _family_sites(fam) if (s.module, s.cls) in present]
    if not known:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise TypeError(
            f"vitops.hf.patch: {type(model).__name__} (model_type={model_type!r}) holds no vision tower vitops "
            f"knows; it patches the HF Gemma 4, Gemma 3 (SigLIP) and Llama 4 vision classes")
    sites = [s for s in known if chosen[s.flag]]
    classes = {(s.module, s.cls) for s in sites}
    _check_sources(sites)
    counts: dict[str, int] = {}
    skipped = []
    for module in model.modules():
        key = (type(module).__module__, type(module).__name__)
        if key not in classes:
            continue
        for site in sites:
            if (site.module, site.cls) != key:
                continue
            if _site_of(getattr(module, site.attr)) is not None:
                skipped.append(site.name)
                continue
            module.__dict__[site.attr] = types.MethodType(site.replacement, module)
            label = f"{site.name} ({site.flag})"
            counts[label] = counts.get(label, 0) + 1
    patched = [f"{label} x{n}" for label, n in counts.items()]
    return _report(type(model).__name__, patched, sorted(set(skipped)), "patched")


def unpatch(model: torch.nn.Module | None = None) -> PatchReport:
    """Undo :func:`patch`: restore HF's methods on ``model``'s modules (an instance patch), or on the
    classes (None; a class patch)."""
    if model is None:
        undone = []
        for (module_name, cls_name, attr), original in list(_CLASS_ORIGINALS.items()):
            cls = getattr(importlib.import_module(module_name), cls_name)
            if _site_of(cls.__dict__.get(attr)) is not None:
                setattr(cls, attr, original)
                undone.append(f"{cls_name}.{attr}")
            del _CLASS_ORIGINALS[(module_name, cls_name, attr)]
        return _report("classes", undone, [], "unpatched")
    count: dict[str, int] = {}
    for module in model.modules():
        for attr, value in list(module.__dict__.items()):
            site = _site_of(value) if isinstance(value, types.MethodType) else None
            if site is not None:
                del module.__dict__[attr]
                count[site.name] = count.get(site.name, 0) + 1
    return _report(type(model).__name__, [f"{n} x{c}" for n, c in count.items()], [], "unpatched")


def is_patched(model: torch.nn.Module | None = None) -> list[str]:
    """The sites in effect on ``model``'s modules (by an instance or a class patch), or on the classes (None)."""
    if model is None:
        return sorted(f"{cls}.{attr}" for (_, cls, attr) in _CLASS_ORIGINALS)
    found = set()
    for module in model.modules():
        for fam in FAMILIES:
            for site in _family_sites(fam):
                if (type(module).__module__, type(module).__name__) == (site.module, site.cls) and _site_of(
                        getattr(module, site.attr, None)) is site:
                    found.add(site.name)
    return sorted(found)


def _report(target: str, done: list[str], skipped: list[str], verb: str) -> PatchReport:
    report = PatchReport(target, tuple(done), tuple(skipped))
    logger.info("vitops.hf.%s %s", "patch" if verb == "patched" else "unpatch", report)
    return report
