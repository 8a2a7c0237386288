"""`env.toml`: execution profiles for `--run PROFILE` / `--batch PROFILE`.

The file is found by walking up from the working directory, stopping at the project root (the
first directory holding `pyproject.toml` or `.git`). `[wandb]` holds `project` / `entity`, which
are exported to every job as `WANDB_PROJECT` / `WANDB_ENTITY`; every other table is a profile.
A profile may `extends = "other"`: it starts from the other profile's keys (recursively) and
overrides them; `env_vars` tables are merged, every other key is replaced whole.

Every problem raises `EnvTomlError` naming the file, the profile and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemotron.config.errors import ConfigError
from nemotron.utils.fs import read_text

ENV_TOML_NAME = "env.toml"
WANDB_SECTION = "wandb"
EXECUTORS = ("local", "slurm")
TUNNELS = ("local", "ssh")

# Slurm's --time forms (sbatch(1)): minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds. ASCII digits only (`\d` would take any script's).
_SLURM_TIME = re.compile(r"(?:([0-9]+)-)?([0-9]+)(?::([0-9]+))?(?::([0-9]+))?")
# Slurm's --mem: a positive integer with an optional K/M/G/T unit.
_SLURM_MEM = re.compile(r"[0-9]+[KMGT]?")
# A name the shell can export (`export NAME=...` in a Slurm job script; torchrun's environment).
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EnvTomlError(ConfigError):
    """A missing, unreadable or invalid env.toml, or an unknown profile."""


@dataclass(frozen=True)
class WandbSettings:
    project: str | None = None
    entity: str | None = None

    def env_vars(self) -> dict[str, str]:
        """The variables a job needs so that W&B logs to this project/entity."""
        out = {}
        if self.project:
            out["WANDB_PROJECT"] = self.project
        if self.entity:
            out["WANDB_ENTITY"] = self.entity
        return out


@dataclass(frozen=True)
class Profile:
    """One resolved execution profile (after `extends`)."""

    name: str
    executor: str = "local"
    # local: processes torchrun starts on this machine; slurm: torchrun processes per node
    # (defaults to gpus_per_node, else ntasks_per_node).
    nproc_per_node: int | None = None
    # Slurm allocation.
    account: str | None = None
    partition: str | None = None
    nodes: int = 1
    ntasks_per_node: int = 1
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str = "01:00:00"
    mem: str | None = None
    exclusive: bool = False
    # Container (Pyxis/enroot) image and "host:container[:flags]" mounts.
    container_image: str | None = None
    mounts: tuple[str, ...] = ()
    # How the submitting machine reaches the cluster.
    tunnel: str = "local"
    host: str | None = None
    port: int | None = None
    user: str | None = None
    identity: str | None = None
    remote_job_dir: str | None = None
    # Startup: shell lines run in the job script before the job starts, and exported variables.
    setup: tuple[str, ...] = ()
    env_vars: dict[str, str] = field(default_factory=dict)
    # Interpreter that runs `-m nemotron.cli.main` in the job (default: this interpreter when the
    # job runs on this machine's filesystem without a container, else `python`).
    python: str | None = None
    # Working directory of the job (default: the submitting directory when the job shares this
    # machine's filesystem, else NeMo-Run's job code directory).
    workdir: str | None = None

    @property
    def is_slurm(self) -> bool:
        return self.executor == "slurm"


# Keys that only make sense on Slurm; a local profile that sets one is almost certainly a mistake.
SLURM_ONLY_KEYS = (
    "account",
    "partition",
    "nodes",
    "ntasks_per_node",
    "gpus_per_node",
    "cpus_per_task",
    "time",
    "mem",
    "exclusive",
    "container_image",
    "mounts",
    "tunnel",
    "host",
    "port",
    "user",
    "identity",
    "remote_job_dir",
    "setup",
    "workdir",
)
SSH_KEYS = ("host", "port", "user", "identity", "remote_job_dir")
PROFILE_KEYS = tuple(f.name for f in dataclasses.fields(Profile) if f.name != "name") + ("extends",)
WANDB_KEYS = ("project", "entity")


@dataclass(frozen=True)
class EnvToml:
    """A parsed env.toml: W&B settings and the raw profile tables (resolved on demand)."""

    path: Path
    wandb: WandbSettings
    raw_profiles: dict[str, dict[str, Any]]

    @property
    def profile_names(self) -> list[str]:
        return sorted(self.raw_profiles)

    def profile(self, name: str) -> Profile:
        """Resolve `name` (following `extends`) into a validated `Profile`."""
        if name not in self.raw_profiles:
            raise EnvTomlError(
                f"{self.path}: no profile '{name}'{_suggest(name, self.raw_profiles)}; "
                f"profiles defined: {_listing(self.profile_names)}"
            )
        merged = self._merged(name, chain=())
        return _build_profile(self.path, name, merged)

    def _merged(self, name: str, chain: tuple[str, ...]) -> dict[str, Any]:
        # The chain is walked in a loop, not by recursion: a chain of thousands of profiles
        # is odd but valid TOML, and recursion ended it in a RecursionError naming nothing.
        chain = (*chain, name)
        while True:
            table = self.raw_profiles[chain[-1]]
            parent = table.get("extends")
            if parent is None:
                break
            if not isinstance(parent, str):
                raise EnvTomlError(
                    f"{self.path}: profile '{chain[-1]}': key 'extends' must be a profile name (string), "
                    f"got {parent!r}"
                )
            if parent not in self.raw_profiles:
                raise EnvTomlError(
                    f"{self.path}: profile '{chain[-1]}': key 'extends' names unknown profile '{parent}'"
                    f"{_suggest(parent, self.raw_profiles)}; profiles defined: "
                    f"{_listing(self.profile_names)}"
                )
            if parent in chain:
                cycle = " -> ".join((*chain, parent))
                raise EnvTomlError(f"{self.path}: profile '{chain[0]}': 'extends' cycle {cycle}")
            chain = (*chain, parent)
        out: dict[str, Any] = {}
        for profile in reversed(chain):  # the root first; each child's keys over its parent's
            for key, value in self.raw_profiles[profile].items():
                if key == "extends":
                    continue
                if key == "env_vars" and isinstance(value, dict) and isinstance(out.get(key), dict):
                    out[key] = {**out[key], **value}
                else:
                    out[key] = value
        return out


def find_env_toml(start: Path | str | None = None) -> Path:
    """The nearest env.toml from `start` (default: cwd) upward, up to the project root."""
    here = Path(start if start is not None else Path.cwd()).resolve()
    searched = []
    for directory in (here, *here.parents):
        searched.append(directory)
        candidate = directory / ENV_TOML_NAME
        if candidate.is_file():
            return candidate
        if (directory / "pyproject.toml").exists() or (directory / ".git").exists():
            break
    raise EnvTomlError(
        f"no {ENV_TOML_NAME} found in {here} or its parents up to the project root "
        f"(searched: {', '.join(str(d) for d in searched)}); create one with your profiles "
        f"(see docs/execution.md)"
    )


def load_env_toml(path: Path | str) -> EnvToml:
    """Parse and check the structure of one env.toml (each profile is validated when resolved,
    and `validate_all` resolves every one)."""
    path = Path(path)
    text = read_text(path, EnvTomlError, "TOML file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EnvTomlError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise EnvTomlError(f"{path}: invalid TOML: nested too deeply") from None

    wandb = WandbSettings()
    profiles: dict[str, dict[str, Any]] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise EnvTomlError(
                f"{path}: top-level key '{section}' is not a table; write profiles as [{section}] sections"
            )
        if section == WANDB_SECTION:
            wandb = _build_wandb(path, table)
        else:
            profiles[section] = table
    return EnvToml(path=path, wandb=wandb, raw_profiles=profiles)


def load_profile(name: str, start: Path | str | None = None) -> tuple[Profile, EnvToml]:
    """Find env.toml from `start` upward and resolve profile `name`."""
    env = load_env_toml(find_env_toml(start))
    return env.profile(name), env


def validate_all(env: EnvToml) -> dict[str, Profile]:
    """Resolve every profile (so that an error anywhere in the file is reported)."""
    return {name: env.profile(name) for name in env.profile_names}


def _build_wandb(path: Path, table: dict[str, Any]) -> WandbSettings:
    for key, value in table.items():
        if key not in WANDB_KEYS:
            raise EnvTomlError(
                f"{path}: [wandb]: unknown key '{key}'{_suggest(key, WANDB_KEYS)}; "
                f"allowed: {_listing(WANDB_KEYS)}"
            )
        if not _is_str(value):
            raise EnvTomlError(f"{path}: [wandb]: key '{key}' must be {_CHECKS['str'][1]}, got {value!r}")
    return WandbSettings(project=table.get("project"), entity=table.get("entity"))


def _build_profile(path: Path, name: str, table: dict[str, Any]) -> Profile:
    where = f"{path}: profile '{name}'"
    for key in table:
        if key not in PROFILE_KEYS:
            raise EnvTomlError(
                f"{where}: unknown key '{key}'{_suggest(key, PROFILE_KEYS)}; "
                f"allowed: {_listing(PROFILE_KEYS)}"
            )

    def get(key: str, kind: str) -> Any:
        if key not in table:
            return None
        value = table[key]
        checker, expected = _CHECKS[kind]
        if not checker(value):
            raise EnvTomlError(f"{where}: key '{key}' must be {expected}, got {value!r}")
        return value

    values: dict[str, Any] = {}
    for key, kind in _KEY_KINDS.items():
        value = get(key, kind)
        if value is not None:
            if kind == "str_list":
                value = tuple(value)
            elif kind == "str_map":
                value = {k: _toml_scalar_str(x) for k, x in value.items()}
            values[key] = value

    executor = values.get("executor", "local")
    if executor not in EXECUTORS:
        raise EnvTomlError(f"{where}: key 'executor' must be one of {_listing(EXECUTORS)}, got {executor!r}")
    if executor == "local":
        stray = [k for k in SLURM_ONLY_KEYS if k in table]
        if stray:
            raise EnvTomlError(
                f"{where}: key '{stray[0]}' only applies to executor = \"slurm\" "
                f'(this profile has executor = "local")'
            )
    tunnel = values.get("tunnel", "local")
    if tunnel not in TUNNELS:
        raise EnvTomlError(f"{where}: key 'tunnel' must be one of {_listing(TUNNELS)}, got {tunnel!r}")
    if tunnel == "ssh":
        for key in ("host", "remote_job_dir"):
            if key not in values:
                raise EnvTomlError(f"{where}: key '{key}' is required when tunnel = \"ssh\"")
        if not values["remote_job_dir"].startswith("/"):
            # NeMo-Run writes it into the job script (log paths, the container mount of the job's
            # directory, its code dir) unexpanded: a relative path (or `~`) would resolve against
            # whatever directory each of sbatch, srun and the SSH session starts in, and Pyxis
            # refuses a relative mount
            raise EnvTomlError(
                f"{where}: key 'remote_job_dir' must be an absolute path on the cluster "
                f'(starting with "/", `~` is not expanded), got {values["remote_job_dir"]!r}'
            )
    else:
        stray = [k for k in SSH_KEYS if k in table]
        if stray:
            raise EnvTomlError(
                f"{where}: key '{stray[0]}' only applies to tunnel = \"ssh\" "
                f'(this profile\'s tunnel is "local")'
            )
    for var in values.get("env_vars", {}):
        if not _ENV_NAME.fullmatch(var):
            raise EnvTomlError(
                f"{where}: key 'env_vars': {var!r} is not an environment variable name "
                "(letters, digits and _, not starting with a digit)"
            )
        if executor == "slurm" and var != var.upper():
            # NeMo-Run writes a Slurm job's variables as `export {name.upper()}=...`: the job
            # would see another variable than the one named here
            raise EnvTomlError(
                f"{where}: key 'env_vars': {var!r} is not upper-case, and a Slurm job's variables "
                f"are exported upper-cased (as {var.upper()!r}); export it in 'setup' instead, "
                f'e.g. setup = ["export {var}=..."]'
            )
    nproc, gpus = values.get("nproc_per_node"), values.get("gpus_per_node")
    if nproc is not None and gpus is not None and nproc > gpus:
        raise EnvTomlError(
            f"{where}: key 'nproc_per_node' ({nproc}) exceeds 'gpus_per_node' ({gpus}): processes "
            "would share a GPU, which NCCL refuses; leave nproc_per_node out (one per GPU)"
        )
    if values.get("port", 1) > 65535:
        raise EnvTomlError(f"{where}: key 'port' must be a TCP port (1..65535), got {values['port']}")
    if "time" in values:
        problem = _slurm_time_problem(values["time"])
        if problem is not None:
            raise EnvTomlError(
                f'{where}: key \'time\' must be a Slurm time ("minutes", "minutes:seconds", '
                '"hours:minutes:seconds", "days-hours", "days-hours:minutes" or '
                f'"days-hours:minutes:seconds", e.g. "04:00:00" or "1-00:00:00"), '
                f"got {values['time']!r}{problem}"
            )
    if "mem" in values and not _SLURM_MEM.fullmatch(values["mem"]):
        raise EnvTomlError(
            f'{where}: key \'mem\' must be a Slurm memory size such as "0", "64G" or '
            f'"512000M", got {values["mem"]!r}'
        )
    for i, mount in enumerate(values.get("mounts", ())):
        parts = mount.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise EnvTomlError(
                f"{where}: key 'mounts'[{i}] must be \"host_path:container_path[:flags]\", got {mount!r}"
            )
    if "mounts" in values and "container_image" not in values:
        raise EnvTomlError(f"{where}: key 'mounts' needs 'container_image' (mounts are into it)")
    return Profile(name=name, **values)


def _slurm_time_problem(text: str) -> str | None:
    """None if `text` is a Slurm time limit, else what is wrong ("" for not one of the forms).
    sbatch itself reads "04:75:00" as 5h15m and "1-25" as 2 days 1 hour (it only adds the
    fields up), but such a value is almost surely a typo for another limit, so every field
    after the first must be within its clock range."""
    match = _SLURM_TIME.fullmatch(text)
    if match is None:
        return ""
    days, *fields = match.groups()
    clock = [int(f) for f in fields if f is not None]
    if days is not None:  # days-hours[:minutes[:seconds]]: every clock field is bounded
        checked = list(zip(("hours", "minutes", "seconds"), clock))
    else:  # minutes[:seconds] or hours:minutes:seconds: the first field is unbounded
        names = ("hours", "minutes", "seconds") if len(clock) == 3 else ("minutes", "seconds")
        checked = list(zip(names, clock))[1:]
    for name, value in checked:
        limit = 24 if name == "hours" else 60
        if value >= limit:
            return f" ({name} {value} is not below {limit})"
    return None


def _toml_scalar_str(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_str(v: Any) -> bool:
    # One line: each string lands on one line of a job script (an `#SBATCH` directive, a
    # mount, a setup line), where a newline would end the directive and start another line
    # of the script (a stray command, an injected directive) and a NUL or other control
    # character has no meaning.
    return isinstance(v, str) and v != "" and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in v)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_str(x) for x in v)


def _is_str_map(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(x, (str, int, float, bool)) for k, x in v.items()
    )


_CHECKS = {
    "pos_int": (_is_pos_int, "a positive integer"),
    "str": (_is_str, "a non-empty string on one line (no newline or control character)"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str_list": (
        _is_str_list,
        "a list of non-empty strings, each on one line (no newline or control character)",
    ),
    "str_map": (_is_str_map, "a table of NAME = value"),
}
_KEY_KINDS = {
    "executor": "str",
    "nproc_per_node": "pos_int",
    "account": "str",
    "partition": "str",
    "nodes": "pos_int",
    "ntasks_per_node": "pos_int",
    "gpus_per_node": "pos_int",
    "cpus_per_task": "pos_int",
    "time": "str",
    "mem": "str",
    "exclusive": "bool",
    "container_image": "str",
    "mounts": "str_list",
    "tunnel": "str",
    "host": "str",
    "port": "pos_int",
    "user": "str",
    "identity": "str",
    "remote_job_dir": "str",
    "setup": "str_list",
    "env_vars": "str_map",
    "python": "str",
    "workdir": "str",
}
assert set(_KEY_KINDS) == set(PROFILE_KEYS) - {"extends"}, "every profile key has a kind"


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _listing(names) -> str:
    names = list(names)
    return ", ".join(names) if names else "(none)"
