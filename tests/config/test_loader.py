"""Recipe loading: overrides (nested keys, types, lists), unknown keys, bad values."""

from __future__ import annotations

import dataclasses
import re
import textwrap

import pytest

from nemotron.config import (
    ConfigError,
    DataPrepJobConfig,
    ModelConfig,
    PretrainConfig,
    dump_config,
    load_config,
    parse_override,
    recipe_config_dir,
    resolve_config_path,
)
from nemotron.data.config import DataPrepConfig, TokenizerConfig
from nemotron.distributed.config import ParallelismConfig
from nemotron.models.nano3.config import NANO3_PATTERN, Nano3Config


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


MINIMAL = textwrap.dedent("""
    model:
      hybrid_pattern: "M*E"
      num_layers: 3
      hidden_size: 32
    train:
      train_iters: 10
      global_batch_size: 4
      micro_batch_size: 2
    data:
      blend: /data/blend.json
""")


# ---------------------------------------------------------------- override parsing


@pytest.mark.parametrize(
    "token, key, value",
    [
        ("train.train_iters=5000", "train.train_iters", 5000),
        ("optimizer.lr=1e-3", "optimizer.lr", 1e-3),
        ("optimizer.lr=3.0e-4", "optimizer.lr", 3e-4),
        ("model.sequence_parallel=true", "model.sequence_parallel", True),
        ("model.sequence_parallel=False", "model.sequence_parallel", False),
        ("checkpoint.load=null", "checkpoint.load", None),
        ("checkpoint.save=/x/y", "checkpoint.save", "/x/y"),
        ("a.b=[1,2]", "a.b", [1, 2]),
        ("a.b=[x, 0.5]", "a.b", ["x", 0.5]),
        ("model.hybrid_pattern=M*E", "model.hybrid_pattern", "M*E"),
        ("x='a=b'", "x", "a=b"),
    ],
)
def test_parse_override_types(token, key, value):
    ov = parse_override(token)
    assert ov.key == key
    assert ov.value == value and type(ov.value) is type(value)


@pytest.mark.parametrize("token", ["train.train_iters", "=3", "a..b=1", "a.b c=1"])
def test_parse_override_rejects_malformed(token):
    with pytest.raises(ConfigError, match="override"):
        parse_override(token)


def test_overrides_apply_last_to_nested_keys(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_config(
        path,
        [
            "train.train_iters=7",
            "optimizer.lr=2e-3",
            "model.num_experts=4",
            "model.moe_top_k=2",
            "model.tensor_model_parallel_size=2",
            "model.sequence_parallel=true",
        ],
        PretrainConfig,
    )
    assert cfg.train.train_iters == 7
    assert cfg.optimizer.lr == 2e-3
    assert cfg.model.num_experts == 4
    assert cfg.model.tensor_model_parallel_size == 2 and cfg.model.sequence_parallel is True
    # untouched values come from the file, then the dataclass defaults
    assert cfg.train.global_batch_size == 4 and cfg.train.seq_length == 8192


def test_later_override_wins_and_sections_nest(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_config(path, ["train.train_iters=1", "train.train_iters=2"], PretrainConfig)
    assert cfg.train.train_iters == 2
    prep = load_config(
        write(tmp_path, "num_shards: 4\n", "prep.yaml"),
        ["tokenizer.model=/tok/tokenizer.json", "tokenizer.add_bos=true", "sample=10"],
        DataPrepJobConfig,
    )
    assert isinstance(prep.tokenizer, TokenizerConfig)
    assert prep.tokenizer.model == "/tok/tokenizer.json" and prep.tokenizer.add_bos is True
    assert prep.sample == 10 and prep.num_shards == 4


@dataclasses.dataclass
class ListSection:
    sizes: list[int] = dataclasses.field(default_factory=list)
    names: list[str] | None = None


@dataclasses.dataclass
class ListSchema:
    section: ListSection = dataclasses.field(default_factory=ListSection)


def test_list_override_into_list_field(tmp_path):
    path = write(tmp_path, "section:\n  sizes: [3]\n")
    cfg = load_config(path, ["section.sizes=[1,2]", "section.names=[a,b]"], ListSchema)
    assert cfg.section.sizes == [1, 2] and cfg.section.names == ["a", "b"]
    assert load_config(path, [], ListSchema).section.sizes == [3]
    with pytest.raises(ConfigError, match=r"section\.sizes\[1\] must be an integer"):
        load_config(path, ["section.sizes=[1,x]"], ListSchema)


def test_interpolation_is_resolved(tmp_path):
    path = write(tmp_path, MINIMAL + "checkpoint:\n  load: ${checkpoint.save}\n  save: /ckpt\n")
    cfg = load_config(path, [], PretrainConfig)
    assert cfg.checkpoint.load == "/ckpt"
    cfg = load_config(path, ["checkpoint.save=/other"], PretrainConfig)
    assert cfg.checkpoint.load == "/other"
    cfg = load_config(path, ["checkpoint.load=${data.blend}"], PretrainConfig)
    assert cfg.checkpoint.load == "/data/blend.json"
    with pytest.raises(ConfigError, match="cannot resolve interpolation"):
        load_config(path, ["checkpoint.load=${data.nothing}"], PretrainConfig)


def test_empty_section_keeps_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "logger:\n"), [], PretrainConfig)
    assert cfg.logger == PretrainConfig().logger


