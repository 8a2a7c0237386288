"""YAML recipes, `key=value` overrides and validation into the typed section configs."""

from nemotron.config.errors import ConfigError
from nemotron.config.loader import (
    Override,
    available_configs,
    config_to_dict,
    dump_config,
    load_config,
    load_tree,
    parse_override,
    parse_overrides,
    recipe_config_dir,
    resolve_config_path,
    to_typed,
)
from nemotron.config.schema import (
    DataPrepJobConfig,
    ModelConfig,
    PretrainConfig,
    validate_data_prep,
    validate_pretrain,
)

__all__ = [
    "ConfigError",
    "DataPrepJobConfig",
    "ModelConfig",
    "Override",
    "PretrainConfig",
    "available_configs",
    "config_to_dict",
    "dump_config",
    "load_config",
    "load_tree",
    "parse_override",
    "parse_overrides",
    "recipe_config_dir",
    "resolve_config_path",
    "to_typed",
    "validate_data_prep",
    "validate_pretrain",
]
