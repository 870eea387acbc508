"""The offset store: solved offsets in memory up to a budget, the rest on disk, removed with the store."""

from __future__ import annotations

import pytest
import torch

from loraclr.offsets import OffsetStore


def test_offset_store_spills_past_its_budget(tmp_path):
    a, b, c = torch.randn(3, 4), torch.randn(5, 2), torch.randn(2, 2)
    store = OffsetStore(max_bytes=a.numel() * 4, parent=tmp_path / "spill")
    store["a"], store["b"], store["c"] = a, b, c  # "a" fills the budget: "b" and "c" go to disk
    assert list(store) == ["a", "b", "c"] and len(store) == 3 and store.spilled == 2
    for k, v in (("a", a), ("b", b), ("c", c)):
        assert torch.equal(store[k], v)
    store["b"] = 2 * b  # overwriting keeps one entry
    assert torch.equal(store["b"], 2 * b) and len(store) == 3
    del store["a"]
    assert "a" not in store and list(store) == ["b", "c"]
    assert [p for p in (tmp_path / "spill").iterdir()]  # the temporary folder lives under the parent
    store.close()
    assert not list((tmp_path / "spill").iterdir()) and len(store) == 0  # spilled entries are gone with it
    with pytest.raises(KeyError):
        store["zz"]
