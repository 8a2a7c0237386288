"""Loss parity of FP8 training (`train.fp8`) against BF16 on real text (issue 20).

The Nano3 proxy of `train_throughput.py` (first `--layers` Nano3 blocks at full width) trains
`--steps` optimizer steps twice from the same initialisation (same seed) on the same batches of
a prepared blend (`nemotron nano3 data prep pretrain -c tiny` builds one from the embedded
corpus): once in BF16 (bf16 compute weights, fp32 master weights and AdamW state, FSDP2 on a
one-GPU mesh, as the benchmarks run it) and once per `--recipes` entry with FP8 GEMMs on top.
Learning rate: linear warmup over `--lr-warmup` steps to `--lr`, then constant. The default,
100 steps to 3e-4, raises the rate by 3e-6 per step, as the recipe's warmup does (0 -> 1e-3 over
~333 steps), so the first steps, where Adam's updates are largest relative to the gradients, see
the recipe's rates. (With 30 steps, the default before 2026-12-05, every run's loss spiked at
step 4, FP8's roundings damped the spike, and the difference stayed in the final loss:
docs/benchmarks.md, "Twelfth round".)

One seed's difference is one trajectory's: GPU reductions are not bitwise repeatable, and two
BF16 runs of one seed ended with held-out losses 0.035 apart on this short, small-batch run. `--seeds` trains
every run once per seed and checks the mean difference over them (with its standard error).

Reported: every step's LM loss per run, and per FP8 run the difference of its mean loss over
the last `--window` steps from BF16's (the final-loss difference; a mean over a window because
a single step's loss varies with its batch by more than the precisions differ), the largest
per-step difference, and the step time. Checked against `--tolerance`.

`--cross-eval` tells a difference in what FP8 *computes* from one in what FP8 training *learns*:
every run's final weights (the same parameter names and values in both precisions) are loaded
into a model of every precision and their held-out loss taken there, a matrix of weights x
forward. FP8-trained weights evaluated in BF16 against BF16-trained weights in BF16 is the
training effect alone; BF16-trained weights in the FP8 forward against the BF16 forward is the
forward's own effect on the loss. The diagonal repeats each run's own held-out loss through a
fresh model (a check of the loading).

    PYTHONPATH=src python3 benchmarks/fp8_loss_parity.py --blend BLEND.json --out parity.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment, peak_memory_gib, synchronize  # noqa: E402
from train_throughput import _release, grouped_tiles_arg, one_rank_group, proxy_model_config  # noqa: E402

from nemotron.config.schema import PretrainConfig  # noqa: E402
from nemotron.data.config import DataConfig  # noqa: E402
from nemotron.train import balancing  # noqa: E402
from nemotron.train.checkpoint import training_state_dict  # noqa: E402
from nemotron.train.config import OptimizerConfig, TrainConfig  # noqa: E402
from nemotron.train.data import TrainingData, plan_batches  # noqa: E402
from nemotron.train.fp8 import FP8_LAYERS, Fp8Config  # noqa: E402
from nemotron.train.fp8_config import EXPERT_GROUPED_GEMMS, experts_float32_grads_problem  # noqa: E402
from nemotron.train.loop import build_model, evaluate, train_step  # noqa: E402
from nemotron.train.optimizer import build_optimizer, set_learning_rate  # noqa: E402


def config(args, fp8: Fp8Config, seed: int | None = None) -> PretrainConfig:
    model = proxy_model_config(args.layers, args.experts, args.tiny)
    if args.tiny:  # the tiny widths' vocabulary is smaller than the embedded corpus's 4096 tokens
        model = dataclasses.replace(model, vocab_size=4096)
    train = TrainConfig(
        train_iters=args.steps,
        global_batch_size=args.micro_batch * args.grad_accum,
        micro_batch_size=args.micro_batch,
        seq_length=args.seq,
        seed=args.seed if seed is None else seed,
        # the test split's first `--eval-batches` global batches: one held-out set for every run
        eval_iters=args.eval_batches,
        precision="bf16",
        device=args.device,
        grad_clip=1.0,
        compute_weights=args.params,
        experts_float32_grads=args.experts_float32_grads,
        fp8=fp8,
    )
    return PretrainConfig(
        model=model,
        train=train,
        data=DataConfig(blend=args.blend, mock=args.blend is None),
        optimizer=OptimizerConfig(lr=args.lr, min_lr=args.lr),
    )


def final_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers by name, whole, copied to the host (float32 masters as
    they are): the state a checkpoint of the run would hold."""
    from torch.distributed.tensor import DTensor

    state = training_state_dict(model, None)["model"]
    return {
        name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu", copy=True)
        for name, t in state.items()
        if torch.is_tensor(t)
    }


