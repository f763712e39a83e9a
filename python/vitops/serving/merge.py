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
        sequence's length (S for a tensor, each prompt's length for a list). ``stop`` may pass the
        length (a decode step after the prompt).
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
    (that would read them on the host): a window row that lands outside ``inputs_embeds`` is skipped
    by the CUDA kernel and an error on the CPU.
    """
    ids, seq, pos, lengths = _flatten(input_ids, token_id)
    device = ids.device
    batch = len(lengths)
    first = _per_sequence("start", start, lengths, device, default=[0] * batch)
    end = _per_sequence("stop", stop, lengths, device, default=lengths)
    _check_window(start, stop, lengths)
    if row_offsets is None:
        window = end - first
        offsets = torch.cumsum(window, 0) - window
    else:
        offsets = _per_sequence("row_offsets", row_offsets, lengths, device, default=None)
    w_start, w_stop, w_row = first[seq], end[seq], offsets[seq]
    inside = (pos >= w_start) & (pos < w_stop)
    rows = torch.where(inside, pos - w_start + w_row, SKIP)
    mask = ids == token_id
    count = mask.sum()
    if num_soft_tokens is None:
        indices = rows[mask]  # nonzero: reads the count on the host
    else:
        if not isinstance(num_soft_tokens, int) or isinstance(num_soft_tokens, bool) or num_soft_tokens < 0:
            raise ValueError(f"soft_token_indices: `num_soft_tokens` must be a non-negative int, got {num_soft_tokens!r}")
        n = num_soft_tokens
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
    """(ids [L], sequence of each token [L], position in its sequence [L], sequence lengths as ints)."""
    if not isinstance(token_id, int) or isinstance(token_id, bool):
        raise TypeError(f"soft_token_indices: `token_id` must be an int, got {token_id!r}")
    if isinstance(input_ids, torch.Tensor):
        _check_ids(input_ids, "input_ids")
        if input_ids.dim() not in (1, 2):
            raise ValueError(f"soft_token_indices: `input_ids` must have shape [S] or [B, S], got "
                             f"{list(input_ids.shape)} (a ragged batch: a list of 1-D tensors)")
        ids2 = input_ids if input_ids.dim() == 2 else input_ids[None]
        b, s = ids2.shape
        positions = torch.arange(s, device=ids2.device)
        seq = torch.arange(b, device=ids2.device)[:, None].expand(b, s).reshape(-1)
        return ids2.reshape(-1), seq, positions.repeat(b), [s] * b
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise TypeError("soft_token_indices: `input_ids` must be a tensor [S] / [B, S] or a non-empty list of 1-D "
                        f"tensors, got {type(input_ids).__name__}")
    for i, t in enumerate(input_ids):
        _check_ids(t, f"input_ids[{i}]")
        if t.dim() != 1 or t.device != input_ids[0].device:
            raise ValueError(f"soft_token_indices: `input_ids[{i}]` must be a 1-D tensor on {input_ids[0].device} "
                             f"(the ragged batch's prompts), got shape {list(t.shape)} on {t.device}")
    device = input_ids[0].device
    lengths = [int(t.shape[0]) for t in input_ids]
    ids = torch.cat([t.to(torch.int64) for t in input_ids])
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device), output_size=sum(lengths))
    starts = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))], dtype=torch.int64, device=device)
    return ids, seq, torch.arange(sum(lengths), device=device) - starts[seq], lengths


def _check_ids(t, name):
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"soft_token_indices: `{name}` must be an integer tensor of token ids, got {what}")


def _all_ints(v) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(x, int) for x in v)


def _per_sequence(name, value, lengths, device, default):
    """One int64 entry per sequence on `device`, from an int, a list of ints or a 1-D tensor."""
    batch = len(lengths)
    if value is None:
        value = default
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"soft_token_indices: `{name}` must be an int, a list of ints or a 1-D integer tensor "
                             f"with one entry per sequence, got a {value.dtype} tensor of shape {list(value.shape)}")
        if value.dim() == 1 and value.shape[0] != batch:
            raise ValueError(f"soft_token_indices: `{name}` must have one entry per sequence ({batch}), got "
                             f"{value.shape[0]}")
        return value.to(device=device, dtype=torch.int64).expand(batch)
    if isinstance(value, bool) or not (isinstance(value, int) or _all_ints(value)):
        raise ValueError(f"soft_token_indices: `{name}` must be an int, a list of ints or a 1-D integer tensor, got "
                         f"{value!r}")
    values = [value] * batch if isinstance(value, int) else list(value)
    if len(values) != batch:
        raise ValueError(f"soft_token_indices: `{name}` must have one entry per sequence ({batch}), got {len(values)}")
    return torch.tensor(values, dtype=torch.int64, device=device)


def _check_window(start, stop, lengths):
    """0 <= start <= stop for the windows given as ints (tensors are not read on the host)."""
    batch = len(lengths)

    def listed(v, default):
        if v is None:
            return default
        if isinstance(v, int):
            return [v] * batch
        return list(v) if _all_ints(v) else None

    first, end = listed(start, [0] * batch), listed(stop, lengths)
    for b in range(batch):
        lo = first[b] if first is not None else None
        hi = end[b] if end is not None else None
        if lo is not None and lo < 0:
            raise ValueError(f"soft_token_indices: `start` must be >= 0, got {lo} for sequence {b}")
        if lo is not None and hi is not None and hi < lo:
            raise ValueError(f"soft_token_indices: the window of sequence {b} is [{lo}, {hi}): `stop` must be >= "
                             "`start`")
