"""Which (query, key) pairs attend: the one visibility model that every backend and kernel reads.

A query at global position ``q`` sees a key at global position ``k`` when all of these hold
(``docs/design.md``, "Visibility"):

- the *window*: ``q - left <= k <= q + right`` (``None``: unbounded on that side). Full attention
  is ``(None, None)``, causal attention ``(None, 0)``, a causal sliding window of ``w`` keys
  (Mistral, Qwen2, Gemma) ``(w - 1, 0)``, a symmetric local window (ModernBERT) ``(w, w)``;
- the key is not padding (``key_padding_mask``, True = attend);
- query and key belong to the same document (``query_documents`` / ``key_documents``, ids that do
  not decrease along the sequence: packed sequences).

Scores may be soft-capped (``softcap * tanh(score / softcap)``, Gemma2) and the probabilities of
visible pairs dropped out (a hash of the positions, :mod:`lightning_mqsp.dropout`).

Positions come twice: as tensors, for the kernels, and as host-known *runs* of consecutive
positions (from the layout: one or two per rank), so that whole blocks can be skipped or taken
without a mask by looking at the runs alone, without reading a tensor on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lightning_mqsp.dropout import keep_mask
from lightning_mqsp.layout import Run, slice_runs


@dataclass(frozen=True)
class Window:
    """Keys at most ``left`` positions before and ``right`` after the query are visible (None: no limit)."""

    left: int | None = None
    right: int | None = None

    @staticmethod
    def of(causal: bool, window: tuple[int | None, int | None] | None) -> Window:
        """The window of ``causal`` attention restricted to ``window`` = (left, right)."""
        left, right = window if window is not None else (None, None)
        if causal:
            right = 0 if right is None else min(right, 0)
        return Window(left, right)

    @property
    def is_full(self) -> bool:
        return self.left is None and self.right is None

    @property
    def is_causal(self) -> bool:
        """Plain causal attention: every earlier key and the key itself."""
        return self.left is None and self.right == 0

    def sees_any(self, query_first: int, query_last: int, key_first: int, key_last: int) -> bool:
        """Whether some query in positions [query_first, query_last] sees some key in [key_first, key_last]."""
        after_left = self.left is None or key_last >= query_first - self.left
        before_right = self.right is None or key_first <= query_last + self.right
        return after_left and before_right

    def sees_all(self, query_first: int, query_last: int, key_first: int, key_last: int) -> bool:
        """Whether every query in [query_first, query_last] sees every key in [key_first, key_last]."""
        after_left = self.left is None or key_first >= query_last - self.left
        before_right = self.right is None or key_last <= query_first + self.right
        return after_left and before_right

    def pairs(self, query_positions: Tensor, key_positions: Tensor) -> Tensor | None:
        """Bool [M, N]: which pairs the window lets through (None: all)."""
        if self.is_full:
            return None
        distance = query_positions.view(-1, 1) - key_positions.view(1, -1)  # q - k
        allowed = torch.ones(distance.shape, dtype=torch.bool, device=distance.device)
        if self.left is not None:
            allowed &= distance <= self.left
        if self.right is not None:
            allowed &= distance >= -self.right
        return allowed


def runs_of(positions: Tensor) -> tuple[Run, ...]:
    """The runs of consecutive positions in ``positions`` (reads the tensor: for tests and benchmarks;
    :func:`mqsp_attention` derives them from the layout instead)."""
    values = positions.tolist()
    runs: list[Run] = []
    for index, position in enumerate(values):
        if runs and position == runs[-1][2] + (index - runs[-1][0]):
            runs[-1] = (runs[-1][0], index + 1, runs[-1][2])
        else:
            runs.append((index, index + 1, position))
    return tuple(runs)


@dataclass(frozen=True)
class Visibility:
    """What M query rows may see of N keys, for one call of a local attention backend.

    ``query_positions`` [M] ascend within each of ``query_segments`` equal segments (the rows
    gathered from each rank), ``key_positions`` [N] ascend; both are int64 global positions, with
    ``query_runs`` / ``key_runs`` the same positions as host-known runs. ``key_padding_mask`` is
    [B, N] bool; ``query_documents`` [B, M] and ``key_documents`` [B, N] are integer document ids;
    ``dropout_seed`` is an int64 tensor of one element, equal on every rank.
    """

    query_positions: Tensor
    key_positions: Tensor
    query_runs: tuple[Run, ...]
    key_runs: tuple[Run, ...]
    query_segments: int = 1
    window: Window = Window()
    key_padding_mask: Tensor | None = None
    query_documents: Tensor | None = None
    key_documents: Tensor | None = None
    softcap: float | None = None
    dropout_p: float = 0.0
    dropout_seed: Tensor | None = None

    @classmethod
    def for_positions(cls, query_positions: Tensor, key_positions: Tensor, **fields: object) -> Visibility:
        """A visibility for arbitrary position tensors, reading them once for their runs (tests, benchmarks)."""
        return cls(query_positions, key_positions, runs_of(query_positions), runs_of(key_positions), **fields)  # type: ignore[arg-type]

    @property
    def has_documents(self) -> bool:
        return self.key_documents is not None

    @property
    def masks_within_runs(self) -> bool:
        """Whether pairs must be masked beyond what the window and the runs say (padding or documents)."""
        return self.key_padding_mask is not None or self.key_documents is not None

    def visible_pairs(self, batch_size: int, rows: slice = slice(None), keys: slice = slice(None)) -> Tensor | None:
        """Bool [B or 1, 1, m, n]: True where query row ``rows`` may attend key ``keys`` (index ranges; all by
        default); None when every pair may."""
        allowed = self.window.pairs(self.query_positions[rows], self.key_positions[keys])
        allowed = None if allowed is None else allowed[None, None]
        if self.key_padding_mask is not None:
            padding = self.key_padding_mask[:, keys].reshape(batch_size, 1, 1, -1)
            allowed = padding if allowed is None else allowed & padding
        if self.key_documents is not None:
            assert self.query_documents is not None
            query_documents, key_documents = self.query_documents[:, rows], self.key_documents[:, keys]
            same = query_documents.reshape(batch_size, 1, -1, 1) == key_documents.reshape(batch_size, 1, 1, -1)
            allowed = same if allowed is None else allowed & same
        return allowed

    def dropout_scale(self, batch_size: int, num_heads: int) -> Tensor | None:
        """Float [B, H, M, N]: 1/(1-p) where dropout keeps the probability, 0 where it drops it; None without dropout."""
        if self.dropout_p == 0.0:
            return None
        assert self.dropout_seed is not None, "dropout needs a seed"
        keep = keep_mask(self.dropout_seed, num_heads, batch_size, self.query_positions, self.key_positions, self.dropout_p)
        return keep.float() / (1.0 - self.dropout_p)

    def _segments_in(self, start: int, stop: int) -> int:
        """How many query segments rows [start, stop) hold: rows within one segment, or whole segments."""
        length = self.query_positions.numel() // self.query_segments
        if stop - start <= 1 or start // length == (stop - 1) // length:
            return 1
        if start % length or stop % length:
            raise ValueError(f"rows [{start}, {stop}) cut through a query segment of {length} rows")
        return (stop - start) // length

    def block(self, rows: slice, keys: slice) -> Visibility:
        """The visibility of query rows ``rows`` against keys ``keys`` (contiguous index ranges; the rows
        within one query segment, or whole segments)."""
        r0, r1, _ = rows.indices(self.query_positions.numel())
        k0, k1, _ = keys.indices(self.key_positions.numel())
        return replace(
            self,
            query_positions=self.query_positions[r0:r1],
            key_positions=self.key_positions[k0:k1],
            query_runs=slice_runs(self.query_runs, r0, r1),
            key_runs=slice_runs(self.key_runs, k0, k1),
            query_segments=self._segments_in(r0, r1),
            key_padding_mask=None if self.key_padding_mask is None else self.key_padding_mask[:, k0:k1],
            query_documents=None if self.query_documents is None else self.query_documents[:, r0:r1],
            key_documents=None if self.key_documents is None else self.key_documents[:, k0:k1],
        )


__all__ = ["Visibility", "Window", "runs_of"]
