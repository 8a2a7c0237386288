"""Pipeline-parallel training steps (the loop's `train_step` on this rank's stages) against one
process training the whole model on the same global batch: losses, gradient norm, every
parameter's gradient and the expert biases, step after step."""

from __future__ import annotations

import torch
from models.tiny import tiny_config  # the one tiny Nano3 of the test suite (tests/models/tiny.py)
from torch.distributed.tensor import DTensor

from nemotron.config.schema import ModelConfig, PretrainConfig
from nemotron.data.config import DataConfig
from nemotron.distributed.context_parallel import cp_shard
from nemotron.models.nano3 import Nano3ForCausalLM
from nemotron.train.balancing import update_expert_biases
from nemotron.train.config import TrainConfig
from nemotron.train.data import collate
from nemotron.train.fp8 import Fp8Config, apply_fp8
from nemotron.train.loop import Parallel, build_model, compile_model, evaluate, train_step

from .harness import assert_no_new_graphs, compiled_graphs

SEED, LR, BIAS_RATE = 5, 0.05, 0.01


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it steps with (full tensors, by name)."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        self.names = {p: n for n, p in model.named_parameters()}
        super().__init__(model.parameters(), lr=lr)
        self.grads: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        self.grads = {}
        for p, name in self.names.items():
            if p.grad is not None:
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                self.grads[name.replace("_checkpoint_wrapped_module.", "")] = g.clone()
        return super().step(closure)


def make_config(
    parallel_kw: dict, model_kw: dict | None = None, seq: int = 8, global_batch: int = 8
) -> PretrainConfig:
    arch = tiny_config(**{"moe_seq_aux_loss_coeff": 0.1, **(model_kw or {})})
    fields = {f: getattr(arch, f) for f in arch.__dataclass_fields__}
    return PretrainConfig(
        model=ModelConfig(**fields, **parallel_kw),
        train=TrainConfig(
            train_iters=3,
            global_batch_size=global_batch,
            micro_batch_size=1,
            seq_length=seq,
            seed=SEED,
            precision="fp32",
            device="cpu",
            grad_clip=0.0,
            compute_weights="fp32",
        ),
        data=DataConfig(mock=True),
    )


