"""The multimodal merge: soft tokens written into the text embeddings at the placeholder rows.

HF (Gemma 4, Gemma 3, Llama 4) builds a boolean mask ``input_ids == image_token_id`` and calls
``inputs_embeds.masked_scatter(mask, features)``, after count checks that read device values on the
host. MAX scatters by index instead (``merge_multimodal_embeddings``), with negative indices
skipped, so a chunked prefill or a prefix-cache hit only marks the soft tokens whose rows are not
in the step. This module is that design in PyTorch:

* ``merge_soft_tokens(inputs_embeds, soft_tokens, indices)``: the op (``vitops.merge_soft_tokens``);
* ``soft_token_indices(input_ids, token_id, ...)``: the indices, in HF's placeholder order, for a
  padded batch, a ragged batch and a window of each sequence (chunked prefill), with no host
  synchronisation when the number of soft tokens is given;
* ``check_soft_token_count(count, num_soft_tokens)``: the deferred count check (HF's error), for the
  count ``soft_token_indices(..., return_count=True)`` leaves on the device.

Example (a padded batch, as HF's forward)::

    embeds = model.get_input_embeddings()(input_ids)                    # [B, S, H]
    idx = soft_token_indices(input_ids, image_token_id, features.shape[0])
    embeds = merge_soft_tokens(embeds, features, idx)                    # = masked_scatter
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops.merge_soft_tokens import merge_soft_tokens

__all__ = ["SKIP", "check_soft_token_count", "merge_soft_tokens", "soft_token_indices"]

SKIP = -(2**31)  # INT32_MIN: MAX's mark of a soft token whose row is not in this step (any negative index is skipped)

_Window = int | Sequence[int] | torch.Tensor | None


def soft_token_indices(input_ids: torch.Tensor | Sequence[torch.Tensor], token_id: int,
                       num_soft_tokens: int | None = None, *, start: _Window = None, stop: _Window = None,
                       row_offsets: _Window = None, return_count: bool = False):
    """The ``indices`` of ``merge_soft_tokens``: for every placeholder token (``input_ids == token_id``),
    in order, the row of the embeddings it occupies in this step, or ``SKIP``.

    The order is HF's ``masked_scatter`` order (sequence-major, then position): the order in which
    Gemma 4 (``cat`` of the images' pooled tokens), Gemma 3 (``[images, 256, H]`` flattened) and Llama 4
    (tiles of 144 tokens, ``view(-1, H)``) lay out their soft tokens.

    Args:
      input_ids: the prompts' token ids: ``[S]`` (one sequence), ``[B, S]`` (a padded batch: pad with
        any id other than ``token_id``) or a list of 1-D tensors (the prompts of a ragged batch).
      token_id: the placeholder id (``config.image_token_id``; Llama 4's ``<|patch|>``).
      num_soft_tokens: N, the number of soft tokens the vision tower produced for these prompts. Given,
        nothing reads a device value on the host (cumsum and scatter into ``[N]``): surplus
        placeholders get no soft token, and slots beyond the placeholder count are ``SKIP``. None:
        N is the placeholder count, which takes a host synchronisation (``nonzero``).
      start, stop: the window ``[start, stop)`` of each sequence's positions whose rows are in this
        step (MAX's ``processed_length`` and ``processed_length + active_length``): an int for every
        sequence, a list of ints, or a 1-D integer tensor with one entry per sequence (moved to the
        ids' device, never read on the host). Placeholders before ``start`` (already processed, e.g.
        a prefix-cache hit) or at/after ``stop`` (a later chunk) are ``SKIP``. Defaults: 0 and the
        sequence's length (S for a tensor, each prompt's length for a list; a ``start`` past it then
        gives an empty window). ``stop`` may pass the length (a decode step after the prompt).
      row_offsets: the row of the embeddings that holds each sequence's position ``start`` (same
        forms). Default: the windows back to back, ``cumsum(stop - start)`` exclusive: the ragged
        flattened batch ``[sum of window lengths, H]`` of MAX; without windows that is ``b * S`` for a
        ``[B, S]`` batch, the rows of ``inputs_embeds.view(-1, H)``, and the prompts concatenated for
        a list.
      return_count: also return the number of placeholder tokens (all of them, in the window or not)
        as a 0-d int64 tensor on the ids' device, for ``check_soft_token_count`` later.

    Returns:
      ``indices`` [N] int64 on the ids' device (``SKIP`` = INT32_MIN, so ``.int()`` gives MAX's int32
      indices), or ``(indices, count)`` with ``return_count``.

    Window values given as ints are checked (``0 <= start <= stop``); given as tensors they are not
    (that would read them on the host). A row past the end of ``inputs_embeds`` (row offsets that do
    not match it) is an error of the CPU kernel and skipped by the CUDA kernel.
    """
    ids, seq, pos, lengths = _flatten(input_ids, token_id)
    device = ids.device
    first = _per_sequence("start", start, lengths)
    end = _per_sequence("stop", stop, lengths)
    _check_window(start, stop)
    window = (end - first).clamp(min=0)  # a start past the default stop (the length): an empty window
    if row_offsets is None:
        offsets = torch.cumsum(window, 0) - window
    else:
        offsets = _per_sequence("row_offsets", row_offsets, lengths)
    w_start, w_stop, w_row = first[seq], first[seq] + window[seq], offsets[seq]
    inside = (pos >= w_start) & (pos < w_stop)
    rows = torch.where(inside, pos - w_start + w_row, SKIP)
    mask = ids == token_id
    count = mask.sum()
    if num_soft_tokens is None:
        indices = rows[mask]  # nonzero: reads the count on the host
    else:
        n = num_soft_tokens
        if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or (isinstance(n, int) and n < 0):
            raise ValueError(f"soft_token_indices: `num_soft_tokens` must be a non-negative int, got {n!r}")
        slot = torch.cumsum(mask, 0) - 1  # the soft token of each placeholder
        # non-placeholders and surplus placeholders go to a spare slot n, dropped below
        slot = torch.where(mask & (slot < n), slot, n)
        indices = torch.full((n + 1,), SKIP, dtype=torch.int64, device=device).scatter_(0, slot, rows)[:n]
    return (indices, count) if return_count else indices


def check_soft_token_count(count: torch.Tensor | int, num_soft_tokens: int) -> None:
    """Raise ``ValueError`` (HF's message) when the placeholder ``count`` from
    ``soft_token_indices(..., return_count=True)`` differs from the number of soft tokens.

    This reads ``count`` on the host: a synchronisation with the device. Call it off the hot path
    (after the step, in a debug mode, or once per request), never between the merge and the decoder.
    """
    tokens = int(count)
    if tokens != num_soft_tokens:
        raise ValueError(f"Image features and image tokens do not match, tokens: {tokens}, features: {num_soft_tokens}")


def _flatten(input_ids, token_id):
    """(ids [L], sequence of each token [L], position in its sequence [L], sequence lengths [B] int64),
    all on the ids' device."""
    if not isinstance(token_id, int) or isinstance(token_id, bool):
        raise TypeError(f"soft_token_indices: `token_id` must be an int, got {token_id!r}")
    if isinstance(input_ids, torch.Tensor):
        _check_ids(input_ids, "input_ids")
        if input_ids.dim() not in (1, 2):
            raise ValueError(f"soft_token_indices: `input_ids` must have shape [S] or [B, S], got "
                             f"{list(input_ids.shape)} (a ragged batch: a list of 1-D tensors)")
        ids2 = input_ids if input_ids.dim() == 2 else input_ids[None]
        b, s = ids2.shape
        device = ids2.device
        seq = torch.arange(b, device=device)[:, None].expand(b, s).reshape(-1)
        lengths = torch.ones(b, dtype=torch.int64, device=device) * s
        return ids2.reshape(-1), seq, torch.arange(s, device=device).repeat(b), lengths
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise TypeError("soft_token_indices: `input_ids` must be a tensor [S] / [B, S] or a non-empty list of 1-D "
                        f"tensors, got {type(input_ids).__name__}")
    for i, t in enumerate(input_ids):
        _check_ids(t, f"input_ids[{i}]")
        if t.dim() != 1 or t.device != input_ids[0].device:
            raise ValueError(f"soft_token_indices: `input_ids[{i}]` must be a 1-D tensor on {input_ids[0].device} "
                             f"(the ragged batch's prompts), got shape {list(t.shape)} on {t.device}")
    device = input_ids[0].device
    sizes = [t.shape[0] for t in input_ids]
    lengths = torch.tensor(sizes, dtype=torch.int64, device=device)
    total = sum(sizes)
    seq = torch.repeat_interleave(torch.arange(len(sizes), device=device), lengths, output_size=total)
    starts = torch.cumsum(lengths, 0) - lengths
    ids = torch.cat([t.to(torch.int64) for t in input_ids])
    return ids, seq, torch.arange(total, device=device) - starts[seq], lengths


def _check_ids(t, name):
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"soft_token_indices: `{name}` must be an integer tensor of token ids, got {what}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _all_ints(v) -> bool:
    return isinstance(v, (list, tuple)) and all(_is_int(x) for x in v)


def _per_sequence(name, value, lengths):
    """One int64 entry per sequence on the lengths' device, from an int, a list of ints or a 0-d / 1-D
    integer tensor; None: 0 for `start`, the sequence length for `stop`."""
    batch = lengths.shape[0]
    if value is None:
        return torch.zeros_like(lengths) if name == "start" else lengths
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"soft_token_indices: `{name}` must be an int, a list of ints or a 1-D integer tensor "
                             f"with one entry per sequence, got a {value.dtype} tensor of shape {list(value.shape)}")
        if value.dim() == 1 and value.shape[0] != batch:
            raise ValueError(f"soft_token_indices: `{name}` must have one entry per sequence ({batch}), got "
                             f"{value.shape[0]}")
        return value.to(device=lengths.device, dtype=torch.int64).expand(batch)
    if _is_int(value):
        return torch.full_like(lengths, value)
    if not _all_ints(value):
        raise ValueError(f"soft_token_indices: `{name}` must be an int, a list of ints or a 1-D integer tensor, got "
                         f"{value!r}")
    if len(value) != batch:
        raise ValueError(f"soft_token_indices: `{name}` must have one entry per sequence ({batch}), got {len(value)}")
    return torch.tensor(list(value), dtype=torch.int64, device=lengths.device)


def _check_window(start, stop):
    """0 <= start <= stop where they are given as ints (tensors are not read on the host)."""
    def listed(v):
        return [v] if _is_int(v) else list(v) if _all_ints(v) else []

    first, end = listed(start), listed(stop)
    count = max(len(first), len(end))
    where = (lambda b: f" for sequence {b}") if count > 1 else (lambda b: "")
    for b, lo in enumerate(first):
        if lo < 0:
            raise ValueError(f"soft_token_indices: `start` must be >= 0, got {lo}{where(b)}")
    if first and end:
        for b in range(count):
            lo, hi = first[b if len(first) > 1 else 0], end[b if len(end) > 1 else 0]
            if hi < lo:
                raise ValueError(f"soft_token_indices: `stop` must be >= `start`, got the window [{lo}, {hi}){where(b)}")
