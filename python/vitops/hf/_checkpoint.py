"""Checkpoint mapping every family's HF loader shares: reading checkpoints, key maps between HF
names and vitops (MaxText-style) names, prefix detection, the per-part key check, mismatch
errors and load reports, and the copy into (possibly meta-device) modules.

A family module (``vitops.hf.gemma4``, ...) supplies its key rules, which checkpoint parts it
knows (e.g. the vision tower and the projector) and the layout changes of single tensors.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

__all__ = [
    "CheckpointMismatchError",
    "parts_message",
    "read_config",
    "save_safetensors",
    "KeyMap",
    "Layout",
    "LoadReport",
    "Part",
    "check_part",
    "compress_keys",
    "detect_prefix",
    "export_parts",
    "finish_load",
    "load_into",
    "load_parts",
    "mismatch_message",
    "read_checkpoint",
]


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys do not match the module: lists missing, unexpected, mis-shaped keys."""


class LoadReport(NamedTuple):
    missing: list[str]  # HF names the module needs and the checkpoint lacks
    unexpected: list[str]  # checkpoint keys under the model's prefixes that map to nothing
    mismatched: list[str]  # "key: checkpoint shape vs module shape"


# ---------------------------------------------------------------------------------------------
# Key maps
# ---------------------------------------------------------------------------------------------
def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def _apply(name: str, table) -> str | None:
    for rx, out in table:
        m = rx.match(name)
        if m:
            return out.replace("{i}", m.group("i")) if "{i}" in out else out
    return None


class KeyMap:
    """HF relative names <-> vitops names, from rows ``(hf pattern, vitops pattern, canonical)``
    where ``{i}`` stands for a layer index. Every row is accepted on load; only canonical rows are
    written on export (the others are aliases, e.g. a bare ``q_proj.weight`` without ``.linear.``)."""

    def __init__(self, rows: list[tuple[str, str, bool]]):
        self._to_ours = [(_compile(hf), ours) for hf, ours, _ in rows]
        self._to_hf = [(_compile(ours), hf) for hf, ours, canonical in rows if canonical]
        # the HF patterns with any text before them: finds the prefix of keys whose anchor is missing
        self._suffixes = [re.compile("^(?P<prefix>.*?)" + rx.pattern[1:]) for rx, _ in self._to_ours]

    def to_ours(self, hf_name: str) -> str | None:
        return _apply(hf_name, self._to_ours)

    def to_hf(self, ours: str) -> str:
        return _apply(ours, self._to_hf) or ours

    def most_common_prefix(self, keys: list[str]) -> str | None:
        """The text most of the keys that some rule matches share before their HF name."""
        counts: dict[str, int] = {}
        for k in keys:
            for rx in self._suffixes:
                m = rx.match(k)
                if m:
                    counts[m.group("prefix")] = counts.get(m.group("prefix"), 0) + 1
                    break
        return max(counts, key=counts.get) if counts else None