def test_the_largest_64_bit_integer_is_accepted(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL), ["checkpoint.save_interval=9223372036854775807"], PretrainConfig
    )
    assert cfg.checkpoint.save_interval == 2**63 - 1


def test_integer_valued_float_accepted_for_int(tmp_path):
    path = write(tmp_path, MINIMAL.replace("train_iters: 10", "train_tokens: 25e12"))
    assert load_config(path, [], PretrainConfig).train.train_tokens == 25_000_000_000_000


# ---------------------------------------------------------------- errors


def test_unknown_override_key_suggests_nearest(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.trian_iters=5"], PretrainConfig)
    message = str(err.value)
    assert "'train.trian_iters'" in message and "did you mean 'train.train_iters'" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="did you mean 'optimizer'"):
        load_config(path, ["optimiser.lr=1"], PretrainConfig)
    with pytest.raises(ConfigError, match="did you mean 'model.num_experts'"):
        load_config(path, ["model.num_expert=8"], PretrainConfig)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path, MINIMAL + "scheduler:\n  warmup_token: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [], PretrainConfig)
    message = str(err.value)
    assert str(path) in message
    assert "'scheduler.warmup_token'" in message and "'scheduler.warmup_tokens'" in message


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match="valid keys here: .*save_interval"):
        load_config(path, ["checkpoint.zzzzzz=1"], PretrainConfig)


def test_override_below_a_value_is_an_error(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match="'train.seed' is a value, not a section"):
        load_config(path, ["train.seed.x=1"], PretrainConfig)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.seq_length=abc", r"train\.seq_length must be an integer, got 'abc'"),
        ("train.seq_length=1.5", r"train\.seq_length must be an integer"),
        ("model.sequence_parallel=3", r"model\.sequence_parallel must be true or false"),
        ("optimizer.lr=fast", r"optimizer\.lr must be a number"),
        ("train.global_batch_size=null", r"train\.global_batch_size must not be null"),
        ("model.hybrid_pattern=[1,2]", r"model\.hybrid_pattern must be a string"),
        ("train=5", r"train must be a section"),
        # past 64 bits: before, a bare OverflowError (or torch's TypeError) from deep in the
        # run, after its job dir was made, naming no key
        ("model.hidden_size=1000000000000000000000000000000", r"model\.hidden_size must be a 64-bit integer"),
        ("train.train_iters=1e30", r"train\.train_iters must be a 64-bit integer"),
        (
            "train.global_batch_size=-9223372036854775809",
            r"train\.global_batch_size must be a 64-bit integer",
        ),
    ],
)
def test_wrong_types(tmp_path, override, pattern):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(path, [override], PretrainConfig)
    assert override in str(err.value)  # names the override token that caused it


