"""Scripts set torch's threads from OMP_NUM_THREADS themselves (the variable, set after torch loads, is ignored)."""

from __future__ import annotations

import os

import pytest
import torch

from agents.threads import one_thread_default


def test_one_thread_default_sets_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
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
    finally:  # monkeypatch cannot restore a variable that one_thread_default set while it was unset
        torch.set_num_threads(before)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env
