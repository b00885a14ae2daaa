"""The recognizer recipe's frozen layers: what `--frozen-blocks` keeps at ImageNet weights and statistics."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="the train extra is not installed")
pytest.importorskip("efficientnet_lite_pytorch", reason="the train extra is not installed")


@pytest.mark.parametrize("frozen", [0, 3])
def test_frozen_blocks_keep_their_weights_and_batch_norm_statistics(frozen):
    from retrain.recognizer import build_model

    net = build_model(32, frozen)
    blocks = net.backbone._blocks
    net.train()
    for k, block in enumerate(blocks):
        trainable = any(p.requires_grad for p in block.parameters())
        assert trainable == (k >= frozen), f"block {k} with {frozen} frozen"
        assert block.training == (k >= frozen), f"block {k} batch norm with {frozen} frozen"
    assert not any(p.requires_grad for p in net.backbone._conv_stem.parameters())
    assert not net.backbone._bn0.training  # the stem is always ImageNet's
    assert all(p.requires_grad for p in net.proj.parameters())