# YAML 1.1 scalars that are not strings unquoted, and what the loader reads them as.
YAML_NON_STRINGS = [
    ("no", False),
    ("off", False),
    ("Yes", True),
    ("on", True),
    ("017", 15),  # octal
    ("0x1f", 31),
    ("1_000", 1000),
    ("1:30", 90),  # sexagesimal
    ("1e3", 1000.0),
    ("12e4567", float("inf")),  # an all-hex commit hash
]
# String keys of either schema: plain, nullable, a list item, in data prep.
STRING_KEYS = [
    (PretrainConfig, "logger.wandb_project"),
    (PretrainConfig, "checkpoint.save"),
    (PretrainConfig, "train.fp8.layers[0]"),
    (DataPrepJobConfig, "tokenizer.revision"),
    (DataPrepJobConfig, "text_field"),
]


def _with_key(base: str, key: str, text: str) -> str:
    """YAML `base` with dotted `key` (maybe ending in `[0]`) set to `text` as written, under
    its top-level section when `base` has it."""
    *sections, leaf = key.split(".")
    if leaf.endswith("[0]"):
        leaf, text = leaf[:-3], f"[{text}]"
    lines = [f"{'  ' * i}{section}:" for i, section in enumerate(sections)]
    block = "\n".join([*lines, f"{'  ' * len(sections)}{leaf}: {text}"]) + "\n"
    head = f"\n{sections[0]}:\n" if sections else None
    if head and head in "\n" + base:
        return ("\n" + base).replace(head, "\n" + block, 1)[1:]
    return base + block


def _override(key: str, text: str) -> str:
    return f"{key[:-3]}=[{text}]" if key.endswith("[0]") else f"{key}={text}"


@pytest.mark.parametrize("schema, key", STRING_KEYS)
@pytest.mark.parametrize("typed, read_as", YAML_NON_STRINGS)
def test_unquoted_bool_or_number_for_a_string_key_is_an_error(tmp_path, schema, key, typed, read_as):
    """Not str() of what YAML read (`017` would be the name "15", `no` "False"): one error
    naming the key and saying to quote it, from the file and from an override alike."""
    base = MINIMAL if schema is PretrainConfig else "num_shards: 1\n"
    path = write(tmp_path, _with_key(base, key, typed), "bad.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path, [], schema)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {key} must be a string, got {read_as!r}: YAML reads an unquoted")
    assert "quote the value as typed" in msg and "\n" not in msg

    ok = write(tmp_path, base, "ok.yaml")
    token = _override(key, typed)
    with pytest.raises(ConfigError) as err:
        load_config(ok, [token], schema)
    assert str(err.value).startswith(f"override {token!r}: {key} must be a string, got {read_as!r}:")


# (fp8 layer names are a closed set, checked after the type)
@pytest.mark.parametrize("schema, key", [k for k in STRING_KEYS if k[1] != "train.fp8.layers[0]"])
@pytest.mark.parametrize("typed", [t for t, _ in YAML_NON_STRINGS])
def test_quoted_value_for_a_string_key_is_the_text_typed(tmp_path, schema, key, typed):
    base = MINIMAL if schema is PretrainConfig else "num_shards: 1\n"

    def value(cfg):
        leaf = key.removesuffix("[0]")
        for part in leaf.split("."):
            cfg = getattr(cfg, part)
        return cfg[0] if key.endswith("[0]") else cfg

    path = write(tmp_path, _with_key(base, key, f'"{typed}"'), "quoted.yaml")
    cfg = load_config(path, [], schema)
    assert value(cfg) == typed
    assert (
        value(load_config(write(tmp_path, base, "ok.yaml"), [_override(key, f"'{typed}'")], schema)) == typed
    )
    dumped = write(tmp_path, dump_config(cfg), "dumped.yaml")  # the job's config.yaml
    assert value(load_config(dumped, [], schema)) == typed


@pytest.mark.parametrize("key", ["train.seed", "train.eval_iters", "optimizer.lr", "model.sequence_parallel"])
def test_quoted_number_or_bool_for_a_typed_key_is_an_error(tmp_path, key):
    """The other way round: a string is not read as a number or a bool (`seed: "5"`)."""
    path = write(tmp_path, _with_key(MINIMAL, key, '"5"'))
    with pytest.raises(ConfigError) as err:
        load_config(path, [], PretrainConfig)
    assert re.fullmatch(
        rf"{path}: {key} must be (an integer|a number|true or false), got '5'", str(err.value)
    )


