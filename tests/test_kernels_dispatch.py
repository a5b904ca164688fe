"""Which encoder ``SAEKIT_ENCODER=auto`` picks: the faster one measured on a GPU (issue 16)."""

from __future__ import annotations

import pytest
import torch

from saekit.kernels import dispatch
from saekit.kernels.dispatch import ENCODER_TIMINGS, FUSED_JUMPRELU_MAX_D, encoder_path


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.delenv("SAEKIT_ENCODER", raising=False)


@pytest.mark.parametrize("timing", ENCODER_TIMINGS, ids=lambda t: f"{t.kind}-d{t.d}")
def test_auto_picks_the_encoder_measured_faster(timing):
    assert encoder_path(timing.kind, timing.d, torch.bfloat16) == timing.faster
    assert encoder_path(timing.kind, timing.d, torch.float16) == timing.faster


def test_the_table_holds_the_figures_of_issue_16():
    faster = {(t.kind, t.d): t.faster for t in ENCODER_TIMINGS}
    assert faster == {
        ("topk", 768): "plain",  # 7.76 ms fused against 3.91 ms
        ("topk", 4096): "plain",  # 176 ms against 39.3 ms
        ("jumprelu", 768): "fused",  # 5.5 ms against 8.5 ms
        ("jumprelu", 4096): "plain",  # 122 ms against 63 ms
    }
    assert "H200" in dispatch.MEASURED_ON


@pytest.mark.parametrize("d", [16, 256, 768, FUSED_JUMPRELU_MAX_D, FUSED_JUMPRELU_MAX_D + 1, 4096])
def test_fused_jumprelu_only_up_to_the_crossover(d):
    expected = "fused" if d <= FUSED_JUMPRELU_MAX_D else "plain"
    assert encoder_path("jumprelu", d, torch.bfloat16) == expected


@pytest.mark.parametrize("d", [16, 768, 1024, 4096, 8192])
def test_topk_and_everything_that_selects_with_it_take_the_plain_path(d):
    # AuxK and BatchTopK select with the TopK encoder: the same choice covers them.
    assert encoder_path("topk", d, torch.bfloat16) == "plain"


def test_float32_products_take_cublas_and_the_variable_overrides(monkeypatch):
    assert encoder_path("jumprelu", 768, torch.float32) == "plain"
    monkeypatch.setenv("SAEKIT_ENCODER", "fused")
    assert encoder_path("topk", 4096, torch.float32) == "fused"
    monkeypatch.setenv("SAEKIT_ENCODER", " Plain ")
    assert encoder_path("jumprelu", 768, torch.bfloat16) == "plain"
    monkeypatch.setenv("SAEKIT_ENCODER", "fastest")
    with pytest.raises(ValueError, match="use auto, fused or plain"):
        encoder_path("topk", 768, torch.bfloat16)


def test_the_triton_backend_falls_back_to_plain_past_the_fused_k(monkeypatch):
    pytest.importorskip("triton")
    from saekit.kernels import triton_backend

    W = torch.empty(4096, 768, dtype=torch.bfloat16)
    monkeypatch.setenv("SAEKIT_ENCODER", "fused")
    assert triton_backend.encoder_path("topk", 128, W) == "fused"
    assert triton_backend.encoder_path("topk", 129, W) == "plain"
    monkeypatch.delenv("SAEKIT_ENCODER")
    assert triton_backend.encoder_path("jumprelu", 1, W) == "fused"
    assert triton_backend.encoder_path("topk", 32, W) == "plain"
