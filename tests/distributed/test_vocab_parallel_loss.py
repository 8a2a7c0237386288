"""The vocab-parallel token loss (`tensor_parallel.vocab_parallel_cross_entropy`) per row
against `F.cross_entropy` on the whole logits, on 2 gloo ranks: every loss and every logit
gradient, ignored rows, and labels outside the vocabulary (NaN, as on one device)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nemotron.distributed.tensor_parallel import vocab_parallel_cross_entropy
from nemotron.kernels.cross_entropy import IGNORE_INDEX

from ._spawn import run_distributed

VOCAB = 10
LABELS = [3, 0, 9, 5, IGNORE_INDEX, -1, VOCAB, 7]  # two out of the vocabulary: -1 and VOCAB
INVALID = {5, 6}  # their rows


def _rank(rank: int, world: int):
    torch.manual_seed(0)
    logits = torch.randn(len(LABELS), VOCAB, dtype=torch.float64)
    labels = torch.tensor(LABELS)
    local_width = VOCAB // world
    local = logits[:, rank * local_width : (rank + 1) * local_width].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, labels, rank * local_width, VOCAB, dist.group.WORLD)
    weights = torch.arange(1, len(LABELS) + 1, dtype=loss.dtype)  # a distinct upstream gradient per row
    loss.backward(weights)
    return loss.detach(), local.grad


def test_vocab_parallel_loss_per_row_matches_cross_entropy():
    results = run_distributed(_rank, 2)
    torch.manual_seed(0)
    logits = torch.randn(len(LABELS), VOCAB, dtype=torch.float64)
    for row, label in enumerate(LABELS):
        grads = torch.cat([results[r][1][row] for r in range(2)])
        for rank in range(2):
            loss = results[rank][0][row].item()
            if row in INVALID:
                assert math.isnan(loss), (row, rank, loss)
            elif label == IGNORE_INDEX:
                assert math.isfinite(loss)  # read by no one: the caller weights it 0
            else:
                expected = F.cross_entropy(logits[row : row + 1], torch.tensor([label])).item()
                assert abs(loss - expected) < 1e-6, (row, rank, loss, expected)  # float32 inside
        if row in INVALID:
            assert torch.isnan(grads).all(), (row, grads)
        elif label != IGNORE_INDEX:
            leaf = logits[row : row + 1].clone().requires_grad_(True)
            (F.cross_entropy(leaf, torch.tensor([label])) * (row + 1)).backward()
            torch.testing.assert_close(grads.double(), leaf.grad[0], rtol=0, atol=1e-6)
