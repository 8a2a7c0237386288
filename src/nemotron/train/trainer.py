"""The `Trainer`: one pretraining run of Nemotron 3 Nano, from set-up to summary.

    Trainer.for_run(cfg, job_dir, ...)  set-up: config and storage checks, seeds, model,
                                        optimizer, resume (or finetune), data, metrics, saves
    trainer.step()                      one optimizer step: phase, learning rate, batches,
                                        forward/backward/clip/AdamW (`loop.train_step`), then
                                        the expert-bias update (or, if skipped, a counter reset)
    trainer.evaluate(kind)              the valid or test loss
    trainer.save()                      a checkpoint, only from finite weights after a good step
    trainer.run()                       the loop: steps, logs, fault policy, evaluation, saves,
                                        preemption signals; returns a `TrainSummary`

`pretrain(cfg, job_dir)` runs `Trainer.for_run(...).run()` inside the launcher's process group.
The benchmarks build a Trainer around their own model and data and time `step()`. Everything a
resumed run needs is in the checkpoint, so a run killed at any point continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nemotron.artifacts.model import (
    MODEL_ARTIFACT_FILE,
    build_model_artifact,
    data_artifact_record,
    manifest_json,
)
from nemotron.config.errors import ConfigError
from nemotron.distributed.parallel_dims import check_pipeline, context_halo
from nemotron.distributed.utils import launcher_process_group
from nemotron.train import balancing, flops
from nemotron.train.checkpoint import (
    CHECKPOINT_PATTERN,
    CONFIG_FILE,
    SAVE_DIR_WAIT_S,
    SAVE_LOCK_FILE,
    TRAIN_STATE_FILE,
    Checkpointer,
    CheckpointError,
    CheckpointWriteError,
    LoadedCheckpoint,
    SaveDirClaim,
    check_writable,
    claim_save_dir,
    complete_checkpoints,
    failure_reason,
    finish_interrupted_saves,
    job_dir_problem,
    load_checkpoint,
    save_dir_problem,
    saved_config,
    saved_count,
)
from nemotron.train.data import LoaderState, PhaseSwitchError, TrainingData, plan_batches, unigram_entropy
from nemotron.train.loop import (
    Parallel,
    StepResult,
    build_model,
    compile_model,
    evaluate,
    ignored_layout,
    resolve_compute_weights,
    resolve_device,
    train_step,
)
from nemotron.train.metrics import EventHook, MetricsLogger, check_logger, perplexity
from nemotron.train.optimizer import (
    build_optimizer,
    group_settings,
    resume_hyperparameters,
    set_learning_rate,
)
from nemotron.train.schedule import LRSchedule, resume_schedule, validate_schedule, warmup_warning

log = logging.getLogger("nemotron.train")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class InitializationError(RuntimeError):
    """The first step of a run from freshly initialised weights cannot train: every gradient
    is zero, or the loss or gradient norm is not finite."""


# TrainSummary.status values; anything but "completed" makes the CLI exit non-zero.
COMPLETED = "completed"
INTERRUPTED = "interrupted"  # stopped by a signal (after saving, unless the step was skipped)
SKIPPED_STEPS = "completed_with_skipped_steps"  # more than train.max_skipped_steps were skipped


@dataclass
class TrainSummary:
    steps: int
    tokens: int
    final_loss: float | None
    checkpoint: str | None
    status: str = COMPLETED  # COMPLETED | INTERRUPTED | SKIPPED_STEPS
    valid_loss: float | None = None
    test_loss: float | None = None
    skipped_steps: int = 0
    balance_max_over_mean: float | None = None  # worst layer, last step
    balance_bias_range: float | None = None
    unigram_entropy: float | None = None
    tokens_per_second: float | None = None
    resumed_from: str | None = None
    finetuned_from: str | None = None  # checkpoint.finetune: the weights this run started from
    problem: str | None = None  # why the status is not "completed", in one sentence
    warnings: list[str] = field(default_factory=list)  # damaged checkpoints skipped, ...


@dataclass
class RunState:
    """The counters a checkpoint carries (train_state.json, beside the loader and schedule)."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    # The learning-rate schedule's position: the tokens of the steps whose update was applied.
    # Megatron's scheduler steps only after a successful update, so a skipped step leaves the
    # next step's rate where it was (while `step` and `tokens` still advance).
    schedule_tokens: int = 0

    def advance(self, finite: bool, tokens: int) -> None:
        """A step consumed its data and tokens, whether or not its update was applied (as in
        Megatron, a skipped step still counts); only an applied one moves the schedule."""
        self.step += 1
        self.tokens += tokens
        if finite:
            self.consecutive_nonfinite = 0
            self.schedule_tokens += tokens
        else:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> "RunState":
        """The counters of a train_state.json (unknown keys ignored). A checkpoint written
        before `schedule_tokens` was recorded had its schedule follow every step's tokens:
        it continues from there."""
        fields = {f.name for f in dataclasses.fields(cls)}
        for name in ("step", "tokens"):  # the position itself: never defaulted (0 would restart
            if name not in saved:  # the schedule's warmup, silently)
                raise ValueError(f"it has no {name}")
        state = cls(**{k: v for k, v in saved.items() if k in fields})
        if "schedule_tokens" not in saved:
            state.schedule_tokens = state.tokens
        counts = dataclasses.asdict(state)
        for name in fields:
            saved_count(counts, name)
        if state.skipped_steps > state.step or state.consecutive_nonfinite > state.skipped_steps:
            raise ValueError(
                f"its counters contradict each other: consecutive_nonfinite "
                f"{state.consecutive_nonfinite} <= skipped_steps {state.skipped_steps} <= step "
                f"{state.step} does not hold"
            )
        return state


