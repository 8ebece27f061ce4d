from __future__ import annotations

import math

import pytest
import torch

from lightning_mqsp.dropout import draw_seed, keep_mask


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_keep_rate_is_one_minus_p(dropout_p: float) -> None:
    keep = keep_mask(7, num_heads=4, batch_size=2, query_positions=torch.arange(256), key_positions=torch.arange(256), dropout_p=dropout_p)
    n = keep.numel()
    rate = keep.float().mean().item()
    # 6 standard deviations of a binomial proportion: fails for a biased hash, not by chance.
    assert abs(rate - (1 - dropout_p)) < 6 * math.sqrt(dropout_p * (1 - dropout_p) / n), rate


def test_mask_depends_only_on_seed_and_positions() -> None:
    q, k = torch.arange(40), torch.arange(30)
    full = keep_mask(3, 2, 2, q, k, 0.3)
    # Any subset of rows or columns, in any order, draws the same decisions.
    rows, cols = torch.tensor([33, 2, 17]), torch.tensor([29, 0, 5, 6])
    assert torch.equal(keep_mask(3, 2, 2, rows, cols, 0.3), full[:, :, rows][:, :, :, cols])
    assert not torch.equal(keep_mask(4, 2, 2, q, k, 0.3), full)


def test_neighbouring_decisions_are_uncorrelated() -> None:
    keep = keep_mask(11, 1, 1, torch.arange(512), torch.arange(512), 0.5)[0, 0].float()
    for a, b in ((keep[:, :-1], keep[:, 1:]), (keep[:-1], keep[1:])):
        correlation = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(correlation) < 0.02, correlation


def test_seed_follows_torch_manual_seed() -> None:
    torch.manual_seed(5)
    first = draw_seed()
    torch.manual_seed(5)
    assert draw_seed() == first
