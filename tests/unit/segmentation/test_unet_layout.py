"""The CPU network runs in channels-last layout (oneDNN's fast path) with unchanged outputs."""

from __future__ import annotations

import copy

import torch

from stemagent.segmentation.unet_segmenter import default_weights_path, load_network


def test_loaded_network_is_channels_last_and_matches_the_contiguous_layout() -> None:
    model, _ = load_network(default_weights_path(), torch.device("cpu"))
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()

    reference = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fast = model(x.contiguous(memory_format=torch.channels_last))
        slow = reference(x)
    assert fast.shape == slow.shape
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_the_config_chooses_the_layout() -> None:
    from stemagent.agent.app.factory import build_segmenter
    from stemagent.config import config_from_dict

    def first_conv(seg) -> torch.Tensor:
        return next(m for m in seg.model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1).weight

    base = {"name": "layout", "pipeline": {"segmenter": {"kind": "unet", "device": "cpu"}}}
    fast = build_segmenter(config_from_dict(base))
    assert first_conv(fast).is_contiguous(memory_format=torch.channels_last) and not first_conv(fast).is_contiguous()
    old = build_segmenter(config_from_dict({**base, "pipeline": {"segmenter": {"kind": "unet", "device": "cpu", "channels_last": False}}}))
    assert first_conv(old).is_contiguous()