@dataclass
class StepOutcome:
    result: StepResult
    lr: float
    data_time: float
    balance: balancing.BalanceStats | None  # None when the step was skipped
    phase_switched: bool


@dataclass
class Restored:
    """What set-up took from a checkpoint (all defaults: a fresh run)."""

    state: RunState
    loader: LoaderState
    schedule: LRSchedule | None = None  # the schedule the checkpoint was trained with
    resumed_from: str | None = None
    finetuned_from: str | None = None
    loaded: LoadedCheckpoint | None = None
    # The optimizer's group settings from the config, taken before the checkpoint's replaced
    # them (`optimizer.resume_hyperparameters` compares the two); None when nothing was loaded
    # into the optimizer.
    configured_optimizer: list[dict[str, Any]] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)  # warnings of which source was taken


# ---------------------------------------------------------------------------------------------
# Set-up helpers


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators from `train.seed` (a resumed run then
    restores all three from the checkpoint)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore(cfg, model, optimizer, group=None) -> Restored:
    """Resume from `checkpoint.load`, or from the newest intact checkpoint of `checkpoint.save`
    (`auto_resume`); or, with `checkpoint.finetune`, take only the weights of `load`."""
    ckpt = cfg.checkpoint
    checksums = ckpt.verify_checksums
    configured = group_settings(optimizer)
    arch = cfg.model.arch()  # checked against the checkpoint's before its weights are read
    loaded = None
    notes: list[str] = []
    if ckpt.load is not None and not ckpt.finetune:
        loaded = load_checkpoint(ckpt.load, model, optimizer, checksums=checksums, model_config=arch)
        assert loaded is not None  # must_exist: a missing checkpoint raises
        newer = _newer_in_save(ckpt.save, loaded)
        if newer is not None and ckpt.auto_resume:
            # As Megatron's --load: `load` is where the run starts, every time (a roll-back to
            # an earlier checkpoint works so). A requeued job whose command names one
            # checkpoint restarts there at each requeue: say so while the newer one is there.
            notes.append(
                f"started from checkpoint.load={ckpt.load} (step {loaded.train_state.get('step')}) as "
                f"configured, although checkpoint.save holds the newer {newer}: its steps will be "
                f"saved again; to resume the newest instead, give checkpoint.load={ckpt.save}"
            )
    elif ckpt.save and ckpt.auto_resume:
        loaded = load_checkpoint(
            ckpt.save, model, optimizer, checksums=checksums, must_exist=False, model_config=arch
        )
        if loaded is not None and ckpt.finetune and ckpt.load is not None:
            notes.append(
                f"checkpoint.load={ckpt.load} is not read: checkpoint.save already holds "
                f"{loaded.path}, which is resumed (checkpoint.finetune takes load's weights at a "
                "run's first start only); give a new checkpoint.save to finetune from load again"
            )
    if loaded is None and ckpt.finetune and ckpt.load is not None:
        # weights only: optimizer, step and data position start fresh
        weights = load_checkpoint(
            ckpt.load, model, None, restore_rng=False, checksums=checksums, model_config=arch
        )
        assert weights is not None  # must_exist: a missing checkpoint raises
        return Restored(RunState(), LoaderState(), finetuned_from=str(weights.path), loaded=weights)
    if loaded is None:
        return Restored(RunState(), LoaderState())
    saved = dict(loaded.train_state)
    try:
        if "loader" not in saved:
            raise ValueError("it has no loader")
        loader = TrainingData.state_from(saved.pop("loader"))
        state = RunState.from_saved(saved)
        schedule = None if saved.get("schedule") is None else LRSchedule.from_dict(saved["schedule"])
    except (KeyError, TypeError, ValueError) as e:  # e.g. a hand-edited file whose manifest was rewritten
        where = loaded.path / TRAIN_STATE_FILE
        reason = str(e) if isinstance(e, ValueError) else failure_reason(e)
        raise CheckpointError(f"{where} does not hold a run's state: {reason}") from None
    return Restored(
        state, loader, schedule, str(loaded.path), loaded=loaded, configured_optimizer=configured, notes=notes
    )


def _newer_in_save(save: str | None, loaded: LoadedCheckpoint) -> Path | None:
    """The newest complete checkpoint of `save` when it is of a later step than `loaded` (the
    step its directory is named by), else None."""
    if not save:
        return None
    step = loaded.train_state.get("step")
    if not isinstance(step, int):  # a model-only checkpoint: the step its name says, if any
        match = CHECKPOINT_PATTERN.match(Path(loaded.path).name)
        step = int(match.group(1)) if match else None
    checkpoints = complete_checkpoints(Path(save))
    if step is None or not checkpoints:
        return None
    newest_step, newest = checkpoints[-1]
    return newest if newest_step > step else None