def detect_prefix(keys: list[str], anchor: str, what: str, prefer: str | None = None,
                  avoid: str | None = None) -> str | None:
    """The text before ``anchor`` in the keys that end with it (None when none does). With several
    candidates, those containing ``avoid`` are dropped and those containing ``prefer`` kept (a full
    checkpoint has one embedder per modality); still several raises."""
    found = sorted({k[: -len(anchor)] for k in keys if k.endswith(anchor)})
    if prefer is not None and len(found) > 1:
        if avoid is not None:
            found = [p for p in found if avoid not in p] or found
        found = [p for p in found if prefer in p] or found
    if len(found) > 1:
        raise CheckpointMismatchError(f"several {what} prefixes in the checkpoint {found}; pass the prefix explicitly")
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class _LazySafetensors(Mapping):
    """Read-on-access view over one or more safetensors files (only the keys used get loaded)."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open

        self._where: dict[str, str] = {}
        for f in files:
            with safe_open(f, framework="pt") as fh:
                for k in fh.keys():
                    self._where[k] = f

    def __getitem__(self, key):
        from safetensors import safe_open

        with safe_open(self._where[key], framework="pt") as fh:
            return fh.get_tensor(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def read_checkpoint(checkpoint) -> Mapping[str, torch.Tensor]:
    """A state dict, a ``.safetensors`` / ``.bin`` / ``.pt`` file, or a directory of safetensors shards."""
    if isinstance(checkpoint, Mapping):
        return checkpoint
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}")
        return _LazySafetensors(files)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if path.endswith(".safetensors"):
        return _LazySafetensors([path])
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# Checking and loading one part
# ---------------------------------------------------------------------------------------------
class Layout(NamedTuple):
    """How one tensor's checkpoint layout differs from the module's (e.g. a transposed table)."""

    to_module: Callable[[torch.Tensor], torch.Tensor]
    to_checkpoint: Callable[[torch.Tensor], torch.Tensor]


def check_part(module: torch.nn.Module, sources: dict[str, str], checkpoint: Mapping[str, torch.Tensor],
               hf_name: Callable[[str], str], prefix: str, layouts: Mapping[str, Layout] | None = None,
               ) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Matches a module's state dict against the checkpoint keys mapped to it.

    ``sources``: vitops name -> checkpoint key; ``hf_name``: the HF relative name of a vitops name
    (missing keys are reported as ``prefix + hf_name(name)``); ``layouts``: the tensors whose
    checkpoint layout differs. Returns ``(values to load, missing keys, "key: checkpoint shape vs
    module shape" mismatches)``, shapes in the checkpoint's layout."""
    layouts = layouts or {}
    sub, missing, mismatched = {}, [], []
    for name, tensor in module.state_dict().items():
        if name not in sources:
            missing.append(prefix + hf_name(name))
            continue
        key = sources[name]
        raw = checkpoint[key]
        layout = layouts.get(name)
        value = layout.to_module(raw) if layout is not None else raw
        if tuple(value.shape) != tuple(tensor.shape):
            want = tuple((layout.to_checkpoint(tensor) if layout is not None else tensor).shape)
            mismatched.append(f"{key}: checkpoint {tuple(raw.shape)} vs module {want}")
            continue
        sub[name] = value
    return sub, missing, mismatched


def load_into(module: torch.nn.Module, sub: dict[str, torch.Tensor]) -> None:
    """Copies ``sub`` into ``module`` (values cast to the module's dtypes). Tensors of a module built
    on the meta device have no storage to copy into: those are replaced by the checkpoint's values
    (on the checkpoint's device, in the module's dtype), and any that the checkpoint does not
    provide is an error rather than a silent meta tensor."""
    current = module.state_dict(keep_vars=True)
    meta = {name for name, t in current.items() if t.is_meta}
    if not meta:
        module.load_state_dict(sub, strict=False)
        return
    left = sorted(meta - set(sub))
    if left:
        raise CheckpointMismatchError(
            f"{type(module).__name__} is on the meta device and the checkpoint does not provide "
            f"{len(left)} of its tensors, which would stay without data: {left[:20]}")
    cast = {name: value.to(current[name].dtype) if name in current else value for name, value in sub.items()}
    module.load_state_dict(cast, strict=False, assign=True)
    # assign=True keeps the checkpoint's requires_grad (False for plain tensors): parameters stay
    # trainable as they would be after a regular load
    for p in module.parameters():
        p.requires_grad_(True)


@dataclasses.dataclass
class Part:
    """One module of a checkpoint load (a vision tower, a projector) and how its keys are named."""

    kind: str  # "tower", "projector", ... (for messages)
    module: torch.nn.Module
    key_map: KeyMap
    prefix: str | None  # the text before its HF names in the checkpoint; None: no key of it was found
    default_prefix: str  # where its missing keys are reported when no key of it was found
    layouts: Mapping[str, Layout] = dataclasses.field(default_factory=dict)
    ignored: re.Pattern | None = None  # HF names under the prefix that are harmless (non-persistent buffers)


def load_parts(parts: list[Part], checkpoint: Mapping[str, torch.Tensor], strict: bool,
               message: Callable[[LoadReport], str]) -> LoadReport:
    """Routes every checkpoint key to the part whose prefix (the longest that matches) and key map
    name it; keys under a part's prefix that map to nothing, or to a tensor its module does not have
    (e.g. a layer past ``num_layers``), are unexpected; keys under no prefix are ignored (the rest
    of a full checkpoint). Then checks every part (:func:`check_part`) and loads them all, or raises
    :class:`CheckpointMismatchError` (``strict``, before anything is copied)."""
    located = sorted((p for p in parts if p.prefix is not None), key=lambda p: len(p.prefix), reverse=True)
    sources: dict[int, dict[str, str]] = {id(p): {} for p in parts}
    unexpected = []
    for key in checkpoint.keys():
        owner = None
        for part in located:
            if not key.startswith(part.prefix):
                continue
            owner = owner or part
            ours = part.key_map.to_ours(key[len(part.prefix):])
            if ours is not None:
                sources[id(part)][ours] = key
                owner = None
                break
        if owner is not None and not (owner.ignored is not None and owner.ignored.match(key[len(owner.prefix):])):
            unexpected.append(key)
    missing, mismatched, loads = [], [], []
    for part in parts:
        src = sources[id(part)]
        prefix = part.prefix if part.prefix is not None else part.default_prefix
        sub, miss, bad = check_part(part.module, src, checkpoint, part.key_map.to_hf, prefix, part.layouts)
        expected = part.module.state_dict()
        unexpected += [k for name, k in src.items() if name not in expected]
        missing += miss
        mismatched += bad
        loads.append((part.module, sub))
    report = LoadReport(sorted(missing), sorted(unexpected), sorted(mismatched))
    return finish_load(report, strict, lambda: message(report), loads)


