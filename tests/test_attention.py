"""Attention over a long prompt's rows in blocks (models.base.by_query_blocks): the same rows as at once."""

from __future__ import annotations

import pytest
import torch

from dsrun.models import base
from dsrun.models.deepseek2 import attend_latent


def use_small_blocks(monkeypatch) -> None:
    """Scores of 4 heads over 40 positions: 3 rows a block, so 10 new rows take 4 blocks (one ragged)."""
    monkeypatch.setattr(base, "SCORES_BYTES", 3 * 4 * 4 * 40)
    assert base.query_rows(4, 40) == 3


def whole_and_blocked(attention, monkeypatch):
    whole = attention()
    use_small_blocks(monkeypatch)
    return whole, attention()


@pytest.mark.parametrize("groups", [4, 2], ids=["mha", "gqa"])
def test_attend_in_blocks_equals_attend_at_once(groups, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(10, 4, 16, generator=g)  # (n, H, D): rows 30..39 of a 40-position cache
    k, v = torch.randn(40, groups, 16, generator=g), torch.randn(40, groups, 8, generator=g)
    whole, blocked = whole_and_blocked(lambda: base.attend(q, k, v, 30, 0.25), monkeypatch)
    assert blocked.shape == (10, 4, 8)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)


def test_latent_attention_in_blocks_equals_at_once(monkeypatch):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(10, 4, 24, generator=g)  # (n, H, C + R) with C = 16
    kv = torch.randn(40, 24, generator=g)  # (N, C + R)
    whole, blocked = whole_and_blocked(lambda: attend_latent(q, kv, 16, 30, 0.25), monkeypatch)
    assert blocked.shape == (10, 4, 16)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-6)


def test_a_block_reads_only_the_positions_it_sees(monkeypatch):
    """The first block's rows (positions 30-32) never see positions 33 on: garbage there changes nothing."""
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(10, 4, 16, generator=g), torch.randn(40, 4, 16, generator=g), torch.randn(40, 4, 8)
    use_small_blocks(monkeypatch)
    seen = []
    monkeypatch.setattr(
        base, "attend_block", lambda qb, kb, vb, s, scale: seen.append((len(qb), len(kb), s)) or qb[..., :8]
    )
    base.attend(q, k, v, 30, 0.25)
    assert seen == [(3, 33, 30), (3, 36, 33), (3, 39, 36), (1, 40, 39)]