@torch.no_grad()
def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` (from `final_weights`) into `model`, in place, and read them back: one
    process's FSDP2 shard is the whole tensor, so a copy into its local tensor is the load."""
    from torch.distributed.tensor import DTensor

    state = {k: t for k, t in training_state_dict(model, None)["model"].items() if torch.is_tensor(t)}
    if set(state) != set(weights):
        raise RuntimeError(f"weights do not fit the model: {sorted(set(state) ^ set(weights))[:8]}")
    for name, target in state.items():
        local = target.to_local() if isinstance(target, DTensor) else target
        if local.shape != weights[name].shape:
            raise RuntimeError(
                f"{name}: local {tuple(local.shape)} is not the whole {tuple(weights[name].shape)}"
            )
        local.copy_(weights[name])
    # the state dict's tensors share the parameters' storage; make sure the copy reached them
    for name, param in model.named_parameters():
        whole = param.full_tensor() if isinstance(param, DTensor) else param
        key = name if name in weights else name.replace("_checkpoint_wrapped_module.", "")
        if key in weights and not torch.equal(whole.detach().float().cpu(), weights[key].float()):
            raise RuntimeError(f"loading did not reach parameter {name}")


def train(cfg: PretrainConfig, device: torch.device, args) -> dict:
    model, parallel = build_model(cfg, device)
    optimizer = build_optimizer(model, cfg.optimizer)
    data = TrainingData(cfg.data, cfg.train, plan_batches(cfg.train, 1), cfg.model.vocab_size, 0)
    moe_layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    losses, times = [], []
    for step in range(args.steps):
        set_learning_rate(optimizer, args.lr * min(1.0, (step + 1) / max(1, args.lr_warmup)))
        t0 = time.perf_counter()
        res = train_step(
            model,
            optimizer,
            data.next_train_batches(),
            device=device,
            precision="bf16",
            grad_clip=cfg.train.grad_clip,
            parallel=parallel,
        )
        balancing.update_expert_biases(
            moe_layers, cfg.train.expert_bias_update_rate, group=parallel.balancing_group
        )
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
        losses.append(res.lm_loss)
        if step % 50 == 0 or step == args.steps - 1:
            print(
                f"  step {step + 1}: loss {res.lm_loss:.4f} grad norm {res.grad_norm:.3f} "
                f"({times[-1]:.0f} ms)",
                flush=True,
            )
    summary = getattr(model, "fp8_summary", None)
    timed = times[2:] or times  # the first steps compile and warm up
    held_out = data.test_batches() if args.eval_batches else None
    test_loss = (
        None
        if held_out is None
        else evaluate(model, held_out, device=device, precision="bf16", parallel=parallel)
    )
    if test_loss is not None:
        print(f"  held-out loss of the final weights ({args.eval_batches} test batches): {test_loss:.4f}")
    out = {
        "losses": losses,
        "test_loss": test_loss,
        "step_ms_median": sorted(timed)[len(timed) // 2],
        "peak_gib": peak_memory_gib(device),
        "fp8": None if summary is None else summary.describe(),
    }
    if args.cross_eval and held_out is not None:
        out["weights"] = final_weights(model)
    del model, optimizer, data
    return out


def cross_evaluate(
    args, runs, weights: dict[str, dict], device: torch.device, seed: int
) -> dict[str, dict[str, float]]:
    """Held-out loss of every run's final weights in every run's forward (`--cross-eval`), on the
    held-out batches of `seed` (the runs' own): {weights of run: {forward of run: loss}}."""
    table: dict[str, dict[str, float]] = {name: {} for name in weights}
    for forward, fp8 in runs:
        if forward == "bf16-control":  # the same forward as bf16's
            continue
        cfg = config(args, fp8, seed)
        model, parallel = build_model(cfg, device)
        data = TrainingData(cfg.data, cfg.train, plan_batches(cfg.train, 1), cfg.model.vocab_size, 0)
        held_out = data.test_batches()
        for name, w in weights.items():
            load_weights(model, w)
            loss = evaluate(model, held_out, device=device, precision="bf16", parallel=parallel)
            table[name][forward] = loss
            print(f"  held-out loss: weights of {name} in the {forward} forward: {loss:.4f}", flush=True)
        del model, data
        _release(device)
    return table


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blend", default=None, help="blend.json of prepared data (default: synthetic tokens)")
    ap.add_argument("--recipes", default="tensorwise", help="comma list of train.fp8 recipes")
    ap.add_argument(
        "--fp8-layers",
        dest="layers_fp8",
        default=None,
        help="comma list of train.fp8.layers (default: every FP8-capable layer, experts included)",
    )
    ap.add_argument(
        "--experts-gather",
        action="store_true",
        help="train.fp8.experts_fsdp_float8_all_gather=true (FSDP2 gathers the routed experts' FP8 forms)",
    )
    ap.add_argument(
        "--experts-wgrad",
        action="store_true",
        help="train.fp8.experts_weight_grad=fp8 (the routed experts' weight gradients on FP8 operands)",
    )
    ap.add_argument(
        "--experts-gemm",
        choices=EXPERT_GROUPED_GEMMS,
        default="cutlass",
        help="train.fp8.experts_grouped_gemm (the routed experts' forward and input-gradient FP8 products)",
    )
    ap.add_argument(
        "--experts-tiles",
        type=grouped_tiles_arg,
        default=None,
        metavar="M,N,K,STAGES,WARPS,TMA,PERSISTENT",
        help="train.fp8.experts_grouped_tiles (with --experts-gemm triton; default: the kernel's)",
    )
    ap.add_argument(
        "--autotune-casts",
        action="store_true",
        help="train.fp8.autotune_casts=true (the compiled linears' cast kernels tuned; same values)",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=1234,
        help="train.seed of every run (initialisation and data order); several seeds tell a systematic "
        "FP8 difference from one trajectory's",
    )
    ap.add_argument(
        "--seeds",
        default=None,
        help="comma list of seeds: every run once per seed, each compared with the BF16 run of its "
        "seed, and the check made on the mean difference over the seeds (with its standard error)",
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--params", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument(
        "--experts-float32-grads",
        action="store_true",
        help="train.experts_float32_grads for every run: the routed experts' weight gradients in "
        "float32 in both precisions (FP8 experts need --experts-gather); without it each is rounded "
        "to BF16 in both",
    )
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lr-warmup", type=int, default=100, help="steps of linear warmup (see above)")
    ap.add_argument("--window", type=int, default=20, help="final loss = mean over the last N steps")
    ap.add_argument(
        "--tolerance", type=float, default=0.02, help="allowed |final loss FP8 - BF16| (absolute, nats)"
    )
    ap.add_argument(
        "--eval-batches",
        type=int,
        default=16,
        help="the final weights' loss on the test split's first N global batches, per run (0: none)",
    )
    ap.add_argument(
        "--bf16-control",
        action="store_true",
        help="train BF16 a second time (same seed, batches and code): how far two BF16 runs end apart "
        "on this GPU, the scale an FP8 difference is read against",
    )
    ap.add_argument(
        "--cross-eval",
        action="store_true",
        help="also evaluate every run's final weights in every run's forward (needs --eval-batches): "
        "FP8's effect on training apart from its effect on the computed loss",
    )
    ap.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        default=None,
        help="train nothing: merge finished results of this script made with the same settings but "
        "other seeds (calls of a time-limited machine) and check the mean over all their seeds",
    )
    ap.add_argument(
        "--finished-runs",
        action="store_true",
        help="with --combine: also take results cut short (a time limit), using the runs they "
        "finished (a run is written only once it has finished; the one cut short is not in them)",
    )
    ap.add_argument(
        "--bf16-from",
        nargs="+",
        metavar="JSON",
        default=None,
        help="with --combine: the BF16 run of each seed taken from these finished results instead "
        "(made with the same settings but --recipes, which the BF16 runs do not use), so FP8 runs "
        "made before compare with a BF16 baseline made since",
    )
    ap.add_argument(
        "--no-bf16",
        action="store_true",
        help="train the FP8 runs only (nothing is checked): their comparison is made later by --combine "
        "with --bf16-from BF16 runs of the same settings (a time-limited machine spends its time on "
        "the runs that changed)",
    )
    ap.add_argument("--tiny", action="store_true", help="small widths (CPU smoke test)")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.bf16_from and not args.combine:
        ap.error("--bf16-from: only with --combine")
    if args.finished_runs and not args.combine:
        ap.error("--finished-runs: only with --combine")
    if args.no_bf16 and (args.combine or args.bf16_control or args.cross_eval or not args.recipes):
        ap.error("--no-bf16: FP8 runs only (--recipes), without --combine, --bf16-control or --cross-eval")
    if args.combine:
        return combine(args, ap)
    # recorded: the FP8 experts' weight gradients follow --experts-float32-grads (rounded to BF16
    # without it), as they do since 2026-12-06; results without this were made when gathered FP8
    # experts kept float32 gradients whatever the key said, and are not combined with these
    args.fp8_experts_grads_keyed = True
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env = environment(device)
    result = {
        "env": env,
        "command": "python3 benchmarks/fp8_loss_parity.py " + " ".join(argv or sys.argv[1:]),
        "args": vars(args),
        "runs": {},
    }
    layers = args.layers_fp8.split(",") if args.layers_fp8 else list(FP8_LAYERS)
    runs = (
        ([] if args.no_bf16 else [("bf16", Fp8Config())])
        + ([("bf16-control", Fp8Config())] if args.bf16_control else [])
        + [
            (
                f"fp8-{r}",
                Fp8Config(
                    enabled=True,
                    recipe=r,
                    layers=layers,
                    experts_fsdp_float8_all_gather=args.experts_gather and "experts" in layers,
                    experts_weight_grad="fp8" if args.experts_wgrad and "experts" in layers else "bf16",
                    autotune_casts=args.autotune_casts,
                    experts_grouped_gemm=args.experts_gemm,
                    experts_grouped_tiles=args.experts_tiles,
                ),
            )
            for r in args.recipes.split(",")
            if r
        ]
    )
    for _, fp8 in runs:
        problem = experts_float32_grads_problem(args.experts_float32_grads, fp8)
        if problem:
            ap.error(f"--experts-float32-grads (train.experts_float32_grads) {problem} (--experts-gather)")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    if len(set(seeds)) != len(seeds):
        ap.error(f"--seeds {args.seeds}: a seed is given twice")

    def save(partial: bool) -> None:
        # written after every run, so a run cut short by a time limit keeps what it finished
        if args.out:
            result["partial"] = partial
            Path(args.out).write_text(json.dumps(result, indent=2, default=str))

    result["seeds"] = seeds

    def key(name: str, seed: int) -> str:  # runs of `--seeds` are named by their seed, even one
        return name if args.seeds is None else f"{name}@{seed}"

    with one_rank_group(device, args.params):
        for seed in seeds:
            weights = {}
            for name, fp8 in runs:
                print(f"{key(name, seed)}:", flush=True)
                run = train(config(args, fp8, seed), device, args)
                if "weights" in run:
                    weights[name] = run.pop("weights")
                result["runs"][key(name, seed)] = run
                _release(device)
                save(partial=True)
            if args.no_bf16:
                save(partial=True)
                continue
            compare(args, result["runs"], [(key(n, seed), n) for n, _ in runs], key("bf16", seed))
            if weights:
                print("cross evaluation:", flush=True)
                table = cross_evaluate(args, runs, weights, device, seed)
                del weights
                result.setdefault("cross_eval", {}).update(
                    {key(n, seed): {key(f, seed): v for f, v in row.items()} for n, row in table.items()}
                )
                effects(result, [key(n, seed) for n, _ in runs], key("bf16", seed))
            save(partial=True)
    if args.seeds is not None and not args.no_bf16:
        result["summary"] = summarize(args, result["runs"], [n for n, _ in runs], seeds)
    save(partial=False)
    return result


def compare(args, runs: dict[str, dict], names: list[tuple[str, str]], base_key: str) -> None:
    """Each run's difference from the BF16 run of its seed (`base_key`), recorded in the run and
    printed: the final-loss difference (checked against --tolerance), the largest per-step one,
    the held-out one."""
    base_run = runs[base_key]
    base = base_run["losses"]
    w = args.window
    for run_key, name in names:
        if run_key == base_key:
            continue
        run = runs[run_key]
        diffs = [a - b for a, b in zip(run["losses"], base)]
        final = sum(run["losses"][-w:]) / w - sum(base[-w:]) / w
        base_test = base_run["test_loss"]
        run.update(
            final_loss_diff=final,
            max_step_diff=max(abs(d) for d in diffs),
            final_loss=sum(run["losses"][-w:]) / w,
            test_loss_diff=None if base_test is None else run["test_loss"] - base_test,
            # the control is a measurement of the spread, not a check
            ok=None if name == "bf16-control" else abs(final) <= args.tolerance,
        )
        print(
            f"{run_key}: final loss (mean of last {w}) {run['final_loss']:.4f} vs bf16 "
            f"{sum(base[-w:]) / w:.4f}: diff {final:+.4f} (tolerance {args.tolerance}) "
            f"{ {True: 'OK', False: 'FAILED', None: '(control)'}[run['ok']] }; "
            f"max per-step |diff| {run['max_step_diff']:.4f}; "
            + ("" if run["test_loss_diff"] is None else f"held-out loss diff {run['test_loss_diff']:+.4f}; ")
            + f"step {run['step_ms_median']:.0f} vs {base_run['step_ms_median']:.0f} ms",
            flush=True,
        )


def effects(result: dict, keys: list[str], base_key: str) -> None:
    """From the cross evaluation: per FP8 run, what its training learnt (its weights against
    BF16's, both in the BF16 forward) and what the FP8 forward computes (BF16's weights in the
    FP8 forward against the BF16 forward)."""
    table = result["cross_eval"]
    base = table[base_key][base_key]
    for run_key in keys:
        if run_key == base_key or not run_key.startswith("fp8-"):
            continue
        trained = table[run_key][base_key] - base
        computed = table[base_key][run_key] - base
        result["runs"][run_key].update(training_effect=trained, forward_effect=computed)
        print(
            f"{run_key}: held-out, BF16 forward: FP8-trained weights {trained:+.4f} vs BF16-trained "
            f"(what FP8 training learnt); BF16-trained weights, FP8 forward {computed:+.4f} vs BF16 "
            "forward (what the FP8 forward computes)",
            flush=True,
        )


def summarize(args, runs: dict[str, dict], names: list[str], seeds: list[int]) -> dict[str, dict]:
    """Over the seeds, per run name: the final-loss and held-out differences from BF16 of each
    seed, their mean and its standard error. Checked: |mean final-loss difference| <=
    --tolerance (one seed's difference is one trajectory's; the mean over seeds is FP8's)."""
    out: dict[str, dict] = {}
    for name in names:
        if name == "bf16":
            continue
        finals = [runs[f"{name}@{s}"]["final_loss_diff"] for s in seeds]
        tests = [runs[f"{name}@{s}"]["test_loss_diff"] for s in seeds]
        row = {"seeds": seeds, "final_loss_diffs": finals, **_mean_and_stderr("final_loss_diff", finals)}
        if all(t is not None for t in tests):
            row.update(test_loss_diffs=tests, **_mean_and_stderr("test_loss_diff", tests))
        row["ok"] = None if name == "bf16-control" else abs(row["final_loss_diff_mean"]) <= args.tolerance
        out[name] = row
        held = (
            ""
            if "test_loss_diff_mean" not in row
            else f"; held-out {row['test_loss_diff_mean']:+.4f} +- {row['test_loss_diff_stderr']:.4f}"
        )
        verdict = {True: "OK", False: "FAILED", None: "(control)"}[row["ok"]]
        print(
            f"{name} over seeds {seeds}: final-loss difference {row['final_loss_diff_mean']:+.4f} "
            f"+- {row['final_loss_diff_stderr']:.4f} (mean +- standard error; tolerance "
            f"{args.tolerance}) {verdict}{held}",
            flush=True,
        )
    return out


# the settings that make two results comparable run for run (not: seeds, output, device)
_SAME = (
    "blend",
    "recipes",
    "layers_fp8",
    "experts_gather",
    "experts_wgrad",
    "experts_float32_grads",
    "experts_gemm",
    "experts_tiles",
    "steps",
    "seq",
    "micro_batch",
    "grad_accum",
    "layers",
    "experts",
    "params",
    "lr",
    "lr_warmup",
    "window",
    "eval_batches",
    "tiny",
    "fp8_experts_grads_keyed",
)


# settings added after results were first recorded: a result without one was made with this value
_ADDED_LATER = {"experts_float32_grads": False}


def _setting(result: dict, key: str):
    return result["args"].get(key, _ADDED_LATER.get(key))


def _finished_results(
    paths: list[str], ap: argparse.ArgumentParser, option: str, cut_short_ok: bool = False
) -> list[tuple[str, dict]]:
    results = []
    for path in paths:
        try:
            r = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            ap.error(f"{option} {path}: not a readable result ({e})")
        if "runs" not in r or (r.get("partial", True) and not (cut_short_ok and "partial" in r)):
            ap.error(f"{option} {path}: not a finished result (cut short, or not this script's)")
        results.append((path, r))
    return results


def _runs_by_seed(r: dict) -> list[tuple[str, int, dict]]:
    """(name, seed, run) of one result (a one-seed result names its runs without the seed)."""
    named_by_seed = any("@" in k for k in r["runs"])
    return [
        (k.rsplit("@", 1)[0], int(k.rsplit("@", 1)[1]), run) if named_by_seed else (k, r["args"]["seed"], run)
        for k, run in r["runs"].items()
    ]


def combine(args, ap: argparse.ArgumentParser) -> dict:
    """`--combine`: the runs of several finished results, keyed `name@seed`, and the check over
    all their seeds (the tolerance and window of this command line). `--bf16-from`: each seed's
    BF16 run from those results instead (their other runs are not used)."""
    results = _finished_results(args.combine, ap, "--combine", cut_short_ok=args.finished_runs)
    first_path, first = results[0]
    for path, r in results[1:]:
        differ = [k for k in _SAME if _setting(r, k) != _setting(first, k)]
        if differ:
            ap.error(f"--combine {path}: made with other settings than {first_path}: {', '.join(differ)}")
    runs: dict[str, dict] = {}
    names: list[str] = []
    seeds: list[int] = []
    for path, r in results:
        for name, seed, run in _runs_by_seed(r):
            if f"{name}@{seed}" in runs:
                ap.error(f"--combine {path}: run {name} of seed {seed} is in two results")
            runs[f"{name}@{seed}"] = run
            names += [name] if name not in names else []
            seeds += [seed] if seed not in seeds else []
    if args.bf16_from:
        if not first["args"].get("fp8_experts_grads_keyed"):
            ap.error(
                f"--bf16-from: {first_path} was made before the FP8 experts' weight gradients followed "
                "--experts-float32-grads (gathered ones were float32 either way): no BF16 baseline "
                "is known to match it"
            )
        baselines = _finished_results(args.bf16_from, ap, "--bf16-from")
        free = ("recipes", "fp8_experts_grads_keyed")  # what the BF16 runs do not use
        bf16 = {}
        for path, r in baselines:
            differ = [k for k in _SAME if k not in free and _setting(r, k) != _setting(first, k)]
            if differ:
                ap.error(
                    f"--bf16-from {path}: made with other settings than {first_path}: {', '.join(differ)}"
                )
            for name, seed, run in _runs_by_seed(r):
                if name != "bf16":
                    continue
                if seed in bf16:
                    ap.error(f"--bf16-from {path}: the BF16 run of seed {seed} is in two results")
                bf16[seed] = run
        missing = [s for s in seeds if s not in bf16]
        if missing:
            ap.error(f"--bf16-from: no BF16 run of seed {missing[0]}")
        for seed in seeds:
            runs[f"bf16@{seed}"] = bf16[seed]
    for name in names:
        missing = [s for s in seeds if f"{name}@{s}" not in runs]
        if missing:
            ap.error(f"--combine: run {name} has no seed {missing[0]} (every result needs the same runs)")
    missing = [s for s in seeds if f"bf16@{s}" not in runs]
    if missing:
        ap.error(
            f"--combine: no BF16 run of seed {missing[0]} (results made with --no-bf16 need --bf16-from)"
        )
    # the differences are recomputed with this command line's window and tolerance
    for seed in seeds:
        compare(args, runs, [(f"{n}@{seed}", n) for n in names], f"bf16@{seed}")
    command = "python3 benchmarks/fp8_loss_parity.py --combine " + " ".join(args.combine)
    command += " --finished-runs" if args.finished_runs else ""
    result = {
        "command": command + ("" if not args.bf16_from else " --bf16-from " + " ".join(args.bf16_from)),
        "combined": [p for p, _ in results],
        "cut_short": [p for p, r in results if r["partial"]],
        "bf16_from": args.bf16_from,
        "args": first["args"] | {"window": args.window, "tolerance": args.tolerance},
        "env": first.get("env"),
        "runs": runs,
        "summary": summarize(args, runs, names, seeds),
        "partial": False,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return result


def _mean_and_stderr(label: str, values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {f"{label}_mean": mean, f"{label}_stderr": (var / n) ** 0.5}


if __name__ == "__main__":
    main()
