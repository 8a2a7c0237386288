"""Load a YAML recipe, apply dotted `key=value` overrides last, validate into typed configs.

OmegaConf reads the YAML, parses override values (ints, floats such as `1e-3`, bools, `null`,
lists such as `[1,2]`) and resolves `${...}` interpolations. The conversion into dataclasses is
done here, field by field, so that every error names the file and the full dotted key, and an
unknown key suggests the nearest valid one (the public recipe silently ignores such typos).
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import re
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemotron.config.errors import ConfigError
from nemotron.config.schema import RECIPE_SUBDIRS, VALIDATORS, PretrainConfig, model_error
from nemotron.models.nano3.config import ModelConfigError
from nemotron.utils.fs import atomic_write_text, read_text

T = TypeVar("T")

RECIPE_PACKAGE = "nemotron.recipes.nano3.stage0_pretrain"


@dataclass(frozen=True)
class Override:
    """One parsed `key=value` token: the dotted key, the typed value, the original token."""

    key: str
    value: Any
    token: str


def recipe_config_dir(schema: type | None = None) -> Path:
    """The package directory holding the shipped recipes for `schema` (e.g. `config/data_prep`)."""
    base = Path(str(resources.files(RECIPE_PACKAGE).joinpath("config")))
    sub = RECIPE_SUBDIRS.get(schema, "") if schema is not None else ""
    return base / sub if sub else base


def available_configs(schema: type) -> list[str]:
    directory = recipe_config_dir(schema)
    return sorted(p.stem for p in directory.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path, schema: type) -> Path:
    """`-c NAME`: a shipped recipe name (`default`, `tiny`, ...) if one exists, else a path."""
    text = str(name_or_path)
    if not text.strip():
        raise ConfigError(
            f"config name is empty: give a recipe name ({', '.join(available_configs(schema))}) "
            "or a YAML file"
        )
    if "/" not in text and not text.endswith((".yaml", ".yml")):
        candidate = recipe_config_dir(schema) / f"{text}.yaml"
        if candidate.is_file():
            return candidate
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config {text!r} is a directory; give a recipe name or a YAML file")
    known = available_configs(schema)
    hint = difflib.get_close_matches(text, known, n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    raise ConfigError(
        f"config {text!r} not found: neither a recipe name ({', '.join(known)}) nor an existing "
        f"file{suggestion}"
    )


def parse_override(token: str) -> Override:
    """Parse `a.b.c=value`; the value is YAML (OmegaConf's loader: `1e-3` is a float)."""
    key, sep, raw = token.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {token!r}: expected dotted key=value, e.g. train.train_iters=100")
    parts = key.split(".")
    if any(not p.isidentifier() for p in parts):
        raise ConfigError(f"override {token!r}: {key!r} is not a dotted key")
    try:
        parsed = OmegaConf.from_dotlist([f"value={raw}"])
        container = OmegaConf.to_container(parsed, resolve=False)
        assert isinstance(container, dict)
        value = container["value"]
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:
        # ValueError: an integer past Python's parsing limit (4,300 digits).
        # Without the `full_key: value` / `object_type=dict` context lines OmegaConf appends
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = " ".join([ln for ln in lines if not ln.startswith(("full_key:", "object_type="))][:3])
        raise ConfigError(f"override {token!r}: cannot parse value {raw!r}: {detail}") from None
    return Override(key=key, value=value, token=token)


def parse_overrides(tokens: list[str] | tuple[str, ...] | None) -> list[Override]:
    return [parse_override(t) for t in tokens or ()]


def _load_yaml(path: Path) -> dict:
    # Read here (not by OmegaConf.load) so that an undecodable or unreadable file is an error
    # naming the file rather than a bare UnicodeDecodeError / OSError.
    text = read_text(path, ConfigError, "YAML file")
    try:
        loaded = OmegaConf.load(io.StringIO(text))
    except (yaml.YAMLError, OmegaConfBaseException, ValueError) as exc:  # ValueError: a 4,300+ digit integer
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3]).replace('"<file>"', "the file")
        raise ConfigError(f"{path}: malformed YAML: {detail}") from None
    except OSError:
        # OmegaConf.load's answer to a top-level scalar (`5`, `text`): nothing else can fail
        # in reading from memory
        loaded = None
    if not _has_yaml_content(text):
        # an empty (or comments-only) file is almost surely a truncated or wrong one: all
        # defaults would be a silently different config
        raise ConfigError(f"{path}: the file is empty (no config sections)")
    if loaded is None or not OmegaConf.is_dict(loaded):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    return OmegaConf.to_container(loaded, resolve=False)  # type: ignore[return-value]


