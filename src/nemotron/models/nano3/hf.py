"""Hugging Face interchange: our model <-> a transformers `NemotronHForCausalLM` directory.

A directory holds `config.json` (written by transformers' own `NemotronHConfig`) and safetensors
weights with the names transformers' `save_pretrained` writes: `backbone.*`, `lm_head.weight`, and
one pair of 2-D tensors per routed expert (`mixer.experts.{k}.up_proj.weight` [ffn, hidden],
`mixer.experts.{k}.down_proj.weight` [hidden, ffn]). Weights over `max_shard_bytes` are split into
`model-0000i-of-0000n.safetensors` with a `model.safetensors.index.json`, as transformers does.

Name mapping (all other names are identical on both sides):

| ours (in memory)                             | Hugging Face (on disk)                                     |
|----------------------------------------------|------------------------------------------------------------|
| `...mixer.router.weight`                     | `...mixer.gate.weight`                                     |
| `...mixer.router.expert_bias`                | `...mixer.gate.e_score_correction_bias`                    |
| `...mixer.experts.up_proj` [E, ffn, hidden]  | `...mixer.experts.{k}.up_proj.weight` [ffn, hidden], k<E   |
| `...mixer.experts.down_proj` [E, hidden, ffn]| `...mixer.experts.{k}.down_proj.weight` [hidden, ffn], k<E |

transformers' NemotronH never ties `lm_head` to the embedding (its `_tied_weights_keys` is
empty, whatever `tie_word_embeddings` says): a tied model is written with `lm_head.weight` (a
copy of the embedding), and an import computes with the `lm_head.weight` a directory holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nemotron.models.nano3.config import ModelConfigError, Nano3Config
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.utils.fs import (
    apply_default_modes,
    free_space_note,
    publish_dir,
    read_json,
    refuse_non_empty,
    temporary_dir,
)

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# Our block kinds <-> transformers' `layers_block_type` entries (and their legacy spellings).
HF_BLOCK_TYPE = {"mamba": "linear_attention", "attention": "full_attention", "moe": "moe", "mlp": "mlp"}
_FROM_HF_BLOCK_TYPE = {
    "linear_attention": "M",
    "mamba": "M",
    "full_attention": "*",
    "attention": "*",
    "moe": "E",
    "mlp": "-",
}
# Tensors transformers keeps in float32 whatever the checkpoint dtype.
_FP32_SUFFIXES = ("mixer.gate.weight", "mixer.gate.e_score_correction_bias")
# Multi-token-prediction heads some hub checkpoints carry; transformers ignores them too.
_IGNORED_PREFIXES = ("mtp.",)


class HFInteropError(ValueError):
    """A Hugging Face directory or config that cannot be converted, with the file and key."""


class HFWriteError(HFInteropError):
    """An export that could not be written (a full disk, an unwritable directory), naming the
    directory and the cause; an earlier directory there is untouched, nothing half-written."""


def _transformers_config_class():
    try:
        from transformers import NemotronHConfig
    except ImportError as err:  # transformers is the optional `hf` extra
        raise HFInteropError(
            "Hugging Face interchange needs transformers>=5.3 (pip install 'nemotron[hf]')"
        ) from err
    return NemotronHConfig


# ----------------------------------------------------------------------------- configs

# The one field table of the two configs: `Nano3Config` field <-> `NemotronHConfig` attribute.
# `to_hf_config` writes it, `from_hf_config` reads it back (after transformers has resolved
# legacy key spellings and defaults).
HF_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "norm_eps": "layer_norm_epsilon",
    "init_std": "initializer_range",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "mamba_num_heads": "mamba_num_heads",
    "mamba_head_dim": "mamba_head_dim",
    "mamba_state_size": "ssm_state_size",
    "mamba_num_groups": "n_groups",
    "mamba_conv_kernel": "conv_kernel",
    "mamba_chunk_size": "chunk_size",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_init_floor": "time_step_floor",
    "num_experts": "n_routed_experts",
    "moe_top_k": "num_experts_per_tok",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "moe_shared_expert_hidden_size": "moe_shared_expert_intermediate_size",
    "moe_routed_scaling_factor": "routed_scaling_factor",
    "ffn_hidden_size": "intermediate_size",
}
# NemotronH settings Nano3 fixes: written as these values, and a config with other values is
# rejected on import (the MoE ones only when the model has MoE blocks).
HF_FIXED = {
    "attention_bias": False,
    "attention_dropout": 0.0,  # transformers drops attention weights in train mode; we never do
    "mlp_hidden_act": "relu2",
    "mlp_bias": False,
    "mamba_hidden_act": "silu",
    "use_conv_bias": True,
    "mamba_proj_bias": False,
    "use_bias": False,
    "residual_in_fp32": False,
}
HF_FIXED_MOE = {
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,  # of n_group = 1 group; transformers' group top-k fails on any other value
    "n_shared_experts": 1,
    "moe_latent_size": None,
}
# The dt clamp transformers (>= 5.25) applies after softplus; ours has none (mamba2.DT_LIMIT).
# Written as is; on import, a limit whose low end is <= 0 (softplus is never negative) and
# whose high end is +inf clamps nothing, any other is refused.
_HF_TIME_STEP_LIMIT = (0.0, float("inf"))


def to_hf_config(config: Nano3Config, dtype: torch.dtype | None = None):
    """The transformers `NemotronHConfig` describing the same architecture."""
    NemotronHConfig = _transformers_config_class()
    kinds = config.block_kinds
    if "moe" in kinds and config.moe_shared_expert_hidden_size == 0:
        raise HFInteropError(
            "NemotronH always has a shared expert: moe_shared_expert_hidden_size must be > 0"
        )
    if "moe" in kinds and config.num_experts < 2:
        # its router scores each expert group by the sum of its top 2 experts
        raise HFInteropError(
            f"NemotronH's router needs at least 2 experts: num_experts is {config.num_experts}"
        )
    fixed = {k: v for k, v in HF_FIXED_MOE.items() if k != "moe_latent_size"}
    hf = NemotronHConfig(
        layers_block_type=[HF_BLOCK_TYPE[k] for k in kinds],
        tie_word_embeddings=config.tie_word_embeddings,
        **{hf_key: getattr(config, ours) for ours, hf_key in HF_CONFIG_FIELDS.items()},
        **HF_FIXED,
        **fixed,
        time_step_limit=_HF_TIME_STEP_LIMIT,
    )
    hf.architectures = ["NemotronHForCausalLM"]
    if dtype is not None:
        hf.dtype = dtype
    return hf


def _read_config_json(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFInteropError(f"{path}: not found (not a Hugging Face model directory)")
    raw = read_json(path, HFInteropError)
    if not isinstance(raw, dict):
        raise HFInteropError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("model_type") != "nemotron_h":
        raise HFInteropError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'nemotron_h'")
    return raw


def from_hf_config(hf_dir: str | os.PathLike) -> Nano3Config:
    """Read `config.json` of a NemotronH directory (`layers_block_type` or the older
    `hybrid_override_pattern`, and the older `mamba_*` key spellings) into a `Nano3Config`."""
    hf_dir = Path(hf_dir)
    where = hf_dir / "config.json"
    raw = _read_config_json(hf_dir)
    # transformers resolves legacy keys and defaults exactly as it would when loading the model.
    try:
        hf = _transformers_config_class().from_pretrained(str(hf_dir))
    except Exception as err:  # transformers' validation errors (e.g. a field of the wrong type)
        raise HFInteropError(f"{where}: {type(err).__name__}: {' '.join(str(err).split())}") from None
    try:
        pattern = "".join(_FROM_HF_BLOCK_TYPE[t] for t in hf.layers_block_type)
    except KeyError as err:
        raise HFInteropError(f"{where}: unknown layer type {err.args[0]!r} in layers_block_type") from err
    fixed = HF_FIXED | (HF_FIXED_MOE if "E" in pattern else {})
    for key, supported in fixed.items():
        value = getattr(hf, key)
        if value != supported:
            raise HFInteropError(
                f"{where}: {key}={value!r} is not supported (Nemotron 3 Nano uses {supported!r})"
            )
    _check_time_step_limit(hf.time_step_limit, where)
    fields = {ours: getattr(hf, hf_key) for ours, hf_key in HF_CONFIG_FIELDS.items()}
    if fields["head_dim"] is None:
        fields["head_dim"] = hf.hidden_size // hf.num_attention_heads
    fields["moe_routed_scaling_factor"] = _as_float(fields["moe_routed_scaling_factor"])
    # our export writes transformers' dt clamp into time_step_min and keeps the init minimum
    # under its own key (see INIT_TIME_STEP_MIN_KEY below)
    fields["mamba_dt_min"] = _as_float(raw.get(INIT_TIME_STEP_MIN_KEY, fields["mamba_dt_min"]))
    try:
        return Nano3Config(
            hybrid_pattern=pattern,
            num_layers=len(pattern),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", hf.tie_word_embeddings)),
            **fields,
        )
    except ModelConfigError as err:
        # the message names our fields: say which config.json keys they are read from
        keys = {"hybrid_pattern": "layers_block_type", **HF_CONFIG_FIELDS}
        if INIT_TIME_STEP_MIN_KEY in raw:
            keys["mamba_dt_min"] = INIT_TIME_STEP_MIN_KEY
        named = [f"{ours} <- {key}" for ours, key in keys.items() if ours != key and ours in str(err).split()]
        hint = f" (config.json keys: {', '.join(named)})" if named else ""
        raise HFInteropError(f"{where}: {err}{hint}") from err


def _as_float(value: Any) -> Any:
    """A JSON number as a float; anything else (a string, null, a list) as it is, for
    `Nano3Config.validate` to name with its config.json key (float() would raise a bare
    ValueError or TypeError naming neither)."""
    return float(value) if type(value) in (int, float) else value


def _check_time_step_limit(limit: Any, where: Path) -> None:
    """Refuse a `time_step_limit` (legacy `mamba_dt_limit`) that would clamp dt: transformers
    applies it, our mixer cannot. (`limit` as transformers' config holds it: a list or tuple.)"""
    try:
        low, high = (float(v) for v in limit)
    except (TypeError, ValueError):
        raise HFInteropError(f"{where}: time_step_limit={limit!r} is not a pair of numbers") from None
    if not (low <= 0.0 and high == float("inf")):
        raise HFInteropError(
            f"{where}: time_step_limit={[low, high]!r} clamps dt, which is not supported "
            f"(Nemotron 3 Nano does not clamp: {list(_HF_TIME_STEP_LIMIT)!r})"
        )


# ----------------------------------------------------------------------------- weights


def _moe_prefixes(config: Nano3Config) -> list[str]:
    return [f"backbone.layers.{i}.mixer." for i, kind in enumerate(config.block_kinds) if kind == "moe"]


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], config: Nano3Config) -> dict[str, torch.Tensor]:
    """Our state dict -> HF on-disk names. Per-expert tensors are views of the fused ones."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        # a tied head is written too: transformers' NemotronH does not tie (see the module doc)
        prefix, _, leaf = name.rpartition("mixer.")
        if leaf in ("experts.up_proj", "experts.down_proj"):
            which = leaf.split(".")[1]
            for k in range(tensor.shape[0]):
                out[f"{prefix}mixer.experts.{k}.{which}.weight"] = tensor[k]
        elif leaf == "router.weight":
            out[f"{prefix}mixer.gate.weight"] = tensor
        elif leaf == "router.expert_bias":
            out[f"{prefix}mixer.gate.e_score_correction_bias"] = tensor
        else:
            out[name] = tensor
    return out


def from_hf_state_dict(
    hf_tensors: Mapping[str, torch.Tensor], config: Nano3Config, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """HF on-disk names -> our state dict (fused experts stacked to 3-D). Every parameter and
    persistent buffer of the model must be present with the right shape; `mtp.*` is ignored.
    A tied config's `lm_head.weight` may be absent (the embedding serves) or equal to the
    embedding; `load_hf_state_dict` unties the config of a directory whose head differs."""
    # The expected names list every expert's tensors one by one: a config asking for experts
    # the files do not hold (n_routed_experts=10**9) is refused before they are listed (hours,
    # then out of memory), as the "missing tensors" the comparison below would report.
    held = [int(m[1]) for k in hf_tensors if (m := _EXPERT_TENSOR.match(k))]
    if _moe_prefixes(config) and config.num_experts > max(held, default=-1) + 1:
        raise HFInteropError(
            f"{source}: does not match the architecture in config.json: n_routed_experts="
            f"{config.num_experts}, but the files hold experts 0..{max(held, default=-1)} only"
        )
    with torch.device("meta"):
        expected = Nano3ForCausalLM(config).state_dict()
    wanted = to_hf_state_dict(expected, config)  # hf name -> meta tensor of the expected shape
    if config.tie_word_embeddings:
        wanted.pop(_HEAD)  # optional: checked below, against the embedding
    unexpected = sorted(
        k
        for k in hf_tensors
        if k not in wanted
        and not k.startswith(_IGNORED_PREFIXES)
        and not (config.tie_word_embeddings and k == _HEAD)
    )
    missing = sorted(k for k in wanted if k not in hf_tensors)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:5]}")
        raise HFInteropError(f"{source}: does not match the architecture in config.json: " + "; ".join(parts))
    for key, ref in wanted.items():
        got = tuple(hf_tensors[key].shape)
        if got != tuple(ref.shape):
            raise HFInteropError(f"{source}: {key} has shape {got}, expected {tuple(ref.shape)}")
        if not hf_tensors[key].is_floating_point():  # an integer tensor would be cast silently
            raise HFInteropError(
                f"{source}: {key} has dtype {hf_tensors[key].dtype}, expected a floating type"
            )

    if config.tie_word_embeddings and not _head_is_embedding(hf_tensors):
        raise HFInteropError(
            f"{source}: {_HEAD} differs from {_EMBEDDING}, but config.json ties them "
            "(tie_word_embeddings); transformers computes with the head"
        )

    state: dict[str, torch.Tensor] = {}
    for name in expected:
        if config.tie_word_embeddings and name == _HEAD:
            continue  # the embedding, below
        prefix, _, leaf = name.rpartition("mixer.")
        if leaf in ("experts.up_proj", "experts.down_proj"):
            which = leaf.split(".")[1]
            state[name] = torch.stack(
                [hf_tensors[f"{prefix}mixer.experts.{k}.{which}.weight"] for k in range(config.num_experts)]
            )
        elif leaf == "router.weight":
            state[name] = hf_tensors[f"{prefix}mixer.gate.weight"]
        elif leaf == "router.expert_bias":
            state[name] = hf_tensors[f"{prefix}mixer.gate.e_score_correction_bias"]
        else:
            state[name] = hf_tensors[name]
    if config.tie_word_embeddings:
        state[_HEAD] = state[_EMBEDDING]
    return state


_HEAD, _EMBEDDING = "lm_head.weight", "backbone.embeddings.weight"
_EXPERT_TENSOR = re.compile(r"^backbone\.layers\.\d+\.mixer\.experts\.(\d+)\.(up|down)_proj\.weight$")


def _head_is_embedding(hf_tensors: Mapping[str, torch.Tensor]) -> bool:
    """True when a directory's LM head is its embedding: absent (an export that relied on
    tying), or present with the embedding's shape, dtype and values."""
    head, embedding = hf_tensors.get(_HEAD), hf_tensors.get(_EMBEDDING)
    if head is None:
        return True
    return (
        embedding is not None
        and head.shape == embedding.shape
        and head.dtype == embedding.dtype
        and torch.equal(head, embedding)
    )


