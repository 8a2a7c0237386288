"""Typed configs owned by the data package: data preparation, and the training-time loader."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# Worker processes (data prep's, the training loader's) per CPU this process may use: beyond,
# num_workers is a mistake, refused before any starts (a typo'd 1000000 forked a process per
# work unit of a large input, or until the machine gave out).
MAX_WORKERS_PER_CPU = 16


def available_cpus() -> int:
    """CPUs this process may run on (a Slurm or taskset allocation, not the whole machine)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # platforms without sched_getaffinity
        return os.cpu_count() or 1


def too_many_workers(key: str, workers: int, cpus: int) -> str | None:
    """Why `workers` processes (config key `key`) are refused on `cpus` CPUs; None if they are not."""
    if workers <= MAX_WORKERS_PER_CPU * cpus:
        return None
    return (
        f"{key} {workers} is more than {MAX_WORKERS_PER_CPU} worker processes per CPU for the "
        f"{cpus} CPUs this process may use"
    )


# Set to "slurm" by the launcher when several Slurm tasks share one data prep (each then takes
# its rank from SLURM_PROCID). Here, not in nemotron.launch: the job reads it without importing
# NeMo-Run (and torch with it).
PREP_TASKS_ENV = "NEMOTRON_PREP_TASKS"


@dataclass
class TokenizerConfig:
    # Hugging Face hub id, a local directory, a tokenizer.json, or a SentencePiece .model.
    model: str = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"
    kind: str = "auto"  # auto | huggingface | sentencepiece
    add_bos: bool = False
    add_eos: bool = True
    revision: str | None = None  # hub revision (branch, tag or commit); resolved to a commit
    # Special tokens by their text; None = read tokenizer_config.json / the SentencePiece model.
    bos_token: str | None = None
    eos_token: str | None = None


@dataclass
class DataPrepConfig:
    blend_path: str = "data_blend_raw.json"  # relative names resolve against the recipe directory
    output_dir: str = "output/nano3/stage0_pretrain"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    num_shards: int = 128
    valid_shards: int = 1
    test_shards: int = 1
    # Fraction of each dataset's documents routed to valid/test (deterministic by document hash).
    valid_fraction: float = 0.001
    test_fraction: float = 0.001
    text_field: str = "text"
    min_doc_chars: int | None = None
    max_doc_tokens: int | None = None
    sample: int | None = None
    # Worker processes, each on one core (the tokenizer's thread pool is off); None = every CPU
    # this process may use (its Slurm task's, its taskset). Fewer than the CPUs is warned about.
    num_workers: int | None = None
    max_bad_record_fraction: float = 0.01
    force: bool = False
    # Largest unit of parallel work, in MB of text. Units are sized from the input and the
    # number of workers (8 per worker, at least 1 MB, at most this): large files are split
    # (plain jsonl byte ranges), small ones grouped. Output bytes do not depend on it; it sets
    # the granularity of parallelism and of resume.
    work_unit_mb: float = 64.0
    # W&B: log the output as the artifact `DataBlendsArtifact-pretrain` (the same keys as the
    # pretraining recipe's logger.wandb*; the project defaults to $WANDB_PROJECT, then nemotron).
    wandb: bool = False
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_mode: str = "offline"  # online | offline | disabled


@dataclass
class SequenceLengthBlend:
    """A per-split blend.json whose training samples have their own length (e.g. the 4K
    sequences mixed into the long-context phase's 512K ones)."""

    blend: str = ""
    seq_length: int = 4096
    weight: float = 1.0  # per-sample weight against `DataConfig.blend_weight`


@dataclass
class DataConfig:
    """What training reads: the per-split blend written by data prep, and the phase curriculum."""

    blend: str | None = None  # path to blend.json (phase 1)
    # Mixed sequence lengths (long-context phase): training samples of `blend` (or
    # `phase2_blend`) have train.seq_length tokens; each entry here adds a blend whose samples
    # have its own seq_length. The two kinds are interleaved per sample, deterministically, by
    # Megatron's blending rule on the weights (`blend_weight` for the main blend). Evaluation
    # reads the main blend only.
    blend_weight: float = 1.0
    mixed_length_blends: list[SequenceLengthBlend] = field(default_factory=list)
    # Megatron's --split ("99,1,0": train, valid, test shares of each prefix's documents) for a
    # blend.json that holds one blend for every split (a list of weight, prefix pairs, as
    # Megatron's --data-path); null means Megatron's default "969, 30, 1". A per-split
    # blend.json (what data prep writes) must leave it null.
    split: str | None = None
    phase2_blend: str | None = None  # optional blend.json for phase 2
    phase2_start_fraction: float = 0.94  # switch point, as a fraction of total tokens
    cache_dir: str | None = None  # index cache; default: <blend dir>/cache
    num_workers: int = 0
    # Synthetic uniform-random tokens instead of a blend (benchmarks only).
    mock: bool = False
