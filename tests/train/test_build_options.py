"""Train-config switches that `build_model` applies to the model it builds."""

from __future__ import annotations

import torch

from nemotron.models.nano3 import MoE
from nemotron.train.loop import build_model

from .conftest import make_config


def test_train_config_switches_shared_expert_overlap(tmp_path):
    for enabled in (False, True):
        cfg = make_config(tmp_path, train={"moe_shared_expert_overlap": enabled})
        model, _ = build_model(cfg, torch.device("cpu"))
        layers = [m for m in model.modules() if isinstance(m, MoE)]
        assert layers and all(m.shared_expert_overlap is enabled for m in layers)