def check_ranks_agree(cfg) -> None:
    """Every rank of the launch has the same config, or every rank raises one error naming a
    key that differs and its values. A value resolved per process (`${oc.env:LOCAL_RANK}` in a
    path, a mount that differs between nodes) made ranks load different checkpoints and train
    on mixed weights, read different blends (reported as an index cache "missing after rank 0
    built it"), or save into different directories (found at the first save)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = _flat_config(_config_json(cfg))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        differing = sorted(  # compared as JSON text: a NaN equals itself there
            k
            for k in everyone[0].keys() | theirs.keys()
            if json.dumps(everyone[0].get(k)) != json.dumps(theirs.get(k))
        )
        if differing:
            key = differing[0]
            more = f" (and {len(differing) - 1} more keys)" if len(differing) > 1 else ""
            raise ConfigError(
                f"the ranks' configs differ: {key} is {everyone[0].get(key)!r} on rank 0 and "
                f"{theirs.get(key)!r} on rank {rank}{more}; every rank must be given the same "
                "config (a value resolved per process, e.g. from LOCAL_RANK or a per-node path?)"
            )


def _flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> leaf value of a nested config dict."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same_split(before: Any, now: Any) -> bool:
    """Whether two data.split values cut every blend alike (null reads as Megatron's default):
    their split bounds (`split_bounds`, which decide the document ranges) are equal."""
    from nemotron.data.gpt_dataset import DEFAULT_SPLIT, split_bounds

    try:
        return split_bounds(DEFAULT_SPLIT if before is None else before) == split_bounds(
            DEFAULT_SPLIT if now is None else now
        )
    except ValueError:  # GPTDatasetError: a value that is no split string is a change
        return False


def weights_finite(model: torch.nn.Module, parallel: Parallel) -> bool:
    """Every parameter and buffer (expert biases included) finite on every rank."""
    checks = []
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            if local.is_floating_point() and local.numel():
                checks.append(torch.isfinite(local).all())
    flag = torch.stack(checks).all().to(torch.int32) if checks else torch.ones((), dtype=torch.int32)
    if parallel.distributed:
        if dist.get_backend() == "nccl" and flag.device.type != "cuda":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _memory_gb(device: torch.device) -> float:
    """This process's peak memory in GB (10^9 bytes, as the `memory_gb` key says; the
    benchmarks' GiB are 2^30): the CUDA caching allocator's peak of allocated tensor bytes
    (`max_memory_allocated`, not the larger reserved pool), or on CPU the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def _config_json(cfg) -> dict[str, Any]:
    """The config as config.json holds it (JSON values: paths and enums as strings)."""
    return json.loads(json.dumps(_config_dict(cfg), default=str))


def _config_dict(cfg) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    return dict(vars(cfg))


# ---------------------------------------------------------------------------------------------
# Signals


class StopRequest:
    """SIGTERM / SIGUSR1 (Slurm preemption) and a first Ctrl-C (SIGINT) ask the loop to
    checkpoint after the current step and return; a Ctrl-C after any of them stops at once
    (KeyboardInterrupt, as without this: what the last checkpoint holds is kept)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal this process got
        self.agreed: int | None = None  # the signal any rank got (`requested`): what the stop says
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, parallel: Parallel) -> bool:
        """True on every rank once any rank got a signal (so all save together); `agreed` is
        then that signal (the highest number, if ranks got different ones) on every rank: a
        signal to one rank only was reported by rank 0 as "signal None"."""
        flag = torch.tensor(self.signum or 0)
        if parallel.distributed:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.agreed = int(flag.item()) or None
        return self.agreed is not None


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """A model, its optimizer and data, and the rules of one run (see the module docstring).

    Built directly (benchmarks), a Trainer has no metrics, checkpoints or job dir: `step()` and
    `evaluate()` work, `run()` logs nowhere and saves nothing."""

    def __init__(
        self,
        cfg,
        model: torch.nn.Module,
        parallel: Parallel,
        data: TrainingData,
        *,
        device: torch.device,
        optimizer: torch.optim.Optimizer | None = None,
        restored: Restored | None = None,
        metrics: MetricsLogger | None = None,
        checkpointer: Checkpointer | None = None,
        compute_weights: str | None = None,
        save_dir_claim: SaveDirClaim | None = None,
    ):
        self.cfg = cfg
        self.model = model
        self.parallel = parallel
        self.data = data
        self.plan = data.plan
        self.device = device
        self.optimizer = optimizer or build_optimizer(model, cfg.optimizer)
        self.train_model = compile_model(model, parallel) if cfg.train.compile else model
        moe_layers = getattr(model, "moe_layers", None)  # a Nano3ForCausalLM's or LocalStages'
        self.moe_layers = moe_layers() if moe_layers is not None else []
        self.restored = restored or Restored(RunState(), LoaderState())
        self.state = self.restored.state
        self.metrics = metrics or MetricsLogger(Path("."), cfg.logger, enabled=False)
        self.checkpointer = checkpointer
        self.save_dir_claim = save_dir_claim  # this run's hold on checkpoint.save, until `close`
        self.compute_weights = compute_weights
        self.rank0 = not parallel.distributed or dist.get_rank() == 0
        self.world = dist.get_world_size() if parallel.distributed else 1
        self.schedule = LRSchedule.from_config(cfg.scheduler, cfg.optimizer, self.plan.total_tokens)
        # The newest checkpoint (verified at load, or written and read back by us), and the
        # newest one a finite step followed: weights that a step after them could train from.
        self.last_checkpoint = self.restored.resumed_from
        self.good_checkpoint: str | None = None
        self._unconfirmed_checkpoint = self.restored.resumed_from
        self._saved_step = self.state.step if self.restored.resumed_from else None
        self._save_pending = False
        self._first_step = self.state.step  # the step this process started at
        self.last: StepResult | None = None
        self.last_balance: balancing.BalanceStats | None = None
        self.valid_loss: float | None = None
        self.test_loss: float | None = None
        self.warnings: list[str] = []

    # ----------------------------------------------------------------------------- set-up

    @classmethod
    def for_run(
        cls,
        cfg,
        job_dir: str | Path,
        *,
        compute_weights: str | None = None,
        on_event: EventHook | None = None,
        mesh=None,
    ) -> "Trainer":
        """Everything `pretrain` trains with. Fails before any step for a bad config, an
        unwritable `checkpoint.save`, a damaged checkpoint or a refused schedule change."""
        # The recipe's checks (config/schema.py) ran when the CLI loaded it; a library caller's
        # typed config gets the schedule's own (finite, 0 <= min_lr <= lr: lr 0 freezes weights).
        validate_schedule(cfg.scheduler, cfg.optimizer)
        check_logger(cfg.logger)  # every rank, before anything is built or loaded
        device = resolve_device(cfg.train.device)
        check_ranks_agree(cfg)
        published: list[str] = []
        claim = None
        problem = job_dir_problem(job_dir, cfg.checkpoint.save)
        if problem:
            raise CheckpointError(f"job dir {job_dir}: {problem}; give the run another job dir")
        problem = save_dir_problem(cfg.checkpoint.save) if cfg.checkpoint.save else None
        if problem:
            raise CheckpointError(problem)
        if cfg.checkpoint.save:
            check_writable(cfg.checkpoint.save)
            claim = claim_save_dir(cfg.checkpoint.save, job=job_dir, wait_s=SAVE_DIR_WAIT_S)
        try:
            if claim is not None:
                published = finish_interrupted_saves(cfg.checkpoint.save, claimed=claim.locked)
            seed_everything(cfg.train.seed)
            model, parallel = build_model(cfg, device, mesh, compute_weights=compute_weights)
            plan = plan_batches(cfg.train, parallel.dp_size, cfg.data)
            optimizer = build_optimizer(model, cfg.optimizer)
            restored = restore(cfg, model, optimizer)
            data = TrainingData(
                cfg.data,
                cfg.train,
                plan,
                cfg.model.vocab_size,
                parallel.dp_rank,
                restored.loader,
                cp_rank=parallel.cp_rank,
                cp_size=parallel.cp_size,
                sequence_multiple=parallel.sequence_multiple,
                context_halo=context_halo(cfg.model),
                pin_memory=device.type == "cuda",
                state_file=Path(restored.resumed_from) / TRAIN_STATE_FILE if restored.resumed_from else None,
            )
            rank0 = not parallel.distributed or dist.get_rank() == 0
            metrics = MetricsLogger(
                job_dir,
                cfg.logger,
                enabled=rank0,
                on_event=on_event,
                run_config=_config_dict(cfg),
                start_step=restored.state.step,
            )
            if not cfg.data.mock:  # W&B lineage: the data-prep outputs this run reads
                metrics.use_data_artifacts(
                    [cfg.data.blend, cfg.data.phase2_blend, *(m.blend for m in cfg.data.mixed_length_blends)]
                )
            checkpointer = None
            if cfg.checkpoint.save:
                checkpointer = Checkpointer(
                    cfg.checkpoint.save,
                    cfg.checkpoint.keep_last,
                    cfg.checkpoint.async_save,
                    checksums=cfg.checkpoint.verify_checksums,
                    on_complete=metrics.checkpoint_saved,
                )
            trainer = cls(
                cfg,
                model,
                parallel,
                data,
                device=device,
                optimizer=optimizer,
                restored=restored,
                metrics=metrics,
                checkpointer=checkpointer,
                compute_weights=compute_weights,
                save_dir_claim=claim,
            )
        except BaseException:
            if claim is not None:  # (once built, the trainer releases it: `close`)
                claim.release()
            raise
        try:
            if claim is not None and claim.owner and not claim.locked:
                trainer.warn(
                    f"{Path(cfg.checkpoint.save) / SAVE_LOCK_FILE}: this file system cannot lock files, so "
                    f"another run saving into checkpoint.save={cfg.checkpoint.save} at the same time "
                    f"would not be noticed (each would prune the other's checkpoints)"
                )
            for name in published:
                trainer.warn(
                    f"checkpoint {name} was complete but hidden by a run killed while publishing it: published"
                )
            trainer._resume_schedule()
            if restored.resumed_from and restored.state.step > trainer.plan.total_steps:
                # Megatron's loop also just ends; a shorter train.train_iters than the
                # checkpoint's step is more likely a mistake than a request to train nothing
                trainer.warn(
                    f"{restored.resumed_from} is at step {restored.state.step:,}, past this run's "
                    f"{trainer.plan.total_steps:,} steps (train.train_iters): nothing is trained"
                    + (", only the final evaluation runs" if cfg.train.eval_iters else "")
                )
            warning = warmup_warning(trainer.schedule)
            if warning:
                trainer.warn(warning)
            trainer._check_data_order()
            # Every blend, split and index the run will read, checked now (not hours later).
            for warning in data.open_datasets():
                trainer.warn(warning)
        except BaseException:
            trainer.close()
            raise
        return trainer

    def _resume_schedule(self) -> None:
        """Keep or replace the checkpoint's schedule and optimizer settings per
        `scheduler.on_resume`; announce it."""
        for note in self.restored.notes:
            self.warn(note)
        for skipped in self.restored.loaded.skipped if self.restored.loaded else []:
            self.warn(f"skipped damaged checkpoint {skipped.path}: {skipped.problem}")
        for model_change in self.restored.loaded.model_changes if self.restored.loaded else []:
            self.warn(model_change)
        if self.restored.configured_optimizer is not None:
            assert self.restored.resumed_from is not None  # set only when a checkpoint was loaded
            change = resume_hyperparameters(
                self.optimizer,
                self.restored.configured_optimizer,
                self.cfg.scheduler.on_resume,
                self.restored.resumed_from,
            )
            if change:
                self.warn(change)
        if self.restored.schedule is None:  # a fresh run, or a checkpoint from before schedules
            return
        assert self.restored.resumed_from is not None  # a schedule comes from a checkpoint
        self.schedule, change = resume_schedule(
            self.restored.schedule,
            self.schedule,
            self.cfg.scheduler.on_resume,
            self.state.schedule_tokens,
            self.plan.tokens_per_step,
            self.restored.resumed_from,
        )
        if change:
            self.warn(change)

    # The settings that decide which sample sits at each position of the training order
    # (docs/training.md, "Data": shuffles seeded by train.seed over samples of seq_length).
    # The number of samples (train_iters x global_batch_size) is left out: a longer run is the
    # ordinary extension, and it reorders only when it adds an epoch (as in Megatron).
    DATA_ORDER_KEYS = (
        ("train", "seed"),
        ("train", "seq_length"),
        ("data", "blend"),
        ("data", "split"),  # which documents a blend of one for every split trains on
        ("data", "phase2_blend"),
        ("data", "phase2_start_fraction"),
        ("data", "mixed_length_blends"),
        ("data", "mock"),
    )

    def _check_data_order(self) -> None:
        """Warn when a resumed run's data settings differ from those its checkpoint was trained
        with (its config.json): the run goes on at the checkpoint's position (consumed samples)
        of the order the new settings give, which may not be the order the samples before it
        were drawn from, so some may be read twice and others never."""
        if self.restored.resumed_from is None:
            return
        saved = saved_config(Path(self.restored.resumed_from))
        if saved is None:
            return  # a checkpoint without a run config: nothing to compare with
        ours = _config_json(self.cfg)
        changes = []
        for section, key in self.DATA_ORDER_KEYS:
            recorded = saved.get(section)
            if not isinstance(recorded, dict) or key not in recorded:
                continue  # an older (or damaged) config.json without it: nothing to compare
            before, now = recorded[key], ours.get(section, {}).get(key)
            if before != now:
                if (section, key) == ("data", "split") and _same_split(before, now):
                    continue  # "98,2" and "98,2,0", or null and Megatron's default: one cut
                changes.append(f"{section}.{key} {before!r} -> {now!r}")
        if changes:
            self.warn(
                f"data settings differ from those {self.restored.resumed_from} was trained with "
                f"({'; '.join(changes)}): the run continues at sample "
                f"{self.data.state.consumed_train_samples} of the order these settings give, "
                f"which may differ from the order the checkpoint's samples were drawn from "
                f"(some samples may be read twice, others never)"
            )

    def warn(self, message: str) -> None:
        """Rank 0 tells the caller's event hook (the CLI prints it), else the log; the summary
        keeps every warning (result.json)."""
        self.warnings.append(message)
        if not self.rank0:
            return
        if self.metrics.on_event is not None:
            self.metrics.event("warning", {"message": message, "step": self.state.step})
        else:
            log.warning(message)

    # ----------------------------------------------------------------------------- one step

    def step(self) -> StepOutcome:
        """One optimizer step over the next global batch, and the expert-bias update (skipped,
        with the routing counts dropped, when the loss or gradient norm is not finite)."""
        switched = self.data.maybe_switch_phase(self.state.step)
        for warning in self.data.switch_warnings if switched else []:
            self.warn(warning)
        lr = self.schedule.rate(self.state.schedule_tokens)  # not advanced by skipped steps
        set_learning_rate(self.optimizer, lr)
        data_start = time.perf_counter()
        batches = self.data.next_train_batches()
        data_time = time.perf_counter() - data_start
        train = self.cfg.train
        result = train_step(
            self.train_model,
            self.optimizer,
            batches,
            device=self.device,
            precision=train.precision,
            grad_clip=train.grad_clip,
            parallel=self.parallel,
            fsdp_accumulate_unsharded=train.fsdp_accumulate_unsharded,
            reuse_fp8_weights=train.fp8.reuse_weights,
        )
        balance = None
        if result.finite:
            balance = balancing.update_expert_biases(
                self.moe_layers, train.expert_bias_update_rate, group=self.parallel.balancing_group
            )
            if self.parallel.pipeline is not None:  # every stage's layers, not this rank's only
                balance = self.parallel.pipeline.whole_model_balance(balance)
            self.last_balance = balance
        else:
            balancing.reset_expert_counts(self.moe_layers)
        self.state.advance(result.finite, self.data.last_step_tokens)
        if result.finite and self._unconfirmed_checkpoint:
            self.good_checkpoint, self._unconfirmed_checkpoint = self._unconfirmed_checkpoint, None
        self.last = result
        return StepOutcome(result, lr, data_time, balance, switched)

    # ----------------------------------------------------------------------------- evaluation

    def evaluate(self, kind: str) -> float | None:
        """Loss on the next valid batches ("eval") or the test batches ("test"); None when the
        blend has no such split."""
        batches = self.data.next_valid_batches() if kind == "eval" else self.data.test_batches()
        if batches is None:
            return None
        loss = evaluate(
            self.model,
            batches,
            device=self.device,
            precision=self.cfg.train.precision,
            parallel=self.parallel,
            reuse_fp8_weights=self.cfg.train.fp8.reuse_weights,
        )
        self.metrics.log(kind, self.state.step, {"loss": loss, "ppl": perplexity(loss)})
        return loss

    # ----------------------------------------------------------------------------- saving

    def save(self) -> str | None:
        """Checkpoint the state after the last step, if that step was good and every weight is
        finite; otherwise the save waits for the next good step (and None is returned)."""
        if self.checkpointer is None or self._saved_step == self.state.step:
            return None
        why_not = None
        if self.state.consecutive_nonfinite:
            why_not = "its update was skipped (non-finite loss or gradient norm)"
        elif not weights_finite(self.model, self.parallel):
            why_not = "the weights are not finite"
        if why_not:
            if not self._save_pending:  # once, not at every step of a streak
                self.warn(
                    f"no checkpoint at step {self.state.step}: {why_not}; the next good step saves instead"
                )
            self._save_pending = True
            return None
        try:
            path = self.checkpointer.save(
                self.state.step, self.model, self.optimizer, self._train_state(), self._checkpoint_files()
            )
        except CheckpointWriteError as e:
            previous = (
                f"the previous checkpoint {self.last_checkpoint} is intact"
                if self.last_checkpoint
                else "no earlier checkpoint of this run exists"
            )
            raise CheckpointWriteError(f"{e}; {previous}") from None
        self.last_checkpoint, self._saved_step, self._save_pending = str(path), self.state.step, False
        self._unconfirmed_checkpoint = self.last_checkpoint
        return self.last_checkpoint

    def _train_state(self) -> dict[str, Any]:
        return dict(
            dataclasses.asdict(self.state), loader=self.data.state_dict(), schedule=self.schedule.as_dict()
        )

    def _checkpoint_files(self) -> dict[str, str]:
        cfg = self.cfg
        data_record = data_artifact_record(cfg.data.blend) if self.rank0 and not cfg.data.mock else None
        manifest = build_model_artifact(
            step=self.state.step,
            tokens=self.state.tokens,
            model_config=dataclasses.asdict(cfg.model.arch()),
            data=data_record,
            phase=self.data.state.phase,
            extra={"config": CONFIG_FILE, "phase2_blend": cfg.data.phase2_blend},
        )
        config_json = json.dumps(_config_dict(cfg), indent=2, default=str)
        return {CONFIG_FILE: config_json, MODEL_ARTIFACT_FILE: manifest_json(manifest)}

    # ----------------------------------------------------------------------------- the run

    def run(self) -> TrainSummary:
        """Train to `plan.total_steps` (or a stop signal); evaluate, checkpoint, log."""
        status = COMPLETED
        entropy = self._announce_start()
        # The run's average tokens/s is timed from here: the corpus statistic above (a pass over
        # the train split) is set-up, like building the model and opening the data.
        run_start, start_tokens = time.perf_counter(), self.state.tokens
        try:
            with StopRequest() as stop:
                while self.state.step < self.plan.total_steps:
                    try:
                        outcome = self._timed_step()
                    except PhaseSwitchError as e:
                        raise PhaseSwitchError(f"{e}; {self._save_before_stopping()}") from e
                    self._check_health(outcome.result)
                    if self.checkpointer is not None:
                        self.checkpointer.poll()
                    if self.cfg.train.eval_iters and self.state.step % self.cfg.train.eval_interval == 0:
                        loss = self.evaluate("eval")
                        self.valid_loss = loss if loss is not None else self.valid_loss
                    stopping = stop.requested(self.parallel)
                    if stopping or self._save_due():
                        self.save()
                    if stopping:
                        status = INTERRUPTED
                        # whether this step was checkpointed (save() keeps none of a skipped step
                        # or non-finite weights), and where a rerun resumes
                        saved = self.last_checkpoint if self._saved_step == self.state.step else None
                        self.metrics.event(
                            "stop",
                            {
                                "step": self.state.step,
                                "signal": stop.agreed,
                                "checkpoint": saved,
                                "resume_from": self.last_checkpoint,
                            },
                        )
                        break
            if status == COMPLETED and self.cfg.train.eval_iters:
                # As Megatron's pretrain() after its loop: a last validation pass, even when the
                # last step has just evaluated (the valid split is sized for it: the "+ 1" of
                # `eval_dataset`), then the test pass. Both come after the last checkpoint, so
                # a resumed or re-run job reads the same valid samples; a stopped run has neither.
                self.metrics.event("final_pass", {"step": self.state.step})
                loss = self.evaluate("eval")
                self.valid_loss = loss if loss is not None else self.valid_loss
                self.test_loss = self.evaluate("test")
        except BaseException:
            # The run's own error is the one to report: closing after it (flushing the metrics
            # file onto the disk that just filled) raised a second, naming nothing, in its place.
            with contextlib.suppress(Exception):
                self.close()
            raise
        self.close()
        run_tokens = self.state.tokens - start_tokens
        wall = time.perf_counter() - run_start
        summary = self._summary(status, entropy, run_tokens / wall if run_tokens and wall > 0 else None)
        self.metrics.event("end", dataclasses.asdict(summary))
        return summary

    def _save_before_stopping(self) -> str:
        """Checkpoint the last step before a stop that is no fault of the weights (the phase-2
        blend missing at the switch), so that nothing trained is lost; says what is kept."""
        path = self.save() or (self.last_checkpoint if self._saved_step == self.state.step else None)
        if path is None:
            return f"no checkpoint could be saved at step {self.state.step}"
        return f"checkpoint {path} (step {self.state.step}) is saved: prepare the blend and run again to resume there"

    def _announce_start(self) -> float | None:
        cfg = self.cfg
        entropy = (
            unigram_entropy(cfg.data.blend, split_string=cfg.data.split)
            if self.rank0 and not cfg.data.mock
            else None
        )
        fp8_summary = getattr(self.model, "fp8_summary", None)  # set by apply_fp8_if_enabled
        self.metrics.event(
            "start",
            {
                "total_steps": self.plan.total_steps,
                "step": self.state.step,
                "resumed_from": self.restored.resumed_from,
                "finetuned_from": self.restored.finetuned_from,
                "grad_accumulation": self.plan.grad_accumulation,
                "compute_weights": self.compute_weights,
                "unigram_entropy": entropy,
                "fp8": None if fp8_summary is None else fp8_summary.describe(),
                "ignored_layout": None if self.world > 1 else ignored_layout(cfg),
            },
        )
        if entropy is not None:
            self.metrics.log("run", self.state.step, {"unigram_entropy": entropy})
        return entropy

    def _timed_step(self) -> StepOutcome:
        """`step()`, timed to the device, and its train record."""
        start = time.perf_counter()
        outcome = self.step()
        if outcome.phase_switched:
            self.metrics.event("phase", {"step": self.state.step - 1, "phase": 2})
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        step_tokens = self.data.last_step_tokens
        step_flops = flops.training_flops(self.cfg.model.arch(), self.data.last_step_lengths)
        result = outcome.result
        values: dict[str, Any] = {
            "loss": result.loss,
            "lm_loss": result.lm_loss,
            "lr": outcome.lr,
            "grad_norm": result.grad_norm,
            "tokens": self.state.tokens,
            "phase": self.data.state.phase,
            "step_time": elapsed,
            "data_time": outcome.data_time,
            "tokens_per_second": step_tokens / elapsed,
            "tflops": step_flops / elapsed / 1e12 / self.world,
            "mfu": step_flops / elapsed / (flops.H200_BF16_PEAK_FLOPS * self.world),
            "memory_gb": _memory_gb(self.device),
            "skipped": not result.finite,
            "skipped_steps": self.state.skipped_steps,
        }
        if outcome.balance is not None:
            values.update(outcome.balance.summary())
            values["balance/per_layer_max_over_mean"] = outcome.balance.max_over_mean
            values["balance/per_layer_bias_range"] = [
                hi - lo for lo, hi in zip(outcome.balance.bias_min, outcome.balance.bias_max)
            ]
        step = self.state.step
        if step % self.cfg.train.log_interval == 0 or step == self.plan.total_steps:
            self.metrics.log("train", step, values)
        return outcome

    def _check_health(self, result: StepResult) -> None:
        """Stop a run that cannot train: a first step from fresh weights with no usable
        gradient, or more than `train.max_consecutive_nonfinite` non-finite steps in a row."""
        if self.state.step == 1 and self._first_step == 0 and not self.restored.finetuned_from:
            if not result.finite or result.grad_norm == 0.0:
                what = (
                    "every gradient is zero (gradient norm 0)"
                    if result.finite
                    else f"the loss or gradient norm is not finite (loss {result.loss}, gradient "
                    f"norm {result.grad_norm})"
                )
                raise InitializationError(
                    f"the first step from freshly initialised weights cannot train: {what}; "
                    f"the initial weights saturate or overflow the model (model.init_std="
                    f"{self.cfg.model.init_std})"
                )
        if self.state.consecutive_nonfinite > self.cfg.train.max_consecutive_nonfinite:
            good = (
                f"the last good checkpoint (a finite step followed it) is {self.good_checkpoint}"
                if self.good_checkpoint
                else "no checkpoint of this run was followed by a finite step"
            )
            if self._unconfirmed_checkpoint:
                good += (
                    f"; {self._unconfirmed_checkpoint} directly precedes these steps and may "
                    f"hold the weights that caused them"
                )
            raise NonFiniteLossError(
                f"{self.state.consecutive_nonfinite} consecutive steps (up to step "
                f"{self.state.step}) had a non-finite loss or gradient norm (loss {result.loss}, "
                f"grad norm {result.grad_norm}); stopping (train.max_consecutive_nonfinite="
                f"{self.cfg.train.max_consecutive_nonfinite}). Updates of those steps were "
                f"skipped; {good}"
            )

    def _save_due(self) -> bool:
        step = self.state.step
        return (
            step % self.cfg.checkpoint.save_interval == 0
            or step == self.plan.total_steps
            or self._save_pending
        )

    def close(self) -> None:
        """Stop the loader workers, finish an in-flight save, let go of the save directory,
        close the metrics."""
        try:
            self.data.close()
            if self.checkpointer is not None:
                self.checkpointer.wait()
        finally:
            if self.save_dir_claim is not None:
                self.save_dir_claim.release()
            self.metrics.close()

    def _summary(self, status: str, entropy: float | None, tokens_per_second: float | None) -> TrainSummary:
        problem = None
        allowed = self.cfg.train.max_skipped_steps
        if status == COMPLETED and self.state.skipped_steps > allowed:
            status = SKIPPED_STEPS
            problem = (
                f"{self.state.skipped_steps} of {self.state.step} steps were skipped "
                f"(non-finite loss or gradient norm); train.max_skipped_steps={allowed} "
                f"allows {allowed}"
            )
        elif status == INTERRUPTED:
            # as the stop event: save() keeps nothing of a skipped step or non-finite weights
            step = self.state.step
            if self._saved_step == step:
                problem = f"stopped by a signal after saving a checkpoint of step {step}"
            else:
                since = f"resumes from {self.last_checkpoint}" if self.last_checkpoint else "starts over"
                problem = f"stopped by a signal without a checkpoint of step {step}; a rerun {since}"
        balance = self.last_balance
        return TrainSummary(
            steps=self.state.step,
            tokens=self.state.tokens,
            final_loss=self.last.lm_loss if self.last is not None else None,
            checkpoint=self.last_checkpoint,
            status=status,
            valid_loss=self.valid_loss,
            test_loss=self.test_loss,
            skipped_steps=self.state.skipped_steps,
            balance_max_over_mean=balance.worst_max_over_mean if balance else None,
            balance_bias_range=balance.bias_range if balance else None,
            unigram_entropy=entropy,
            tokens_per_second=tokens_per_second,
            resumed_from=self.restored.resumed_from,
            finetuned_from=self.restored.finetuned_from,
            problem=problem,
            warnings=list(self.warnings),
        )


# ---------------------------------------------------------------------------------------------
# The entry point


def _one_process_accumulation(cfg) -> int:
    """Micro-batches per step when one process trains (what `auto` compute weights look at
    there; with several ranks it is bf16 anyway)."""
    return max(1, cfg.train.global_batch_size // max(1, cfg.train.micro_batch_size))


def pretrain(cfg, job_dir: str | Path, *, on_event: EventHook | None = None, mesh=None) -> TrainSummary:
    """Train per `cfg` (a PretrainConfig), writing metrics into `job_dir` and checkpoints into
    `cfg.checkpoint.save`. `on_event(kind, payload)` receives start / train / eval / test /
    phase / checkpoint / warning / stop / end events (the CLI draws its progress from them).

    Under torchrun the processes join one process group here (unless the caller already did)."""
    device_type = cfg.train.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        # before any process group or model exists (one process trains the whole model and
        # ignores the configured layout)
        check_pipeline(cfg.model.parallel(), cfg.model.arch())
    # Resolved once: bf16 compute weights in one process need a (one-rank) process group.
    weights = resolve_compute_weights(
        cfg.train, torch.device(device_type), world, _one_process_accumulation(cfg)
    )
    with launcher_process_group(device_type, one_rank=weights == "bf16"):
        trainer = Trainer.for_run(cfg, job_dir, compute_weights=weights, on_event=on_event, mesh=mesh)
        return trainer.run()