def _has_yaml_content(text: str) -> bool:
    """Whether `text` holds anything besides comments and blank lines (`{}` does)."""
    return any(line.split("#", 1)[0].strip() for line in text.splitlines())


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(where: str, dotted: str, name: str, valid: list[str]) -> ConfigError:
    hint = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    prefix = dotted.rpartition(".")[0]
    if hint:
        nearest = f"{prefix}.{hint[0]}" if prefix else hint[0]
        suggestion = f"; did you mean {nearest!r}?"
    else:
        suggestion = f"; valid keys here: {', '.join(valid)}"
    return ConfigError(f"{where}: unknown key {dotted!r}{suggestion}")


def _resolve_key(schema: type, key: str, where: str) -> Any:
    """Check that a dotted key names a field of `schema` (sections and leaves); return its type."""
    cls: Any = schema
    walked: list[str] = []
    for part in key.split("."):
        walked.append(part)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ConfigError(f"{where}: {'.'.join(walked[:-1])!r} is a value, not a section")
        fields = _fields(cls)
        if part not in fields:
            raise _unknown_key(where, ".".join(walked), part, list(fields))
        cls = fields[part]
    return cls


def _set(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """Coerce one YAML value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: {key} must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if tp is Any:
        return value
    if value is None and isinstance(tp, type) and dataclasses.is_dataclass(tp):
        value = {}  # an empty section (`logger:` with nothing below) keeps the defaults
    if value is None:
        raise ConfigError(f"{where}: {key} must not be null (expected {_type_name(tp)})")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a section (mapping), got {value!r}")
        return _build(tp, value, key, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        args = typing.get_args(tp)
        item = args[1] if len(args) == 2 else Any
        return {k: _convert(v, item, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # e.g. train_tokens: 25e12
        if isinstance(value, int) and not isinstance(value, bool):
            # Every integer setting ends up in a tensor shape, a numpy array or a C long: one
            # past 64 bits would fail there as a bare OverflowError, naming no key.
            if not -(2**63) <= value < 2**63:
                raise ConfigError(f"{where}: {key} must be a 64-bit integer, got {value!r}")
            return value
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            if "\0" in value:  # no path or name can hold one: a bare "embedded null byte" later
                raise ConfigError(f"{where}: {key} must not contain a NUL character, got {value!r}")
            return value
        if isinstance(value, (bool, int, float)):
            # YAML 1.1 (OmegaConf, PyYAML) reads an unquoted no/off/yes/on as a bool and 017,
            # 0x1f, 1_000, 1:30 or 1e3 as a number, whose text is no longer the one typed (`017`
            # is 15, `1e3` 1000.0): taking str() of it would silently be another name or path,
            # so the value must be quoted, as a number must be unquoted for a number key
            if isinstance(value, bool):
                read, example = "no, off, yes or on as a boolean", '"no"'
            else:
                read, example = "017, 0x1f, 1_000, 1:30 or 1e3 as a number", '"017"'
            raise ConfigError(
                f"{where}: {key} must be a string, got {value!r}: YAML reads an unquoted {read}; "
                f"quote the value as typed ({example}; in an override key='{example}')"
            )
        raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type[T], tree: dict, prefix: str, where: str) -> T:
    fields = _fields(cls)
    kwargs = {}
    for name, value in tree.items():
        dotted = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key(where, dotted, str(name), list(fields))
        kwargs[name] = _convert(value, fields[name], dotted, where)
    try:
        return cls(**kwargs)
    except ModelConfigError as exc:
        raise _ValueCheckError(str(model_error(exc)), where) from None


class _ValueCheckError(ConfigError):
    """A value check failed while a section was built (`Nano3Config` checks itself): `to_typed`
    names the overrides behind it, as for the validators' errors."""

    def __init__(self, bare: str, where: str) -> None:
        super().__init__(f"{where}: {bare}")
        self.bare = bare


def to_typed(
    tree: dict, schema: type[T], where: str = "<config>", overrides: list[Override] | None = None
) -> T:
    """Validate a plain nested dict (already resolved) into `schema`; raises ConfigError. A
    value check's error names the `overrides` that set a key it is about (else just `where`)."""
    try:
        cfg = _build(schema, tree, "", where)
    except _ValueCheckError as exc:
        raise ConfigError(f"{_blame(exc.bare, where, overrides or [])}: {exc.bare}") from None
    validator = VALIDATORS.get(schema)
    if validator is not None:
        try:
            validator(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{_blame(str(exc), where, overrides or [])}: {exc}") from None
    return cfg


# a key as value checks name them: dotted (`train.fp8.layers`, `data.mixed_length_blends[0].blend`)
# or, in a flat schema (data prep), bare (`num_shards`)
_KEY = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\[\d+\])?(?:\.[A-Za-z_]\w*(?:\[\d+\])?)*")
_KEY_WITH_VALUE = re.compile(r"(?<![\w.])([A-Za-z_]\w*(?:\[\d+\])?(?:\.[A-Za-z_]\w*(?:\[\d+\])?)*)=")


def _blame(message: str, where: str, overrides: list[Override]) -> str:
    """Where a value check's `message` comes from: the overrides that set one of the keys its
    head (up to the first ': ') names, or one it quotes with its value (`key=value`, as a check
    across keys names the other: "train.global_batch_size: 16 is not divisible by
    train.micro_batch_size=5"), or a section above one (on `where`), else `where`."""
    head, _, rest = message.partition(": ")
    named = _KEY.findall(head) + _KEY_WITH_VALUE.findall(rest)
    tokens = [
        ov.token
        for ov in overrides
        if any(k == ov.key or k.startswith((ov.key + ".", ov.key + "[")) for k in named)
    ]
    if not tokens:
        return where
    return f"{'override' if len(tokens) == 1 else 'overrides'} {', '.join(map(repr, tokens))} on {where}"


def load_tree(path: str | Path, overrides: list[str] | list[Override] | None, schema: type) -> dict:
    """The merged, interpolation-resolved plain dict of a recipe plus overrides (not validated)."""
    path = Path(path)
    where = str(path)
    tree = _load_yaml(path)
    # Catch unknown keys in the file before overrides can mask them.
    _check_tree_keys(tree, schema, "", where)
    parsed = [ov if isinstance(ov, Override) else parse_override(ov) for ov in overrides or []]
    for ov in parsed:
        where_ov = f"override {ov.token!r}"
        if _is_section(_resolve_key(schema, ov.key, where_ov)) and (ov.value is None or ov.value == {}):
            # it names no key to set: taken as written, the file's whole section would silently
            # become the defaults (`model=null`: the full-size model instead of the recipe's)
            raise ConfigError(
                f"{where_ov}: {ov.key} is a section; a null or empty value sets none of its keys "
                f"and would reset them all to their defaults: set keys ({ov.key}.KEY=VALUE)"
            )
        # `train={train_iters: 5}` sets the keys it names, like `train.train_iters=5`:
        # replacing the section would silently reset the file's other keys to defaults (and
        # checking it whole would judge it against those defaults)
        for key, value in _leaves(schema, ov.key, ov.value, where_ov):
            leaf_type = _resolve_key(schema, key, where_ov)
            if not _is_interpolation(value):
                _convert(value, leaf_type, key, where_ov)  # a precise error for a bad value
            _set(tree, key, value)
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(tree), resolve=True)
    except OmegaConfBaseException as exc:
        message = str(exc).strip().splitlines()[0]
        holder = getattr(exc, "full_key", None)
        if holder:  # the key holding the interpolation (it may come from an override)
            message = f"{holder}: cannot resolve interpolation: {message}"
            raise ConfigError(f"{_blame(message, where, parsed)}: {message}") from None
        raise ConfigError(f"{where}: cannot resolve interpolation: {message}") from None
    return resolved  # type: ignore[return-value]


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _leaves(schema: type, key: str, value: Any, where: str) -> list[tuple[str, Any]]:
    """The (dotted key, value) pairs an override sets: itself, or for a mapping given to a
    section, each key it names (nested sections too)."""
    if not (isinstance(value, dict) and value and _is_section(_resolve_key(schema, key, where))):
        return [(key, value)]
    out: list[tuple[str, Any]] = []
    for name, item in value.items():
        out += _leaves(schema, f"{key}.{name}", item, where)
    return out


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _check_tree_keys(tree: dict, cls: type, prefix: str, where: str) -> None:
    fields = _fields(cls)
    for name, value in tree.items():
        dotted = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise _unknown_key(where, dotted, str(name), list(fields))
        tp = fields[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
            _check_tree_keys(value, tp, dotted, where)


def load_config(
    path_or_name: str | Path,
    overrides: list[str] | list[Override] | None = None,
    schema: type[T] = None,  # type: ignore[assignment]
) -> T:
    """Load recipe `path_or_name` (a shipped name or a YAML path), apply overrides, validate.

    Raises ConfigError (one line naming the file and the dotted key) on any problem.
    """
    if schema is None:
        schema = PretrainConfig  # type: ignore[assignment]
    path = resolve_config_path(path_or_name, schema)
    parsed = [ov if isinstance(ov, Override) else parse_override(ov) for ov in overrides or []]
    tree = load_tree(path, parsed, schema)
    return to_typed(tree, schema, str(path), parsed)


def config_to_dict(cfg: Any) -> dict:
    """A plain nested dict of a typed config (the `model` section stays flat)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | Path | None = None) -> str:
    """The resolved config as YAML (loadable again by `load_config`); written atomically if `path`."""
    text = OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg)), sort_keys=False)
    if path is not None:
        atomic_write_text(path, text)
    return text
