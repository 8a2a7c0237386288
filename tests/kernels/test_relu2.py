"""The squared-ReLU reference (definition, gradients) and its dispatch from the model's MLPs."""

import torch

from nemotron.kernels import relu2 as relu2_module
from nemotron.kernels.relu2 import relu2, relu2_reference


def test_relu2_reference_definition_and_gradcheck():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(relu2_reference(x), torch.relu(x) ** 2)
    assert torch.autograd.gradcheck(relu2_reference, (x,))
    nan = torch.tensor([float("nan"), -1.0, 2.0])
    assert relu2(nan)[0].isnan() and relu2(nan)[1:].tolist() == [0.0, 4.0]
    assert not relu2_module._use_triton(nan)  # CPU tensors take the reference


def test_mlp_and_experts_call_the_relu2_dispatcher(monkeypatch):
    from nemotron.models.nano3.mlp import MLP
    from nemotron.models.nano3.moe import GroupedExperts

    calls = []

    def fake_triton(x):
        calls.append(tuple(x.shape))
        return relu2_reference(x)

    monkeypatch.setattr(relu2_module, "_use_triton", lambda x: True)
    monkeypatch.setattr(relu2_module, "relu2_triton", fake_triton)
    MLP(8, 12, 0.02, 0.02)(torch.randn(5, 8))
    GroupedExperts(3, 8, 6, 0.02, 0.02)(torch.randn(4, 8), torch.tensor([1, 0, 3]))
    assert calls == [(5, 12), (1, 6), (0, 6), (3, 6)]
