"""The tiny CPU job learns (loss well below the corpus's unigram entropy) and stays balanced."""

from nemotron.train import pretrain
from nemotron.train.metrics import read_metrics

from .conftest import make_config


def test_loss_falls_below_unigram_entropy_with_balanced_experts(tmp_path, corpus):
    cfg = make_config(
        tmp_path,
        blend=corpus[0],
        checkpoint={"save": None},
        train=dict(
            train_iters=60,
            global_batch_size=8,
            micro_batch_size=4,
            seq_length=32,
            eval_interval=30,
            eval_iters=1,
            expert_bias_update_rate=1e-2,
        ),
        optimizer=dict(lr=1e-2, min_lr=1e-4),
        scheduler=dict(warmup_tokens=5 * 8 * 32, stable_fraction_end=0.8),
    )
    summary = pretrain(cfg, tmp_path / "job")
    assert summary.unigram_entropy > 4.0
    assert summary.final_loss < 0.4 * summary.unigram_entropy
    assert summary.valid_loss < 0.5 * summary.unigram_entropy
    train = [r for r in read_metrics(tmp_path / "job") if r["kind"] == "train"]
    late = [r["balance/max_over_mean"] for r in train[20:]]
    assert sum(late) / len(late) < 1.5
    assert summary.balance_bias_range > 0