def test_wrong_type_in_file(tmp_path):
    path = write(tmp_path, MINIMAL.replace("micro_batch_size: 2", "micro_batch_size: two"))
    with pytest.raises(ConfigError, match=rf"{path}: train\.micro_batch_size must be an integer"):
        load_config(path, [], PretrainConfig)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (
            ["train.global_batch_size=5"],
            r"train\.global_batch_size: 5 is not divisible by train\.micro_batch_size=2",
        ),
        (["train.train_tokens=100"], r"set exactly one of them"),
        (["train.train_iters=null"], r"set exactly one of them"),
        (["train.seq_length=-8"], r"train\.seq_length: must be positive, got -8"),
        (["train.micro_batch_size=0"], r"train\.micro_batch_size: must be positive"),
        (["model.tensor_model_parallel_size=0"], r"model\.tensor_model_parallel_size: must be >= 1"),
        (["optimizer.min_lr=1", "optimizer.lr=0.1"], r"optimizer\.min_lr: \(1\.0\) must not exceed"),
        (["optimizer.beta2=1.5"], r"optimizer\.beta2: must be in \[0, 1\)"),
        (["scheduler.stable_fraction_end=2"], r"scheduler\.stable_fraction_end"),
        (["train.precision=fp8"], r"train\.precision='fp8' is not one of"),
        (["train.compute_weights=fp16"], r"train\.compute_weights='fp16' is not one of"),
        (
            ["train.compute_weights=bf16", "train.precision=fp32"],
            r"train\.compute_weights: bf16 needs train\.precision=bf16",
        ),
        (["data.blend=null"], r"data\.blend: is null"),
        (["data.split=99,-1"], r"data\.split: split '99,-1': expected up to three numbers"),
        (["data.split=0,50,50"], r"data\.split: '0,50,50' gives the train split no share"),
        (["checkpoint.save_interval=0"], r"checkpoint\.save_interval: must be positive"),
    ],
)
def test_impossible_values(tmp_path, overrides, pattern):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(path, overrides, PretrainConfig)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "schema, token, pattern",
    [
        (
            PretrainConfig,
            'checkpoint.save=""',
            r"checkpoint\.save: is an empty path .*, or null for <job dir>/checkpoints",
        ),
        (PretrainConfig, "checkpoint.load=' '", r"checkpoint\.load: is an empty path"),
        (
            PretrainConfig,
            'data.blend=""',
            r"data\.blend: is an empty path \(the working directory\); give a path$",
        ),
        (PretrainConfig, 'data.phase2_blend=""', r"data\.phase2_blend: is an empty path"),
        (PretrainConfig, 'data.cache_dir=""', r"data\.cache_dir: is an empty path"),
        (DataPrepJobConfig, 'output_dir=""', r"output_dir: is an empty path"),
        (DataPrepJobConfig, 'blend_path=""', r"blend_path: is an empty path"),
    ],
)
def test_an_empty_path_is_an_error(tmp_path, schema, token, pattern):
    """An empty path is the working directory: `checkpoint.save=""` saved checkpoints (and
    pruned iter_* dirs) there, `output_dir=""` put a prep's shards, blend.json and
    metadata.json beside whatever the directory held, both silently."""
    path = write(tmp_path, MINIMAL if schema is PretrainConfig else "num_shards: 4\n", "r.yaml")
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(path, [token], schema)
    assert str(err.value).startswith(f"override {token!r} on {path}: ")