def export_parts(parts: list[Part]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`load_parts`: HF-named, HF-layout tensors of every part under its prefix."""
    out = {}
    for part in parts:
        prefix = part.prefix if part.prefix is not None else part.default_prefix
        for name, tensor in part.module.state_dict().items():
            layout = part.layouts.get(name)
            if layout is not None:
                tensor = layout.to_checkpoint(tensor)
            out[prefix + part.key_map.to_hf(name)] = tensor.detach().contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def compress_keys(keys: list[str]) -> list[str]:
    """Every key, in full, with the keys that differ only in their layer index written once:
    ``...encoder.layers.{0-3,5}.mlp.down_proj.input_max``. Nothing is dropped (a mismatch of a whole
    config lists hundreds of keys otherwise)."""
    groups: dict[str, list[int]] = {}
    singles = []
    for k in keys:
        m = _LAYER_INDEX.search(k.split(": ")[0])
        if m is None:
            singles.append(k)
            continue
        pattern = k[: m.start()] + ".layers.{}." + k[m.end():]
        groups.setdefault(pattern, []).append(int(m.group(1)))

    def ranges(ix):
        ix = sorted(set(ix))
        out, start = [], ix[0]
        for a, b in zip(ix, ix[1:] + [None]):
            if b != a + 1:
                out.append(str(start) if start == a else f"{start}-{a}")
                start = b
        return ",".join(out)

    lines = singles + [p.replace("{}", ix and (str(ix[0]) if len(ix) == 1 else "{" + ranges(ix) + "}"))
                       for p, ix in groups.items()]
    return sorted(lines)


def mismatch_message(headline: str, report: LoadReport, notes: list[str], hint: str) -> str:
    """The text of a :class:`CheckpointMismatchError`: a headline, notes, the three key lists
    (compressed by layer index, nothing dropped) and what to check."""

    def block(title, items):
        if not items:
            return ""
        shown = "\n".join(f"    {x}" for x in compress_keys(items))
        return f"\n  {title} ({len(items)}):\n{shown}"

    return (
        headline
        + "".join(f"\n  {n}" for n in notes)
        + block("missing keys", report.missing)
        + block("unexpected keys", report.unexpected)
        + block("shape mismatches", report.mismatched)
        + f"\n  ({hint})"
    )


def parts_message(family: str, parts: list[Part], report: LoadReport, hint: str) -> str:
    """The mismatch text of a :func:`load_parts` load: which modules and prefixes, a note per part
    no key of which was found, the key lists and ``hint``."""
    names = ", ".join(type(p.module).__name__ for p in parts)
    notes = [f"no {p.kind} key was found (keys are shown under {p.default_prefix!r})" for p in parts
             if p.prefix is None]
    prefixes = ", ".join(f"{p.kind} prefix {p.prefix!r}" for p in parts)
    return mismatch_message(f"HF {family} checkpoint does not match {names} ({prefixes})", report, notes, hint)


def save_safetensors(state_dict: dict[str, torch.Tensor], path) -> None:
    """Write an (HF-named) state dict to a ``.safetensors`` file."""
    from safetensors.torch import save_file

    save_file(state_dict, os.fspath(path))


def read_config(hf_config: Any) -> Any:
    """A config object or dict as given; a path to a ``config.json`` or to the directory holding it
    is read as a dict."""
    if isinstance(hf_config, (str, os.PathLike)):
        path = os.fspath(hf_config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return json.load(f)
    return hf_config


def finish_load(report: LoadReport, strict: bool, message: Callable[[], str],
                loads: list[tuple[torch.nn.Module, dict[str, Any]]]) -> LoadReport:
    """Raises the mismatch (strict, before anything is copied) or copies every part."""
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise CheckpointMismatchError(message())
    for module, sub in loads:
        load_into(module, sub)
    return report
