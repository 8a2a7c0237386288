"""Regenerate tests/train/fixtures/megatron_optim.json: learning rates, weight decays and
weight-decay groups computed by Megatron-Core itself.

    pip install --no-deps --target /tmp/mc megatron-core==0.16.1   # CPU is enough
    PYTHONPATH=/tmp/mc:src python tests/train/make_megatron_optim_fixtures.py

Schedule cases: Megatron's `OptimizerParamScheduler` built as
`megatron/training/training.py:get_optimizer_param_scheduler` builds it for a sample-based run
(`--train-samples`, `--lr-warmup-samples`, `--lr-decay-style WSD`, `--lr-wsd-decay-samples`,
`--lr-wsd-decay-style`, `--lr-warmup-init 0`, constant weight decay), stepped as its
`train_step` steps it: by the global batch, only after an iteration whose update was applied.
For every iteration the fixture keeps the rate and the weight decay of each parameter group
during that iteration's optimizer step, and the rate Megatron's log reports for it (read after
the scheduler has stepped). Each case also carries the equivalent `scheduler`/`optimizer`
settings of this project (tokens = samples x seq_length), so tests/train/test_megatron_optim.py
needs neither Megatron nor this script. Random cases are drawn so that the decay start
(`stable_fraction_end` x total tokens) is exactly Megatron's integer anneal start.

Groups: Megatron's standard overrides (`get_standard_config_overrides`: weight-decay multiplier
0 for every 1-D parameter and every `*.bias`), applied with its own `ParamKey.matches` to every
parameter of the tests' tiny hybrid model (Mamba, attention and MoE layers) and to a few
synthetic names/shapes.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "fixtures" / "megatron_optim.json"
WSD_STYLES = {"linear": "linear", "cosine": "cosine", "1-sqrt": "minus_sqrt"}


class _Groups:
    """What the scheduler needs of an optimizer: its param groups (a decayed and a no-decay
    group, with Megatron's wd_mult)."""

    def __init__(self) -> None:
        self.param_groups = [{"wd_mult": 1.0}, {"wd_mult": 0.0}]


def schedule_case(
    name: str,
    *,
    seq: int,
    gbs: int,
    iters: int,
    warmup: int,
    wsd: int,
    lr: float,
    min_lr: float,
    style: str,
    wd: float,
    skipped: tuple[int, ...] = (),
    extra_iters: int = 0,
) -> dict:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    total = iters * gbs  # samples (Megatron's --train-samples, its lr_decay_samples)
    stable_fraction_end = (total - wsd) / total
    # Ours starts the decay at stable_fraction_end x total tokens: the case is only a
    # like-for-like comparison when that product is Megatron's anneal start exactly.
    assert stable_fraction_end * (total * seq) == (total - wsd) * seq, name
    opt = _Groups()
    sched = OptimizerParamScheduler(
        opt,
        init_lr=0.0,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total,
        lr_decay_style="WSD",
        start_wd=wd,
        end_wd=wd,
        wd_incr_steps=total,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=False,
        wsd_decay_steps=wsd,
        lr_wsd_decay_style=WSD_STYLES[style],
    )
    rates, weight_decays, logged = [], [], []
    for iteration in range(1, iters + extra_iters + 1):
        rates.append(opt.param_groups[0]["lr"])
        weight_decays.append([g["weight_decay"] for g in opt.param_groups])
        if iteration not in skipped:  # train_step: opt_param_scheduler.step only if update_successful
            sched.step(increment=gbs)
        logged.append(opt.param_groups[0]["lr"])  # training_log reads it after the step
    return {
        "name": name,
        "megatron": {
            "seq_length": seq,
            "global_batch_size": gbs,
            "train_samples": total,
            "lr_warmup_samples": warmup,
            "lr_wsd_decay_samples": wsd,
            "lr": lr,
            "min_lr": min_lr,
            "lr_wsd_decay_style": WSD_STYLES[style],
            "weight_decay": wd,
        },
        "ours": {
            "scheduler": {
                "style": "wsd",
                "warmup_tokens": warmup * seq,
                "stable_fraction_end": stable_fraction_end,
                "decay_style": style,
            },
            "optimizer": {"lr": lr, "min_lr": min_lr, "weight_decay": wd},
            "total_tokens": total * seq,
            "tokens_per_step": gbs * seq,
        },
        "skipped": list(skipped),
        "rates": rates,
        "weight_decays": weight_decays,
        "logged": logged,
    }


def schedule_cases() -> list[dict]:
    cases = [
        # the recipe's shape at a small scale: warmup 3 steps, decay over the last 20%
        dict(
            name="recipe shape",
            seq=8,
            gbs=4,
            iters=20,
            warmup=12,
            wsd=16,
            lr=1e-3,
            min_lr=1e-5,
            style="cosine",
        ),
        dict(
            name="recipe linear",
            seq=8,
            gbs=4,
            iters=20,
            warmup=12,
            wsd=16,
            lr=1e-3,
            min_lr=1e-5,
            style="linear",
        ),
        dict(
            name="recipe 1-sqrt",
            seq=8,
            gbs=4,
            iters=20,
            warmup=12,
            wsd=16,
            lr=1e-3,
            min_lr=1e-5,
            style="1-sqrt",
        ),
        # no warmup; warmup of one step; warmup ending between two steps' sample counts
        dict(name="no warmup", seq=4, gbs=2, iters=10, warmup=0, wsd=4, lr=0.3, min_lr=0.03, style="linear"),
        dict(
            name="one-step warmup",
            seq=4,
            gbs=2,
            iters=10,
            warmup=2,
            wsd=4,
            lr=0.3,
            min_lr=0.03,
            style="cosine",
        ),
        dict(
            name="warmup between steps",
            seq=3,
            gbs=4,
            iters=10,
            warmup=7,
            wsd=8,
            lr=1.0,
            min_lr=0.1,
            style="linear",
        ),
        # the decay starting between two steps' sample counts
        dict(
            name="decay starts between steps",
            seq=2,
            gbs=8,
            iters=12,
            warmup=8,
            wsd=37,
            lr=2e-3,
            min_lr=2e-4,
            style="cosine",
        ),
        # warmup ending exactly where the decay starts; reaching past it (Megatron's warmup
        # runs up to its last sample count before the decay takes over)
        dict(
            name="warmup ends at decay start",
            seq=4,
            gbs=2,
            iters=10,
            warmup=8,
            wsd=12,
            lr=1.0,
            min_lr=0.1,
            style="linear",
        ),
        dict(
            name="warmup past decay start",
            seq=4,
            gbs=2,
            iters=10,
            warmup=4,
            wsd=20,
            lr=1.0,
            min_lr=0.1,
            style="linear",
        ),
        dict(
            name="warmup past decay start, cosine",
            seq=5,
            gbs=3,
            iters=9,
            warmup=12,
            wsd=18,
            lr=1.0,
            min_lr=0.0,
            style="cosine",
        ),
        # no stable phase at all (decay from the first sample); no decay at all
        dict(name="all decay", seq=4, gbs=2, iters=10, warmup=0, wsd=20, lr=1.0, min_lr=0.1, style="1-sqrt"),
        dict(name="no decay", seq=4, gbs=2, iters=10, warmup=4, wsd=0, lr=1.0, min_lr=0.1, style="cosine"),
        # min_lr equal to lr (flat after warmup), and min_lr 0
        dict(name="min_lr = lr", seq=4, gbs=2, iters=8, warmup=4, wsd=6, lr=0.5, min_lr=0.5, style="cosine"),
        dict(name="min_lr 0", seq=4, gbs=2, iters=8, warmup=4, wsd=6, lr=0.5, min_lr=0.0, style="linear"),
        # skipped iterations (the scheduler does not step): in warmup, at its end, in the decay
        dict(
            name="skipped iterations",
            seq=4,
            gbs=2,
            iters=12,
            warmup=6,
            wsd=8,
            lr=1.0,
            min_lr=0.1,
            style="cosine",
            skipped=(2, 3, 4, 9),
        ),
        # a run resumed longer with the checkpoint's schedule: min_lr past the decay's end
        dict(
            name="past the end",
            seq=4,
            gbs=2,
            iters=6,
            warmup=2,
            wsd=6,
            lr=1.0,
            min_lr=0.1,
            style="linear",
            extra_iters=4,
        ),
        dict(
            name="no decay, past the end",
            seq=4,
            gbs=2,
            iters=6,
            warmup=2,
            wsd=0,
            lr=1.0,
            min_lr=0.1,
            style="cosine",
            extra_iters=3,
        ),
    ]
    rng = random.Random(20261205)
    while len(cases) < 28:
        seq, gbs = rng.randint(1, 64), rng.randint(1, 16)
        iters = rng.randint(2, 40)
        total = iters * gbs
        wsd = rng.randint(0, total)
        if (total - wsd) / total * (total * seq) != (total - wsd) * seq:
            continue  # see schedule_case
        lr = 10 ** rng.uniform(-5, 0)
        cases.append(
            dict(
                name=f"random {len(cases)}",
                seq=seq,
                gbs=gbs,
                iters=iters,
                warmup=rng.randint(0, total - 1),  # Megatron asserts warmup < decay samples
                wsd=wsd,
                lr=lr,
                min_lr=lr * rng.choice([0.0, 0.01, rng.random(), 1.0]),
                style=rng.choice(sorted(WSD_STYLES)),
                skipped=tuple(sorted(rng.sample(range(1, iters + 1), rng.randint(0, min(3, iters))))),
            )
        )
    out = []
    for case in cases:
        case.setdefault("wd", 0.1)
        out.append(schedule_case(**case))  # type: ignore[arg-type]
    return out


def group_cases() -> dict:
    from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.train.conftest import TINY_MODEL

    from nemotron.config.schema import ModelConfig
    from nemotron.models.nano3.model import Nano3ForCausalLM

    overrides = get_standard_config_overrides(OptimizerConfig(lr=1e-3, min_lr=1e-5, weight_decay=0.1))

    def wd_mult(name: str, param: torch.Tensor) -> float:
        mults = [o.get("wd_mult", 1.0) for key, o in overrides.items() if key.matches(param, name)]
        return min(mults, default=1.0)

    with torch.device("meta"):
        model = Nano3ForCausalLM(ModelConfig(**TINY_MODEL).arch())
    model_params = {n: wd_mult(n, p) for n, p in model.named_parameters()}
    synthetic = [
        ("layers.0.mixer.o_proj.bias", [32, 4]),  # a bias of any shape: no decay
        ("layers.0.norm.weight", [32, 4]),  # a 2-D weight of a norm: decayed
        ("layers.0.mixer.scale", []),  # a scalar: decayed (only 1-D is exempt)
        ("layers.0.mixer.q_layernorm.weight", [16]),
        ("layers.0.mixer.conv1d.weight", [64, 1, 4]),
        ("embedding.word_embeddings.weight", [64, 32]),
        ("layers.0.mixer.gate", [8]),
    ]
    synthetic_params = [
        {"name": n, "shape": s, "wd_mult": wd_mult(n, torch.empty(s, device="meta"))} for n, s in synthetic
    ]
    return {"tiny_model": model_params, "synthetic": synthetic_params}


def main() -> None:
    import megatron.core

    fixture = {
        "megatron_core": megatron.core.__version__,
        "schedules": schedule_cases(),
        "groups": group_cases(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {OUT} ({len(fixture['schedules'])} schedules)")


if __name__ == "__main__":
    main()