def global_batch(
    step: int, size: int, seq: int, vocab: int, short: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """`size` samples of length `seq` with random loss masks (token counts differ per sample,
    so a mean of per-sample means would differ from the token mean); with `short`, samples
    1, 4, 5 (mod 6) have that length instead (lengths mixed within a step, the LC phase)."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, vocab, (size, seq + 1), generator=g)
    mask = (torch.rand(size, seq, generator=g) < 0.7).float()
    mask[:, 0] = 1.0
    lengths = [short if short is not None and i % 6 in (1, 4, 5) else seq for i in range(size)]
    return [
        {
            "tokens": tokens[i : i + 1, :n],
            "labels": tokens[i : i + 1, 1 : n + 1],
            "loss_mask": mask[i : i + 1, :n],
        }
        for i, n in enumerate(lengths)
    ]


def rank_micro_batches(samples, parallel: Parallel):
    """This rank's micro-batches (Megatron order: micro-step m of DP rank r takes sample
    m * DP + r) with its CP chunks of every sequence."""
    mine = samples[parallel.dp_rank :: parallel.dp_size]
    return [{k: cp_shard(v, parallel.cp_rank, parallel.cp_size) for k, v in b.items()} for b in mine]


def compare_pipeline_with_single_process(
    rank: int,
    world_size: int,
    parallel_kw: dict,
    model_kw: dict | None = None,
    steps: int = 3,
    seq: int = 8,
    short: int | None = None,
    recompute: bool = False,
    grad_clip: float = 0.0,
    fp8: Fp8Config | None = None,
    global_batch_size: int = 8,
    pairs: bool = False,
    compile: bool = False,
) -> tuple[list[float], list[str]]:
    """Returns the losses and the names of the parameters this rank trained. `grad_clip` > 0
    clips both runs (to a norm below theirs: the recorded gradients are the clipped ones).
    `fp8`: both runs convert those layers (FP8 emulated on CPU) and train under bf16 autocast
    when the LM head is among them (its FP8 products need bf16 compute), each reusing the
    quantized weights within a step per `fp8.reuse_weights`. `pairs`: micro-batches of two
    samples as the loader collates them (with `short`, some right-padded: every stage's MoE
    blocks then leave the padding out of their balancing). `compile`: the stages' blocks are
    compiled as `train.compile` compiles them (`train.loop.compile_model`), and after the first
    step (evaluation and training) no graph is compiled again; the reference stays eager."""
    cfg = make_config(parallel_kw, model_kw, seq, global_batch_size)
    arch = cfg.model.arch()
    torch.manual_seed(SEED)
    reference = Nano3ForCausalLM(arch)
    torch.manual_seed(SEED)
    reference.reset_parameters()  # what build_model gives one process
    precision, reuse = "fp32", False
    if fp8 is not None:
        cfg.train.fp8 = fp8
        ref_summary = apply_fp8(reference, fp8, torch.device("cpu"))
        precision = "bf16" if "lm_head" in fp8.layers else "fp32"
        cfg.train.precision, reuse = precision, fp8.reuse_weights
    ref_opt = RecordingSGD(reference, LR)
    # float32 steps match to float32 rounding. Under bf16 autocast (FP8 LM head) the stages sum
    # the same products in another order, which flips FP8 roundings (an e5m2 element of the LM
    # head's weight gradient by 12.5%): step 0 matches to bf16's rounding, later steps drift
    # (measured: grad norm 0.3% apart at step 1), so they are held to 1%
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=2e-3, atol=1e-5)
    drift_tol = tol if precision == "fp32" else dict(rtol=1e-2, atol=1e-5)
    grad_tol = dict(rtol=1e-4, atol=1e-6) if precision == "fp32" else dict(rtol=2e-2, atol=0.0)

    cfg.train.activation_recompute = recompute
    model, parallel = build_model(cfg, torch.device("cpu"))
    assert parallel.pipeline is not None
    if compile:
        assert compile_model(model, parallel) is model  # compiled in place: the same names
    if fp8 is not None:
        # what the run announces: every stage's conversions (gathered over the pipeline ranks),
        # the whole model's
        summary = getattr(model, "fp8_summary")
        assert summary is not None and summary.describe() == ref_summary.describe(), summary
        assert (summary.experts, summary.lm_head) == (ref_summary.experts, ref_summary.lm_head)
    opt = RecordingSGD(model, LR)

    def batch(step: int, size: int) -> list[dict[str, torch.Tensor]]:
        samples = global_batch(step, size, seq, arch.vocab_size, short)
        if pairs:
            rows = [{k: v[0] for k, v in b.items()} for b in samples]
            samples = [collate(rows[i : i + 2]) for i in range(0, len(rows), 2)]
        return samples

    losses = []
    for step in range(steps):
        where = f"step {step}"
        step_tol = tol if step == 0 else drift_tol
        # evaluation through the pipeline (forward-only schedules) on held-out batches of 3
        # and 1 micro-batch(es) per DP rank (not a multiple of the stages; fewer than them):
        # the single process's loss, with the routers' counters left as they were
        dp = parallel.dp_size
        held_out = batch(100 + step, (3 if step % 2 == 0 else 1) * dp * (2 if pairs else 1))
        counters = [m.router.tokens_per_expert.clone() for m in model.moe_layers()]
        want = evaluate(reference, held_out, device=torch.device("cpu"), precision=precision)
        got = evaluate(
            model,
            rank_micro_batches(held_out, parallel),
            device=torch.device("cpu"),
            precision=precision,
            parallel=parallel,
        )
        torch.testing.assert_close(got, want, **step_tol, msg=f"{where}: evaluation {got} vs {want}")
        for layer, before in zip(model.moe_layers(), counters):
            assert torch.equal(layer.router.tokens_per_expert, before), f"{where}: evaluation counted tokens"
        samples = batch(step, cfg.train.global_batch_size)
        ref = train_step(
            reference,
            ref_opt,
            samples,
            device=torch.device("cpu"),
            precision=precision,
            grad_clip=grad_clip,
            reuse_fp8_weights=reuse,
        )
        assert grad_clip == 0.0 or ref.grad_norm > grad_clip, "the clip would not act"
        update_expert_biases(reference.moe_layers(), BIAS_RATE)
        ours = train_step(
            model,
            opt,
            rank_micro_batches(samples, parallel),
            device=torch.device("cpu"),
            precision=precision,
            grad_clip=grad_clip,
            parallel=parallel,
            reuse_fp8_weights=reuse,
        )
        update_expert_biases(model.moe_layers(), BIAS_RATE, parallel.balancing_group)
        torch.testing.assert_close(ours.lm_loss, ref.lm_loss, **step_tol, msg=where)
        torch.testing.assert_close(ours.loss, ref.loss, **step_tol, msg=where)
        assert ours.loss != ours.lm_loss  # the balance term is in the loss
        torch.testing.assert_close(
            ours.grad_norm, ref.grad_norm, **step_tol, msg=f"{where}: {ours.grad_norm} vs {ref.grad_norm}"
        )
        assert opt.grads, "no gradients on this rank"
        for name, grad in opt.grads.items():
            want = ref_opt.grads[name]
            if precision == "fp32":
                torch.testing.assert_close(grad, want, **grad_tol, msg=lambda m: f"{where}, {name}: {m}")
            elif step == 0:
                # per tensor, relative to its norm, on the first step: under bf16 autocast the
                # stages sum the same products in another order, which flips FP8 roundings; the
                # runs then drift apart (losses and norms still checked every step)
                rel = float((grad - want).norm() / want.norm().clamp_min(1e-12))
                assert rel < grad_tol["rtol"], f"{where}, {name}: relative error {rel:.2e}"
        by_name = dict(reference.named_modules())
        for name, module in model.named_modules():
            if hasattr(module, "expert_bias") and hasattr(module, "tokens_per_expert"):
                ref_router = by_name[name.replace("_checkpoint_wrapped_module.", "")]
                # exact while the runs agree; once FP8 roundings drift (bf16, after step 0) a
                # token near a routing tie may pick another expert: each update moves a bias by
                # +-BIAS_RATE, so at most 2 BIAS_RATE per drifted step
                bias_tol = {} if precision == "fp32" else dict(rtol=0.0, atol=2 * BIAS_RATE * step + 1e-7)
                torch.testing.assert_close(
                    module.expert_bias, ref_router.expert_bias, **bias_tol, msg=f"{where}, {name}"
                )
        # after the step, this rank's parameters (gathered over the stage's shards), tensor by
        # tensor: what the optimizer made of the gradients above
        ref_params = dict(reference.named_parameters())
        for name, param in model.named_parameters():
            name = name.replace("_checkpoint_wrapped_module.", "")
            full = param.full_tensor() if isinstance(param, DTensor) else param
            if precision == "fp32" or step == 0:
                param_tol = tol if precision == "fp32" else dict(rtol=2e-3, atol=LR * 2e-2)
                torch.testing.assert_close(
                    full, ref_params[name], **param_tol, msg=lambda m: f"{where}, parameter {name}: {m}"
                )
        losses.append(ours.loss)
        if compile and step == 0:
            warm = compiled_graphs()
        elif compile:
            assert_no_new_graphs(warm, where)
    return losses, sorted(opt.grads)
