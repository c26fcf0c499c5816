from __future__ import annotations

import pytest
import torch

from shared.ml.checkpoint import checkpoint_bytes, load_checkpoint
from shared.ml.model import ScreeningNetConfig, build_model

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
SMALL = ScreeningNetConfig(input_height=128, input_width=104, stage_channels=(8, 16, 32, 32))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_gives_one_logit_per_view(device: str) -> None:
    model = build_model(SMALL).to(device).eval()
    with torch.inference_mode():
        logits = model(torch.randn(3, 1, 128, 104, device=device))
    assert logits.shape == (3,)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_rebuilds_its_own_model(device: str) -> None:
    torch.manual_seed(1)
    model = build_model(SMALL).eval()
    restored = load_checkpoint(checkpoint_bytes(model), device=torch.device(device))
    assert restored.config == SMALL
    x = torch.randn(2, 1, 128, 104)
    with torch.inference_mode():
        assert torch.allclose(model(x), restored(x.to(device)).cpu(), atol=1e-5)


def test_config_round_trips_through_a_plain_dict() -> None:
    assert ScreeningNetConfig.from_dict(SMALL.to_dict()) == SMALL