def _shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int, dtype_of) -> list[list[str]]:
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * dtype_of(name, t).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


# transformers' NemotronH up to 5.24 clamps dt from below at `config.time_step_min` (its
# chunked/prefill path; not its one-token decode path) and ignores `time_step_limit`; from 5.25
# it clamps to `time_step_limit`, written [0, inf]. Ours, like Megatron, does not clamp (limit
# [0, inf]). An export writes the smallest normal float32 there, so the clamp
# changes nothing a float32/bfloat16 model computes, and keeps our dt init minimum (which
# transformers also reads from `time_step_min`) under its own key, for the import.
EXPORT_TIME_STEP_MIN = float(torch.finfo(torch.float32).tiny)
INIT_TIME_STEP_MIN_KEY = "nemotron_init_time_step_min"


def not_an_export(out_dir: Path) -> str | None:
    """None when the directory `out_dir` is a NemotronH directory (a config.json whose
    model_type is nemotron_h: an earlier export, or one from the Hub), which `save_hf`'s
    `overwrite` may replace; otherwise why not. A mistyped OUT (a run, prepared data, a home
    directory) is never deleted for an export."""
    path = out_dir / "config.json"
    try:
        model_type = json.loads(path.read_bytes()).get("model_type")
    except FileNotFoundError:
        return "is not an earlier export (holds no config.json)"
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
        return "is not an earlier export (its config.json is not a model config)"
    if model_type != "nemotron_h":
        return f"is not an earlier export (config.json's model_type is {model_type!r}, not 'nemotron_h')"
    return None


