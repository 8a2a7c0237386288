"""Training-time data: the batch plan, the phase curriculum and the sample loader.

The loader's whole state is the number of samples consumed per split (plus, for training, the
sample at which phase 2 began), so a resumed run reads exactly the samples an uninterrupted one
would: nothing re-read, nothing skipped. Batches are cut Megatron-style: a step consumes
`global_batch_size` consecutive samples; micro-step m of data-parallel rank r takes samples
`start + m * micro * dp + r * micro ...` (+ micro). Under context parallelism every CP rank of a
data-parallel rank loads the same samples and keeps its chunks of each sequence (`cp_shard`).
With mixed sequence lengths each rank's micro-batches are instead a contiguous share of the
step's samples (`micro_batch_indices`), so every rank gets the same mix of lengths.

Mixed sequence lengths (`data.mixed_length_blends`, the long-context phase): samples of
different lengths may share a step; a micro-batch is right-padded to its longest sample with
labels ignored and loss_mask 0 (the model is causal, so padding changes nothing before it), and
the loop normalises the loss over the step's tokens.

With `data.num_workers` > 0, training micro-batches come from a torch DataLoader whose batch
sampler walks exactly those indices from the consumed-samples position: N worker processes
read and collate the next steps' samples while the current step trains (pinned memory on
CUDA). What was prefetched but not yet taken is not part of the state: a resumed run starts a
new stream at the consumed-samples position and reads the same samples.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from nemotron.data.blended import build_blending_indices, build_mixed_length_dataset
from nemotron.data.config import DataConfig, available_cpus, too_many_workers
from nemotron.data.gpt_dataset import (
    DEFAULT_SPLIT,
    SPLITS,
    GPTDatasetError,
    IndexTooLargeError,
    build_split_dataset,
    check_index_memory,
    is_single_blend,
    load_blend,
    open_indexed,
    physical_memory,
    read_blend,
    split_bounds,
    split_documents,
    split_has_share,
)
from nemotron.data.indexed import IndexedDatasetError, seal_difference
from nemotron.distributed.context_parallel import cp_shard
from nemotron.distributed.parallel_dims import check_sequence_lengths, sequence_shards_how
from nemotron.distributed.utils import all_ranks_true
from nemotron.kernels.cross_entropy import IGNORE_INDEX
from nemotron.train.checkpoint import saved_count
from nemotron.train.config import TrainConfig
from nemotron.train.plan import (  # noqa: F401 - re-exported with the loader
    BatchPlan,
    TrainDataError,
    evaluation_warnings,
    mean_sample_length,
    phase2_start_step,
    plan_batches,
)


class PhaseSwitchError(TrainDataError):
    """The phase-2 blend cannot be read at the phase switch (the loader is still in phase 1)."""


@dataclass
class LoaderState:
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    phase: int = 1
    phase2_start_sample: int | None = None  # consumed_train_samples when phase 2 began


class MockDataset(torch.utils.data.Dataset):
    """Uniform-random tokens, a pure function of (seed, index): for benchmarks only."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int) -> None:
        self.num_samples, self.seq_length = num_samples, seq_length
        self.vocab_size, self.seed = vocab_size, seed

    def __len__(self) -> int:
        return self.num_samples

    def sample_length(self, idx: int) -> int:
        return self.seq_length

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + idx)
        t = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=gen)
        return {"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(self.seq_length)}


class MixedMockDataset(torch.utils.data.Dataset):
    """Mock samples of several lengths, interleaved by the blending rule on `weights` (so a
    benchmark sees the long-context phase's mix of lengths)."""

    def __init__(
        self, num_samples: int, seq_lengths: list[int], weights: list[float], vocab_size: int, seed: int
    ) -> None:
        self.parts = [
            MockDataset(num_samples, n, vocab_size, seed + 7919 * k) for k, n in enumerate(seq_lengths)
        ]
        check_index_memory(f"mock data of {num_samples} samples", num_samples * (2 + 8))
        self.dataset_index, self.sample_index = build_blending_indices(weights, num_samples)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def sample_length(self, idx: int) -> int:
        return self.parts[int(self.dataset_index[idx])].seq_length

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.parts[int(self.dataset_index[idx])][int(self.sample_index[idx])]


def blend_has_split(blend_json: str | Path, split: str, split_string: str | None = None) -> bool:
    """Whether the blend names prefixes for `split` (`split_has_share`). Data prep writes
    `"valid": []` when `valid_fraction` is 0, and a split string may give a split no share
    ("99,1,0"): that split is absent (no evaluation), not a malformed blend."""
    return split_has_share(blend_json, split, split_string)


def _prep_record(blend_json: str | Path) -> dict | None:
    """The record of the data prep that wrote `blend_json` (its metadata.json beside it), None
    for a hand-written blend or one without that record. A metadata.json that is there but
    unreadable is an error: read as absent, it would skip the checks made from it."""
    path = Path(blend_json).parent / "metadata.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise TrainDataError(f"{path} (data prep's record beside {blend_json}) cannot be read: {e}") from None
    try:
        record = json.loads(text)
    except ValueError as e:
        raise TrainDataError(f"{path} (data prep's record beside {blend_json}) is not JSON: {e}") from None
    except RecursionError:
        raise TrainDataError(
            f"{path} (data prep's record beside {blend_json}) is not JSON: nested too deeply"
        ) from None
    if not isinstance(record, dict):
        raise TrainDataError(
            f"{path} (data prep's record beside {blend_json}) is not a JSON object; "
            "remove it for a hand-written blend, or prepare the data again"
        )
    return record


def _prep_tokenizer(blend_json: str | Path) -> dict | None:
    """The tokenizer data prep recorded for `blend_json` (`_prep_record`), None without one."""
    record = _prep_record(blend_json)
    tokenizer = record.get("tokenizer") if record is not None else None
    return tokenizer if isinstance(tokenizer, dict) else None


def check_prepared_shards(blend_json: str | Path, split: str) -> None:
    """Compare the shards that `split` of `blend_json` reads with the seals data prep recorded
    of them (metadata.json beside it: sizes and the ends' sha256, `shard_seal`). A shard
    truncated, rewritten, or exchanged with another of the same size after prep (an `.idx`
    moved between two shards passes every check of the index alone, and reads other tokens)
    is an error naming it. Prefixes the record does not name (a hand-written or edited blend),
    and records older than the seals, are not checked."""
    record = _prep_record(blend_json)
    splits = record.get("splits") if record is not None else None
    entries = splits.get(split) if isinstance(splits, dict) else None
    if not isinstance(entries, list):
        return
    try:
        _, prefixes = read_blend(blend_json, split)
    except GPTDatasetError:
        return  # the dataset build names what is wrong with the blend
    named = {str(Path(p).resolve()) for p in prefixes}
    for entry in entries:
        if not isinstance(entry, dict) or "seal" not in entry or not isinstance(entry.get("prefix"), str):
            continue
        prefix = entry["prefix"]
        if str(Path(prefix).resolve()) not in named:
            continue
        seal = entry["seal"] if isinstance(entry["seal"], dict) else {}  # damaged: named as such
        difference = seal_difference(prefix, seal)
        if difference is not None:
            raise TrainDataError(
                f"{prefix} ({split} split of {blend_json}) is not the shard data prep wrote: "
                f"{difference} ({Path(blend_json).parent / 'metadata.json'}); it was changed, "
                "truncated or exchanged with another shard since: run its data prep again "
                "(the same config rebuilds a changed build)"
            )


def check_tokenizers(blends: list[tuple[str, str | Path]], vocab_size: int) -> list[str]:
    """Compare the tokenizers data prep recorded for the run's blends ((config key, blend.json)
    pairs) with the model and with each other, from metadata.json alone (the token files are
    checked per sequence only when read, possibly hours into the run). A tokenizer larger than
    `model.vocab_size` is an error; blends of different tokenizers (other files or settings:
    the same text, other ids) are returned as warnings."""
    warnings, first = [], None
    for key, blend in blends:
        tokenizer = _prep_tokenizer(blend)
        if tokenizer is None:
            continue
        size = tokenizer.get("vocab_size")
        if isinstance(size, int) and size > vocab_size:
            raise TrainDataError(
                f"{key}: {blend} was tokenized with a vocabulary of {size:,} tokens "
                f"({Path(blend).parent / 'metadata.json'}), more than model.vocab_size {vocab_size:,}"
            )
        identity = tokenizer.get("identity")
        if not identity:
            continue
        if first is None:
            first = (key, blend, identity)
        elif identity != first[2]:
            warnings.append(
                f"{key}: {blend} was tokenized with another tokenizer (or other settings) than "
                f"{first[0]}: {first[1]} (their metadata.json tokenizer identities differ): the "
                "same token ids may stand for different text"
            )
    return warnings


PAD_VALUES = {"tokens": 0, "labels": IGNORE_INDEX, "loss_mask": 0}


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples; shorter ones are right-padded to the longest (labels ignored, loss_mask
    0), so a micro-batch may mix sequence lengths."""
    length = max(s["tokens"].shape[0] for s in samples)
    batch = {}
    for key in samples[0]:
        rows = [
            s[key]
            if s[key].shape[0] == length
            else torch.nn.functional.pad(s[key], (0, length - s[key].shape[0]), value=PAD_VALUES[key])
            for s in samples
        ]
        batch[key] = torch.stack(rows)
    return batch


def micro_batch_indices(
    plan: BatchPlan, dp_rank: int, start: int, stop: int, by_rank: bool = False
) -> Iterator[list[int]]:
    """Sample indices of this rank's micro-batches for the global batches in [start, stop).

    Megatron's order: micro-step m of rank r takes the samples `m * micro * dp + r * micro`
    (+ micro) of the step. With `by_rank` (mixed sequence lengths) rank r takes instead the
    contiguous share `r * gbs / dp` (+ gbs / dp) of the step, micro-batch by micro-batch: the
    blending rule keeps every run of consecutive samples at its weights' mix (within 2 per
    blend), so every rank gets the same mix of lengths. Megatron's interleaving would hand an
    even number of ranks every other sample: with the long-context phase's 1:1 mix, all the
    512K samples to the even ranks and all the 4K ones to the odd ranks, which would wait."""
    micro, dp = plan.micro_batch_size, plan.dp_size
    if not by_rank:
        for first in range(start, stop, micro * dp):
            begin = first + dp_rank * micro
            yield list(range(begin, begin + micro))
        return
    share = plan.global_batch_size // dp
    for step_start in range(start, stop, plan.global_batch_size):
        for m in range(plan.grad_accumulation):
            begin = step_start + dp_rank * share + m * micro
            yield list(range(begin, begin + micro))


class StepBatchSampler(torch.utils.data.Sampler):
    """A DataLoader batch sampler over `micro_batch_indices`: the rank's micro-batches of every
    step from sample `start` up to `stop` (whole global batches), in training order."""

    def __init__(self, plan: BatchPlan, dp_rank: int, start: int, stop: int, by_rank: bool = False) -> None:
        self.plan, self.dp_rank, self.start, self.stop = plan, dp_rank, start, stop
        self.by_rank = by_rank

    def __iter__(self) -> Iterator[list[int]]:
        return micro_batch_indices(self.plan, self.dp_rank, self.start, self.stop, self.by_rank)

    def __len__(self) -> int:
        step = self.plan.micro_batch_size * self.plan.dp_size
        return max(0, -(-(self.stop - self.start) // step))


def ignore_interrupts(worker_id: int) -> None:
    """A loader worker's start (`worker_init_fn`): Ctrl-C in a terminal reaches every process of
    the foreground group, and the training process turns the first one into "checkpoint after
    this step" (`trainer.StopRequest`); a worker killed by it would fail that step's remaining
    fetches. The training process shuts its workers down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class _Stream:
    """A DataLoader iterator reading one phase's samples ahead of the loop."""

    phase: int
    next_offset: int  # the phase-relative sample its next micro-batch starts a step at
    batches: Iterator[dict[str, torch.Tensor]]


# Not fork: a training process holds a process group (gloo/NCCL and TCP-store threads), and a
# worker forked from it crashed at start-up now and then (SIGSEGV before any worker code ran,
# reproduced on CPU). Not forkserver: its workers are the server's children, so they outlive a
# training process that is killed (their parent-death check watches the server), holding its
# output pipes open. Spawned workers start clean and exit with their parent; the datasets pickle
# their memory maps by file reference (`nemotron.data.mapped`).
WORKER_START_METHOD = "spawn"


class TrainingData:
    """Datasets of a run (built lazily) and the loader position."""

    def __init__(
        self,
        data: DataConfig,
        train: TrainConfig,
        plan: BatchPlan,
        vocab_size: int,
        dp_rank: int = 0,
        state: LoaderState | None = None,
        *,
        cp_rank: int = 0,
        cp_size: int = 1,
        sequence_multiple: int = 1,
        context_halo: int = 0,
        pin_memory: bool = False,
        state_file: str | Path | None = None,
    ) -> None:
        """`state`: the loader position a checkpoint saved, read from `state_file` (named in
        errors about it);
        `cp_rank`/`cp_size`: keep only this context-parallel rank's chunks of each sequence;
        `sequence_multiple`: every sample length must divide into this many pieces (2*CP*TP);
        `context_halo`: tokens each of a sample's 2*CP chunks must hold at least (the Mamba
        conv's context, `distributed.parallel_dims.context_halo`);
        `pin_memory`: page-locked batches from the loader workers (CUDA)."""
        if data.num_workers < 0:
            raise TrainDataError(f"data.num_workers must be >= 0, got {data.num_workers}")
        problem = too_many_workers("data.num_workers", data.num_workers, available_cpus())
        if problem:
            raise TrainDataError(problem)
        self.data, self.train, self.plan = data, train, plan
        self.vocab_size = vocab_size
        self.dp_rank = dp_rank
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.state = state or LoaderState()
        self.state_file = state_file
        done = self.state.consumed_train_samples // plan.global_batch_size
        if done and not self.state.consumed_valid_samples and train.eval_interval > 0:
            # Resumed with no valid samples read (the run evaluated nothing so far, e.g. it had
            # train.eval_iters=0): as Megatron, start valid where a run that had evaluated
            # every eval_interval steps would stand, so the evaluations from here on read what
            # they would have in such an uninterrupted run.
            evaluations = done // train.eval_interval
            self.state.consumed_valid_samples = evaluations * train.eval_iters * plan.global_batch_size
        self.pin_memory = pin_memory
        self.switch_step = phase2_start_step(plan, data)
        self._datasets: dict[str, torch.utils.data.Dataset | None] = {}
        self.last_step_tokens = 0  # tokens (labels) of the last global batch served, no padding
        self.last_step_lengths: list[int] = []  # its samples' lengths (FLOPs depend on them)
        self.switch_warnings: list[str] = []  # what the phase switch found to warn about
        # Training samples of several lengths: each rank reads a contiguous share of a step
        # (`micro_batch_indices`), so that all get the same mix of lengths.
        self.mixed_lengths = bool(data.mixed_length_blends)
        lengths = {"train.seq_length": plan.seq_length} | {
            f"data.mixed_length_blends[{i}].seq_length": m.seq_length
            for i, m in enumerate(data.mixed_length_blends)
        }
        tp = sequence_multiple // (2 * cp_size) if cp_size > 1 else sequence_multiple
        check_sequence_lengths(
            lengths,
            sequence_multiple,
            sequence_shards_how(tp, cp_size),
            error=TrainDataError,
            cp=cp_size,
            halo=context_halo,
        )
        self._stream: _Stream | None = None

    # -- datasets -------------------------------------------------------------------------

    def _build(self, key: str, blend: str | None, split: str, num_samples: int):
        try:
            return self._build_dataset(key, blend, split, num_samples)
        except IndexTooLargeError as e:
            raise TrainDataError(f"{self._size_origin(key, num_samples)}: {e}") from None

    def _size_origin(self, key: str, num_samples: int) -> str:
        """Where the sample count of dataset `key` comes from (the settings and the saved
        loader position that make it), for an error about its size."""
        gbs, state = self.plan.global_batch_size, self.state
        saved: tuple[str, int] | None
        if key.startswith("train"):
            what = f"train.train_iters x global_batch_size ({self.plan.total_steps} x {gbs})"
            saved = ("consumed_train_samples", state.consumed_train_samples)
        else:
            what = f"train.eval_iters x global_batch_size ({self.train.eval_iters} x {gbs}) per evaluation"
            saved = ("consumed_valid_samples", state.consumed_valid_samples) if key == "valid" else None
            if key == "valid" and self.train.eval_interval > 0:
                what += f", one every train.eval_interval={self.train.eval_interval} steps"
        origin = f"the {key} data of this run needs {num_samples} samples, from {what}"
        if saved is not None and saved[1] and self.state_file is not None:
            origin += f", resumed at loader.{saved[0]}={saved[1]} ({self.state_file})"
        elif saved is not None and saved[1]:
            origin += f", resumed at loader.{saved[0]}={saved[1]}"
        return origin

    def _build_dataset(self, key: str, blend: str | None, split: str, num_samples: int):
        if key not in self._datasets:
            if num_samples <= 0:
                self._datasets[key] = None
            elif self.data.mock:
                seed = self.train.seed + {"train1": 0, "train2": 1, "valid": 2, "test": 3}[key]
                self._datasets[key] = MockDataset(num_samples, self.plan.seq_length, self.vocab_size, seed)
                if key.startswith("train") and self.data.mixed_length_blends:
                    self._datasets[key] = MixedMockDataset(
                        num_samples,
                        [self.plan.seq_length] + [m.seq_length for m in self.data.mixed_length_blends],
                        [self.data.blend_weight] + [m.weight for m in self.data.mixed_length_blends],
                        self.vocab_size,
                        seed,
                    )
            elif key.startswith("train") and blend is None:
                raise TrainDataError(
                    f"{'data.blend' if key == 'train1' else 'data.phase2_blend'} is not set: "
                    "training needs a blend.json (or data.mock=true)"
                )
            elif blend is None or (
                not key.startswith("train") and not blend_has_split(blend, split, self.data.split)
            ):
                # Only valid/test may be absent (no evaluation); a blend without a train split
                # is an error naming it (read_blend), not a loader that has nothing to serve.
                self._datasets[key] = None
            elif key.startswith("train") and self.data.mixed_length_blends:
                parts: list[tuple[str | Path, int, float]] = [
                    (blend, self.plan.seq_length, self.data.blend_weight)
                ]
                parts += [(m.blend, m.seq_length, m.weight) for m in self.data.mixed_length_blends]
                for part in parts:
                    check_prepared_shards(part[0], split)
                self._datasets[key] = build_mixed_length_dataset(
                    parts,
                    split,
                    num_samples,
                    self.train.seed,
                    self.data.cache_dir,
                    vocab_size=self.vocab_size,
                    split_string=self.data.split,
                )
            else:
                check_prepared_shards(blend, split)
                self._datasets[key] = build_split_dataset(
                    blend,
                    split,
                    num_samples,
                    self.plan.seq_length,
                    self.train.seed,
                    self.data.cache_dir,
                    vocab_size=self.vocab_size,
                    split_string=self.data.split,
                )
        return self._datasets[key]

    def phase_samples(self, phase: int) -> int:
        gbs = self.plan.global_batch_size
        if self.switch_step is None:
            return self.plan.total_steps * gbs if phase == 1 else 0
        # Phase 2 starts at the switch step, or at once when a run resumes past it in phase 1
        # (a config whose switch comes earlier); once it has started, where it did.
        start = (
            max(self.switch_step, self.state.consumed_train_samples // gbs)
            if self.state.phase2_start_sample is None
            else (self.state.phase2_start_sample // gbs)
        )
        return start * gbs if phase == 1 else (self.plan.total_steps - start) * gbs

    def train_dataset(self, phase: int):
        blend = self.data.blend if phase == 1 else self.data.phase2_blend
        return self._build(f"train{phase}", blend, "train", self.phase_samples(phase))

    def eval_dataset(self, split: str):
        count = self.train.eval_iters * self.plan.global_batch_size  # samples of one evaluation
        if split == "valid":
            # Megatron's size: (train_iters // eval_interval + 1) evaluations. A run resumed
            # with a longer eval_interval (or more eval_iters) than the one it began with has
            # already read further: its valid split covers the evaluations still to come from
            # there, instead of running out of samples (the same size in every other case).
            interval, steps = self.train.eval_interval, self.plan.total_steps
            done = self.state.consumed_train_samples // self.plan.global_batch_size
            to_come = steps // interval - min(done, steps) // interval + 1
            num = max((steps // interval + 1) * count, self.state.consumed_valid_samples + to_come * count)
            num = num if count else 0  # eval_iters 0: no evaluation, no valid split
        else:
            num = count
        # Always the phase-1 blend's split, so every evaluation of a run is comparable.
        return self._build(split, self.data.blend, split, num)

    # -- batches --------------------------------------------------------------------------

    def open_datasets(self) -> list[str]:
        """Build (and so check) every dataset the run will still read, before its first step:
        the train split of each phase still to come, valid and test. A bad blend, split, shard
        or index then stops the run at once with the error naming it, not at the first
        evaluation, the phase switch or the test at the end. The phase-2 blend may be prepared
        while phase 1 trains: if its file does not exist yet, the returned warning says so (the
        switch builds it, `maybe_switch_phase`). Also compares the blends' tokenizers
        (`check_tokenizers`) and says which evaluation the blend leaves out
        (`evaluation_warnings`). Returns the warnings for the run to show."""
        warnings = []
        if not self.data.mock:
            blends = [("data.blend", self.data.blend)]
            blends += [
                (f"data.mixed_length_blends[{i}].blend", m.blend)
                for i, m in enumerate(self.data.mixed_length_blends)
            ]
            if self.switch_step is not None:
                blends.append(("data.phase2_blend", self.data.phase2_blend))
            warnings += check_tokenizers([(k, b) for k, b in blends if b], self.vocab_size)
        if self.state.phase == 1:
            self.train_dataset(1)
        if self.phase_samples(2) > 0:
            phase2 = self.data.phase2_blend
            assert phase2 is not None  # phase 2 has samples only with a phase-2 blend
            if self.data.mock or self.state.phase == 2 or self._phase2_blend_exists():
                self.train_dataset(2)
            else:
                warnings.append(
                    f"data.phase2_blend {phase2} does not exist yet: prepare it before the "
                    f"phase-2 switch at step {self.switch_step} (nemotron nano3 data prep "
                    "pretrain -c phase2); the run saves a checkpoint and stops there otherwise"
                )
        evaluated = [self.eval_dataset(split) for split in ("valid", "test")]  # (both built: checked)
        if any(dataset is not None for dataset in evaluated):
            self._check_evaluation_memory()
        return warnings + evaluation_warnings(self.data, self.train)

    def _check_evaluation_memory(self) -> None:
        """An evaluation holds all its micro-batches of this rank at once (the pipeline schedule
        takes them as one list; tokens and labels int64, the loss mask float32): an eval_iters
        for which they exceed the machine's memory is refused now, not at the first evaluation."""
        plan = self.plan
        samples = self.train.eval_iters * plan.micro_batch_size * plan.grad_accumulation
        held = samples * plan.seq_length * (8 + 8 + 4)
        memory = physical_memory()
        if memory is not None and held > memory:
            raise TrainDataError(
                f"train.eval_iters {self.train.eval_iters}: an evaluation holds its {samples} samples "
                f"of {plan.seq_length} tokens of each rank at once, {held / 2**30:,.1f} GiB, more "
                f"than the {memory / 2**30:,.1f} GiB of memory this machine has"
            )

    def maybe_switch_phase(self, step: int) -> bool:
        """Enter phase 2 if `step` (0-based, about to run) is the switch step. True if switched.

        The phase-2 dataset is built first: if it cannot be (a blend still missing), a
        `PhaseSwitchError` is raised with the loader still in phase 1, so a checkpoint saved
        then resumes at the switch."""
        if self.state.phase == 1 and self.switch_step is not None and step >= self.switch_step:
            where = f"phase 2 cannot start at step {step}: data.phase2_blend {self.data.phase2_blend}"
            if not self.data.mock:
                # Data prep may finish in this very instant: every rank must take the same
                # branch (one switching while another stops would wait on each other forever).
                if not self._phase2_blend_exists():
                    raise PhaseSwitchError(f"{where}: the file does not exist (on every rank)")
                # A blend prepared while phase 1 trained: its tokenizer and shard seals too. Its
                # metadata.json lands just after blend.json, so these are agreed on as well.
                pairs = [("data.blend", self.data.blend), ("data.phase2_blend", self.data.phase2_blend)]
                error: TrainDataError | None = None
                try:
                    self.switch_warnings = check_tokenizers([(k, b) for k, b in pairs if b], self.vocab_size)
                    if self.data.phase2_blend:  # (it exists: checked above)
                        check_prepared_shards(self.data.phase2_blend, "train")
                except TrainDataError as e:
                    error = e
                if not all_ranks_true(error is None):
                    raise PhaseSwitchError(
                        f"{where}: {error or 'its tokenizer check failed on another rank'}"
                    )
            try:
                self.train_dataset(2)
            except (GPTDatasetError, IndexedDatasetError, TrainDataError) as e:
                raise PhaseSwitchError(f"{where}: {e}") from e
            self.state.phase = 2
            self.state.phase2_start_sample = self.state.consumed_train_samples
            return True
        return False

    def _phase2_blend_exists(self) -> bool:
        """Whether data.phase2_blend exists, decided once for all ranks (true only when every
        rank sees it): each rank looking for itself, they could disagree in the instant data
        prep moves the file in. Every rank calls this at the same point."""
        return all_ranks_true(self.data.phase2_blend is not None and Path(self.data.phase2_blend).exists())

    def _micro_batches(
        self, dataset, start: int, count: int, by_rank: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        return [
            self._local(collate([dataset[i] for i in indices]))
            for indices in micro_batch_indices(self.plan, self.dp_rank, start, start + count, by_rank)
        ]

    def _local(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's part of a micro-batch: its chunks of every sequence under CP."""
        if self.cp_size == 1:
            return batch
        return {k: cp_shard(v, self.cp_rank, self.cp_size) for k, v in batch.items()}

    def _prefetched(self, phase: int, dataset, offset: int) -> list[dict[str, torch.Tensor]]:
        """The step at `offset` from the background stream, (re)started there if needed."""
        stream = self._stream
        if stream is None or stream.phase != phase or stream.next_offset != offset:
            self.close()
            loader = torch.utils.data.DataLoader(
                dataset,
                num_workers=self.data.num_workers,
                collate_fn=collate,
                batch_sampler=StepBatchSampler(
                    self.plan, self.dp_rank, offset, self.phase_samples(phase), self.mixed_lengths
                ),
                pin_memory=self.pin_memory,
                multiprocessing_context=WORKER_START_METHOD,
                worker_init_fn=ignore_interrupts,
            )
            stream = self._stream = _Stream(phase, offset, iter(loader))
        batches = [self._local(next(stream.batches)) for _ in range(self.plan.grad_accumulation)]
        stream.next_offset = offset + self.plan.global_batch_size
        return batches

    def next_train_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next step; advances the loader position."""
        phase = self.state.phase
        dataset = self.train_dataset(phase)
        phase_start = (self.state.phase2_start_sample or 0) if phase == 2 else 0
        offset = self.state.consumed_train_samples - phase_start
        if offset + self.plan.global_batch_size > len(dataset):
            # A run resumed with fewer samples than its checkpoint has read (a smaller
            # global_batch_size, the same train_iters): Megatron refuses it too (its sampler
            # asserts consumed < total samples); named here, not a bare IndexError of the blend.
            raise TrainDataError(
                f"the phase-{phase} training order holds {len(dataset)} samples, but the next step "
                f"would read {offset}..{offset + self.plan.global_batch_size - 1}: the checkpoint "
                f"has read loader.consumed_train_samples={self.state.consumed_train_samples}, more "
                f"than train.train_iters x train.global_batch_size leave room for; resume with the "
                f"global_batch_size it was trained with, or a larger train.train_iters"
            )
        if self.data.num_workers > 0:
            batches = self._prefetched(phase, dataset, offset)
        else:
            batches = self._micro_batches(dataset, offset, self.plan.global_batch_size, self.mixed_lengths)
        self.last_step_lengths = [
            dataset.sample_length(i) for i in range(offset, offset + self.plan.global_batch_size)
        ]
        self.last_step_tokens = sum(self.last_step_lengths)
        self.state.consumed_train_samples += self.plan.global_batch_size
        return batches

    def close(self) -> None:
        """Stop the background workers (prefetched batches are dropped, the state is kept)."""
        self._stream = None  # the DataLoader iterator shuts its workers down when released

    def next_valid_batches(self) -> list[dict[str, torch.Tensor]] | None:
        """eval_iters global batches of the valid split (continuing where the last eval stopped)."""
        dataset = self.eval_dataset("valid")
        if dataset is None:
            return None
        count = self.train.eval_iters * self.plan.global_batch_size
        batches = self._micro_batches(dataset, self.state.consumed_valid_samples, count)
        self.state.consumed_valid_samples += count
        return batches

    def test_batches(self) -> list[dict[str, torch.Tensor]] | None:
        dataset = self.eval_dataset("test")
        if dataset is None:
            return None
        return self._micro_batches(dataset, 0, self.train.eval_iters * self.plan.global_batch_size)

    def state_dict(self) -> dict:
        return asdict(self.state)

    @staticmethod
    def state_from(d: dict) -> LoaderState:
        """The loader's position saved in a train_state.json ("loader"); ValueError naming the
        key of a value that is not one (`saved_count`)."""
        if not isinstance(d, dict):
            raise ValueError(f"loader must be a JSON object, got {json.dumps(d)}")
        unknown = sorted(set(d) - {f.name for f in fields(LoaderState)})
        if unknown:
            raise ValueError(f"loader has unknown keys {unknown}")
        if "consumed_train_samples" not in d:  # the data position itself: never defaulted
            raise ValueError("loader has no consumed_train_samples")
        state = LoaderState(**d)
        given = asdict(state)  # an older checkpoint may lack the later keys: their defaults
        saved_count(given, "consumed_train_samples", "loader.")
        saved_count(given, "consumed_valid_samples", "loader.")
        if type(state.phase) is not int or state.phase not in (1, 2):
            raise ValueError(f"loader.phase must be 1 or 2, got {json.dumps(state.phase)}")
        if state.phase2_start_sample is not None:
            start = saved_count(given, "phase2_start_sample", "loader.")
            if start > state.consumed_train_samples:
                raise ValueError(
                    f"loader.phase2_start_sample {start} is past loader.consumed_train_samples "
                    f"{state.consumed_train_samples}"
                )
        return state


# Tokens gathered per bincount when the index places sequences apart: bounds the gather's
# index array (8 bytes a token, about) whatever the split's size.
_GATHER_TOKENS = 1 << 24


def _token_counts(dataset, first: int, stop: int) -> np.ndarray:
    """How often each token id occurs in sequences [first, stop) of an indexed dataset (the
    documents a split reads). Sequences written back to back (Megatron's writer, data prep)
    are one slice of the .bin; any other layout is gathered, many sequences per read (one
    read and one count per sequence took minutes for a million short documents)."""
    lengths = np.asarray(dataset.sequence_lengths[first:stop], dtype=np.int64)
    if not lengths.size:
        return np.zeros(0, dtype=np.float64)
    pointers = np.asarray(dataset.sequence_pointers[first:stop], dtype=np.int64)
    itemsize = dataset.dtype.itemsize
    data = np.memmap(str(dataset.prefix) + ".bin", dtype=dataset.dtype, mode="r")
    if np.array_equal(pointers[1:], pointers[:-1] + lengths[:-1] * itemsize):
        begin = int(pointers[0]) // itemsize
        parts = [data[begin : begin + int(lengths.sum())]]
    else:
        starts, ends = pointers // itemsize, np.cumsum(lengths)
        # a part: the sequences ending in one stretch of _GATHER_TOKENS tokens (so about that
        # many tokens, more when its first sequence began before the stretch)
        cuts = np.searchsorted(ends, np.arange(_GATHER_TOKENS, int(ends[-1]), _GATHER_TOKENS), side="right")
        bounds = np.unique(np.concatenate([[0], cuts, [len(lengths)]]))
        parts = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            n = lengths[a:b]
            offsets = np.cumsum(n) - n  # where each sequence starts within the part
            parts.append(data[np.repeat(starts[a:b] - offsets, n) + np.arange(int(n.sum()))])
    counts = np.zeros(0, dtype=np.float64)
    for part in parts:
        if part.size and int(part.min()) < 0:
            raise IndexedDatasetError(
                f"{dataset.prefix}.bin holds token id {int(part.min())}, outside any vocabulary"
            )
        found = np.bincount(part.astype(np.int64)).astype(np.float64)
        size = max(len(counts), len(found))
        counts = np.pad(counts, (0, size - len(counts))) + np.pad(found, (0, size - len(found)))
    return counts


def unigram_entropy(
    blend_json: str | Path | None,
    split: str = "train",
    max_tokens: int = 200_000_000,
    split_string: str | None = None,
) -> float | None:
    """Entropy (nats/token) of the unigram token distribution of what `split` of the blend
    reads (weights applied), the loss of a model that ignores context: training loss should
    fall well below it. Of a file of one blend for every split, only the documents that
    `split_string` (`data.split`; None: Megatron's default) gives `split` are counted, as
    `build_split_dataset` reads them. None when there is no blend, the split has no share,
    or it holds more than `max_tokens` tokens (too costly)."""
    if blend_json is None:
        return None
    weights, prefixes = read_blend(blend_json, split)
    datasets = [open_indexed(p) for p in prefixes]
    ranges = [(0, len(d)) for d in datasets]
    if is_single_blend(load_blend(blend_json)):
        bounds = split_bounds(DEFAULT_SPLIT if split_string is None else split_string)[SPLITS.index(split)]
        if bounds is None:
            return None
        ranges = [split_documents(len(d), bounds) for d in datasets]
    sizes = [
        int(np.asarray(d.sequence_lengths[first:stop], dtype=np.int64).sum())
        for d, (first, stop) in zip(datasets, ranges)
    ]
    if sum(sizes) > max_tokens or sum(sizes) == 0:
        return None
    if weights is None:
        # Prefixes without weights are each read once: in proportion to their sizes.
        weights = [float(n) for n in sizes]
    mixture = None
    total_weight = sum(w for w, n in zip(weights, sizes) if n)
    for weight, dataset, (first, stop), n in zip(weights, datasets, ranges, sizes):
        if not n:
            continue
        counts = _token_counts(dataset, first, stop)
        p = counts / counts.sum() * (weight / total_weight)
        if mixture is None:
            mixture = p
        else:
            size = max(len(mixture), len(p))
            mixture = np.pad(mixture, (0, size - len(mixture))) + np.pad(p, (0, size - len(p)))
    if mixture is None:  # no dataset in the split
        return None
    nz = mixture[mixture > 0]
    return float(-(nz * np.log(nz)).sum())