def test_value_errors_name_the_override_that_set_the_key(tmp_path):
    """A value check's error names the override token that set the key it is about (the file
    too: that is what it was applied on); a problem in the file alone names only the file."""
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.fp8.layers=[mamba,foo]", "train.seed=3"], PretrainConfig)
    assert str(err.value).startswith(f"override 'train.fp8.layers=[mamba,foo]' on {path}: train.fp8.layers:")
    # two overrides behind one cross-field problem: both named
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.train_tokens=100", "train.train_iters=5"], PretrainConfig)
    assert str(err.value).startswith(
        f"overrides 'train.train_tokens=100', 'train.train_iters=5' on {path}: train.train_iters / train.train_tokens:"
    )
    # the problem is in the file; the override touched something else
    bad_file = write(tmp_path, MINIMAL.replace("micro_batch_size: 2", "micro_batch_size: 3"), "bad.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(bad_file, ["train.seed=3"], PretrainConfig)
    assert str(err.value).startswith(f"{bad_file}: train.global_batch_size:")
    # a list element's key is blamed on the override that set the list
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.mixed_length_blends=[{blend: x.json, seq_length: 0}]"], PretrainConfig)
    assert str(err.value).startswith("override 'data.mixed_length_blends=")
    assert "data.mixed_length_blends[0].seq_length: must be positive" in str(err.value)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["model.num_layers=4"], r"model\.hybrid_pattern has 3 blocks but model\.num_layers=4"),
        (
            ["model.num_attention_heads=3", "model.num_key_value_heads=2"],
            r"model\.num_attention_heads \(3\) must be divisible by model\.num_key_value_heads",
        ),
        (["model.hybrid_pattern=MXE"], r"model\.hybrid_pattern has unknown symbol"),
        (["model.hidden_size=0"], r"model\.hidden_size must be a positive 64-bit integer, got 0"),
        # floats whose sign the init or forward depends on (NaN weights / norms otherwise)
        (["model.mamba_dt_min=-1e-3"], r"model\.mamba_dt_min must be a positive finite number"),
        (
            ["model.mamba_dt_min=0.5"],
            r"model\.mamba_dt_min \(0\.5\) must not exceed model\.mamba_dt_max \(0\.1\)",
        ),
        (["model.mamba_dt_init_floor=-1e-4"], r"model\.mamba_dt_init_floor must be a finite number >= 0"),
        (["model.norm_eps=-1e-5"], r"model\.norm_eps must be a positive finite number"),
        (["model.init_std=-0.02"], r"model\.init_std must be a positive finite number"),
        (["model.moe_routed_scaling_factor=0"], r"model\.moe_routed_scaling_factor must be a positive"),
        (
            ["model.moe_seq_aux_loss_coeff=-1e-4"],
            r"model\.moe_seq_aux_loss_coeff must be a finite number >= 0",
        ),
        (["train.seed=-1"], r"train\.seed: must be in \[0, 2\*\*32\), got -1"),
        (["train.seed=4294967296"], r"train\.seed: must be in \[0, 2\*\*32\)"),
    ],
)
def test_model_errors_name_model_keys(tmp_path, overrides, pattern):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=pattern):
        load_config(path, overrides, PretrainConfig)


def test_data_prep_values(tmp_path):
    path = write(tmp_path, "num_shards: 4\n", "prep.yaml")
    with pytest.raises(ConfigError, match=r"num_shards: must be >= 1, got 0"):
        load_config(path, ["num_shards=0"], DataPrepJobConfig)
    with pytest.raises(ConfigError, match=r"valid_fraction: must be in \[0, 1\)"):
        load_config(path, ["valid_fraction=1.5"], DataPrepJobConfig)
    with pytest.raises(ConfigError, match=r"did you mean 'tokenizer.add_eos'"):
        load_config(path, ["tokenizer.add_eoss=false"], DataPrepJobConfig)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("work_unit_mb=0", r"work_unit_mb: must be positive, got 0\.0"),
        ("work_unit_mb=-1", r"work_unit_mb: must be positive, got -1\.0"),
        # an infinite unit size became int(inf) in the prep's planning: a bare OverflowError
        ("work_unit_mb=.inf", r"work_unit_mb: must be a finite number, got inf"),
        ("work_unit_mb=.nan", r"work_unit_mb: must be a finite number, got nan"),
    ],
)
def test_data_prep_work_unit_size_is_checked_at_load(tmp_path, override, pattern):
    """Refused with the other values, naming the override (a dry run shows it; a real run
    stops before its job dir), not by the prep after the job dir was made."""
    path = write(tmp_path, "num_shards: 4\n", "prep.yaml")
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(path, [override], DataPrepJobConfig)
    assert str(err.value).startswith(f"override {override!r} on {path}: ")


