"""Scripts set torch's threads from OMP_NUM_THREADS themselves (the variable, set after torch loads, is ignored)."""

from __future__ import annotations

import pytest
import torch

from agents.threads import one_thread_default


def test_one_thread_default_sets_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        assert one_thread_default() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert one_thread_default() == 2 and torch.get_num_threads() == 2
        for bad in ("0", "two"):
            monkeypatch.setenv("OMP_NUM_THREADS", bad)
            with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
                one_thread_default()
    finally:
        torch.set_num_threads(before)