def save_hf(
    state_dict: Mapping[str, torch.Tensor],
    config: Nano3Config,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    *,
    config_fields: Mapping[str, object] | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a transformers `NemotronHForCausalLM` directory from our model's state dict.

    `dtype`: the checkpoint dtype (None keeps each tensor's own); the router weight and expert
    bias stay float32, as transformers keeps them. `config_fields` are set on the config
    (e.g. the tokenizer's bos/eos/pad ids); `write_extra(dir)` adds files (tokenizer,
    generation config). Written to a temporary sibling directory, given ordinary modes (0644 /
    0755 under umask 022) and renamed, so a partial export never looks complete. `overwrite`
    replaces only a NemotronH directory (`not_an_export`).
    """
    out_dir = Path(out_dir)
    refuse_non_empty(out_dir, overwrite, not_an_export)
    hf_tensors = to_hf_state_dict(state_dict, config)

    def dtype_of(name: str, t: torch.Tensor) -> torch.dtype:
        if name.endswith(_FP32_SUFFIXES):
            return torch.float32
        return t.dtype if dtype is None else dtype

    model_dtype = dtype or next(iter(state_dict.values())).dtype
    tmp = temporary_dir(out_dir)  # (what killed writers of `out_dir` left there goes first)
    try:
        hf_config = to_hf_config(config, dtype=model_dtype)
        hf_config.time_step_min = EXPORT_TIME_STEP_MIN
        setattr(hf_config, INIT_TIME_STEP_MIN_KEY, config.mamba_dt_min)
        for key, value in (config_fields or {}).items():
            setattr(hf_config, key, value)
        hf_config.save_pretrained(str(tmp))
        shards = _shards(hf_tensors, max_shard_bytes, dtype_of)
        n = len(shards)
        weight_map, total = {}, 0
        for i, names in enumerate(shards, start=1):
            filename = SAFE_WEIGHTS_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            # Fresh, contiguous copies: safetensors refuses tensors that share storage (expert views).
            chunk = {
                k: hf_tensors[k]
                .detach()
                .to(device="cpu", dtype=dtype_of(k, hf_tensors[k]), copy=True)
                .contiguous()
                for k in names
            }
            save_file(chunk, str(tmp / filename), metadata={"format": "pt"})
            for k, t in chunk.items():
                weight_map[k] = filename
                total += t.numel() * t.element_size()
            del chunk
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if write_extra is not None:
            write_extra(tmp)
        apply_default_modes(tmp)
        publish_dir(tmp, out_dir)  # an earlier out_dir goes only once this one is in place
    except (OSError, SafetensorError) as err:  # a full disk, an unwritable directory
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and err.strerror:
            reason = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
        else:
            reason = " ".join(str(err).split())
        raise HFWriteError(
            f"{out_dir}: the export could not be written: {reason}{free_space_note(out_dir.parent)}"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _hf_weight_files(hf_dir: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a directory, and the index's tensor -> file map (None without
    an index)."""
    index = hf_dir / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise HFInteropError(f"{index}: not a safetensors index ({type(err).__name__}: {err})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise HFInteropError(f"{index}: weight_map is not a table of tensor name -> file name")
        files = sorted({hf_dir / f for f in weight_map.values()})
    elif (hf_dir / SAFE_WEIGHTS_NAME).is_file():
        files, weight_map = [hf_dir / SAFE_WEIGHTS_NAME], None
    else:
        raise HFInteropError(f"{hf_dir}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}")
    for f in files:
        if not f.is_file():
            raise HFInteropError(f"{f}: listed in {SAFE_WEIGHTS_INDEX_NAME} but missing")
    return files, weight_map


def _read_hf_tensors(hf_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the directory's safetensors files, each exactly once and (with an index)
    from the file the index names for it: a tensor in two files, or elsewhere than its index
    entry says, is an error naming both (transformers would take one of them silently)."""
    files, weight_map = _hf_weight_files(hf_dir)
    seen: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as reader:
                for key in reader.keys():
                    if key in seen:
                        raise HFInteropError(f"{key} is in both {seen[key]} and {f}")
                    if weight_map is not None and weight_map.get(key) != f.name:
                        listed = weight_map.get(key)
                        where = f"lists it in {listed}" if listed else "does not list it"
                        raise HFInteropError(f"{f}: holds {key}, but {SAFE_WEIGHTS_INDEX_NAME} {where}")
                    seen[key] = f
                    yield key, reader.get_tensor(key)
        except HFInteropError:
            raise
        except Exception as err:  # safetensors' own errors (a truncated or foreign file)
            raise HFInteropError(f"{f}: cannot read ({type(err).__name__}: {err})") from None
    absent = sorted(k for k in weight_map or {} if k not in seen)
    if absent:
        raise HFInteropError(
            f"{hf_dir / weight_map[absent[0]]}: does not hold {absent[0]}, which "  # type: ignore[index]
            f"{SAFE_WEIGHTS_INDEX_NAME} lists there ({len(absent)} such tensor(s))"
        )


def load_hf_state_dict(hf_dir: str | os.PathLike) -> tuple[Nano3Config, dict[str, torch.Tensor]]:
    """Read a NemotronH directory: its config and our state dict (tensors in their stored dtype)."""
    hf_dir = Path(hf_dir)
    config = from_hf_config(hf_dir)
    hf_tensors = {k: v for k, v in _read_hf_tensors(hf_dir) if not k.startswith(_IGNORED_PREFIXES)}
    if config.tie_word_embeddings and not _head_is_embedding(hf_tensors):
        # transformers computes with this head whatever tie_word_embeddings says (module doc),
        # e.g. after fine-tuning a tied export: the same model here is an untied one
        config = dataclasses.replace(config, tie_word_embeddings=False)
    return config, from_hf_state_dict(hf_tensors, config, source=str(hf_dir))


def load_hf(
    hf_dir: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """A `Nano3ForCausalLM` with the weights of a NemotronH directory."""
    config, state = load_hf_state_dict(hf_dir)
    with torch.device("meta"):
        model = Nano3ForCausalLM(config)
    model.to_empty(device=device)
    # In `dtype` before loading: loading into float32 first rounded a float64 checkpoint.
    model.to(dtype)
    model.reset_parameters()  # non-persistent buffers (the token counters)
    model.load_state_dict(state, strict=True)
    return model