def test_malformed_yaml_names_file(tmp_path):
    path = write(tmp_path, "train: [1,\n")
    with pytest.raises(ConfigError, match=rf"{path}: malformed YAML") as err:
        load_config(path, [], PretrainConfig)
    assert "\n" not in str(err.value)
    path = write(tmp_path, "- a\n- b\n", "list.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path, [], PretrainConfig)


def test_an_integer_past_the_parsers_limit_names_the_file_or_override(tmp_path):
    # Python refuses to parse an integer of more than 4,300 digits: a bare ValueError before.
    huge = "1" + "0" * 5000
    path = write(tmp_path, f"train:\n  train_iters: {huge}\n")
    with pytest.raises(ConfigError, match=rf"{path}: malformed YAML: Exceeds the limit"):
        load_config(path, [], PretrainConfig)
    path = write(tmp_path, "train:\n  train_iters: 5\n", "ok.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path, [f"train.train_iters={huge}"], PretrainConfig)
    assert str(err.value).startswith("override 'train.train_iters=1000") and "Exceeds the limit" in str(
        err.value
    )


def test_a_nul_character_in_a_string_setting_names_the_key(tmp_path):
    # No path can hold one: "ValueError: embedded null byte" when the path was first used.
    path = write(tmp_path, "train:\n  train_iters: 5\n")
    with pytest.raises(ConfigError, match=r"checkpoint.save must not contain a NUL character") as err:
        load_config(path, ['checkpoint.save="/tmp/x\\0y"'], PretrainConfig)
    assert str(err.value).startswith("override 'checkpoint.save=")
    prep = write(tmp_path, 'output_dir: "out\\0put"\n', "prep.yaml")
    with pytest.raises(ConfigError, match=rf"{prep}: output_dir must not contain a NUL character"):
        load_config(prep, [], DataPrepJobConfig)


def test_a_check_across_keys_blames_the_override_it_quotes(tmp_path):
    # "train.global_batch_size: 16 is not divisible by train.micro_batch_size=5" was blamed on
    # the file alone, though the override had set the key it quotes.
    path = write(tmp_path, "train:\n  train_iters: 4\n  global_batch_size: 16\n  micro_batch_size: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.micro_batch_size=5"], PretrainConfig)
    assert str(err.value).startswith(f"override 'train.micro_batch_size=5' on {path}: ")
    assert "not divisible by train.micro_batch_size=5" in str(err.value)
    bad = write(
        tmp_path, "train:\n  train_iters: 4\n  global_batch_size: 16\n  micro_batch_size: 5\n", "bad.yaml"
    )
    with pytest.raises(ConfigError) as err:
        load_config(bad, ["train.seed=3"], PretrainConfig)
    assert str(err.value).startswith(f"{bad}: ")  # the file's own values: no override blamed


def test_mapping_override_sets_the_keys_it_names(tmp_path):
    """`train={...}` merges into the file's section: replacing it would silently reset the
    file's other train keys (batch sizes here) to the defaults."""
    path = write(tmp_path, MINIMAL)
    cfg = load_config(path, ["train={train_iters: 7, fp8: {enabled: false}}"], PretrainConfig)
    assert (cfg.train.train_iters, cfg.train.global_batch_size, cfg.train.micro_batch_size) == (7, 4, 2)
    assert cfg.model.hidden_size == 32
    # judged with the file's other keys, not the defaults (the default pattern has 52 blocks)
    cfg = load_config(path, ["model={num_layers: 3, hidden_size: 16}"], PretrainConfig)
    assert (cfg.model.hybrid_pattern, cfg.model.num_layers, cfg.model.hidden_size) == ("M*E", 3, 16)
    with pytest.raises(ConfigError, match=r"unknown key 'train\.train_iterz'"):
        load_config(path, ["train={train_iterz: 7}"], PretrainConfig)
    with pytest.raises(ConfigError, match="config name is empty"):
        load_config("", [], PretrainConfig)


@pytest.mark.parametrize("token", ["model=null", "model={}", "train.fp8=null", "optimizer=", "logger={}"])
def test_null_or_empty_section_override_is_an_error(tmp_path, token):
    """`model=null` names no key: taken as written it replaced the file's section with all
    the defaults (the 52-block full-size model instead of the recipe's 3 blocks), silently."""
    path = write(tmp_path, MINIMAL)
    key = token.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^override '{re.escape(token)}': {re.escape(key)} is a section"):
        load_config(path, [token], PretrainConfig)
    prep = write(tmp_path, "num_shards: 4\n", "prep.yaml")
    with pytest.raises(ConfigError, match=r"^override 'tokenizer=null': tokenizer is a section"):
        load_config(prep, ["tokenizer=null"], DataPrepJobConfig)


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"train:\n  train_iters: \xff\xfe\n", r"not UTF-8 text at line 2 \(byte 22"),
        (b"5\n", "expected a mapping of config sections at the top level"),
        (b"", r"the file is empty"),
        (b"# a comment only\n\n", r"the file is empty"),
    ],
)
def test_unreadable_or_empty_file_names_file(tmp_path, content, pattern):
    """Each is one ConfigError naming the file: not a UnicodeDecodeError / OSError, and an empty
    file is not read as 'all defaults' (for data prep that would be a silently different run)."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    for schema in (PretrainConfig, DataPrepJobConfig):
        with pytest.raises(ConfigError, match=rf"^{path}: {pattern}"):
            load_config(path, [], schema)


def test_directory_as_config_is_named(tmp_path):
    (tmp_path / "recipe.yaml").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        resolve_config_path(str(tmp_path / "recipe.yaml"), PretrainConfig)


def test_model_and_flat_key_errors_name_the_override(tmp_path):
    """The override behind an architecture error (checked as the model section is built) and
    behind a data-prep (flat schema, undotted key) error is named, as for every value check."""
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["model.hybrid_pattern=M*"], PretrainConfig)
    assert str(err.value).startswith(f"override 'model.hybrid_pattern=M*' on {path}: model.hybrid_pattern")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["model.moe_top_k=9", "model.num_experts=8"], PretrainConfig)
    assert "1..model.num_experts (8)" in str(err.value)
    assert str(err.value).startswith("override 'model.moe_top_k=9' on ")
    prep = write(tmp_path, "num_shards: 4\n", "prep.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(prep, ["num_shards=0", "sample=5"], DataPrepJobConfig)
    assert str(err.value).startswith(f"override 'num_shards=0' on {prep}: num_shards: must be >= 1")
    # an unparsable interpolation: the parser's message, without OmegaConf's context lines
    with pytest.raises(ConfigError) as err:
        load_config(path, ["checkpoint.save=/tmp/${"], PretrainConfig)
    assert str(err.value).endswith("cannot parse value '/tmp/${': no viable alternative at input '${'")
    # an interpolation an override wrote: the override is named, with the key
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.seed=${nope}"], PretrainConfig)
    assert str(err.value).startswith(
        f"override 'train.seed=${{nope}}' on {path}: train.seed: cannot resolve interpolation"
    )


# ---------------------------------------------------------------- names, schema, dump


def test_config_name_resolution(tmp_path):
    assert (
        resolve_config_path("default", PretrainConfig) == recipe_config_dir(PretrainConfig) / "default.yaml"
    )
    assert resolve_config_path("tiny", DataPrepJobConfig).parent.name == "data_prep"
    path = write(tmp_path, MINIMAL)
    assert resolve_config_path(str(path), PretrainConfig) == path
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        resolve_config_path("tinyy", PretrainConfig)
    with pytest.raises(ConfigError, match="not found"):
        resolve_config_path(str(tmp_path / "missing.yaml"), PretrainConfig)


def test_model_section_is_flat_and_splits():
    model = ModelConfig(tensor_model_parallel_size=8, expert_model_parallel_size=8, sequence_parallel=True)
    assert isinstance(model, Nano3Config)
    arch, parallel = model.arch(), model.parallel()
    assert type(arch) is Nano3Config and arch.hybrid_pattern == NANO3_PATTERN
    assert parallel == ParallelismConfig(
        tensor_model_parallel_size=8, expert_model_parallel_size=8, sequence_parallel=True
    )
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert names == {f.name for f in dataclasses.fields(Nano3Config)} | {
        f.name for f in dataclasses.fields(ParallelismConfig)
    }
    assert DataPrepJobConfig is DataPrepConfig


def test_dump_round_trips(tmp_path):
    cfg = load_config("tiny", ["train.train_iters=3", "checkpoint.save=/c"], PretrainConfig)
    out = tmp_path / "resolved.yaml"
    text = dump_config(cfg, out)
    assert out.read_text() == text
    assert load_config(out, [], PretrainConfig) == cfg
    prep = load_config("tiny", ["sample=5"], DataPrepJobConfig)
    dump_config(prep, tmp_path / "prep.yaml")
    assert load_config(tmp_path / "prep.yaml", [], DataPrepJobConfig) == prep
