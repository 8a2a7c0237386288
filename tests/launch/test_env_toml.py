"""env.toml discovery, parsing, `extends` and validation."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from nemotron.config.env_toml import (
    EnvTomlError,
    Profile,
    find_env_toml,
    load_env_toml,
    load_profile,
    validate_all,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


FULL = """
[wandb]
project = "nemotron"
entity = "my-team"

[cluster]
executor = "slurm"
account = "acct"
partition = "batch"
nodes = 2
ntasks_per_node = 8
gpus_per_node = 8
cpus_per_task = 16
time = "04:00:00"
mem = "0"
exclusive = true
container_image = "nvcr.io/nvidia/pytorch:25.01-py3"
mounts = ["/lustre:/lustre", "/home/me/.cache:/root/.cache:ro"]
setup = ["module load cuda", "source /opt/env.sh"]
env_vars = { HF_HOME = "/lustre/hf", NCCL_DEBUG = "WARN" }

[remote]
extends = "cluster"
tunnel = "ssh"
host = "login.example.com"
port = 2222
user = "me"
identity = "~/.ssh/id_ed25519"
remote_job_dir = "/lustre/me/jobs"

[laptop]
executor = "local"
nproc_per_node = 2
"""


def test_full_profile_is_typed(tmp_path):
    env = load_env_toml(write(tmp_path / "env.toml", FULL))
    p = env.profile("cluster")
    assert p == Profile(
        name="cluster",
        executor="slurm",
        account="acct",
        partition="batch",
        nodes=2,
        ntasks_per_node=8,
        gpus_per_node=8,
        cpus_per_task=16,
        time="04:00:00",
        mem="0",
        exclusive=True,
        container_image="nvcr.io/nvidia/pytorch:25.01-py3",
        mounts=("/lustre:/lustre", "/home/me/.cache:/root/.cache:ro"),
        setup=("module load cuda", "source /opt/env.sh"),
        env_vars={"HF_HOME": "/lustre/hf", "NCCL_DEBUG": "WARN"},
    )
    assert env.wandb.env_vars() == {"WANDB_PROJECT": "nemotron", "WANDB_ENTITY": "my-team"}
    assert env.profile_names == ["cluster", "laptop", "remote"]
    laptop = env.profile("laptop")
    assert (laptop.executor, laptop.nproc_per_node, laptop.is_slurm) == ("local", 2, False)
    assert set(validate_all(env)) == {"cluster", "laptop", "remote"}


def test_extends_inherits_and_overrides(tmp_path):
    env = load_env_toml(write(tmp_path / "env.toml", FULL))
    remote = env.profile("remote")
    assert remote.tunnel == "ssh" and remote.host == "login.example.com" and remote.port == 2222
    assert remote.remote_job_dir == "/lustre/me/jobs" and remote.identity == "~/.ssh/id_ed25519"
    assert remote.nodes == 2 and remote.gpus_per_node == 8 and remote.account == "acct"


def test_extends_chain_merges_env_vars_and_replaces_lists(tmp_path):
    path = write(
        tmp_path / "env.toml",
        """
        [base]
        executor = "slurm"
        account = "a"
        time = "01:00:00"
        mounts = ["/a:/a"]
        container_image = "img"
        env_vars = { A = "1", B = "2" }

        [mid]
        extends = "base"
        partition = "p"
        env_vars = { B = "20", C = 3 }

        [top]
        extends = "mid"
        time = "02:00:00"
        mounts = ["/b:/b"]
        """,
    )
    top = load_env_toml(path).profile("top")
    assert (top.account, top.partition, top.time) == ("a", "p", "02:00:00")
    assert top.mounts == ("/b:/b",)
    assert top.env_vars == {"A": "1", "B": "20", "C": "3"}


def test_extends_cycle_is_reported_with_the_chain(tmp_path):
    path = write(
        tmp_path / "env.toml",
        """
        [a]
        extends = "b"
        [b]
        extends = "c"
        [c]
        extends = "a"
        """,
    )
    with pytest.raises(EnvTomlError, match=r"'extends' cycle a -> b -> c -> a"):
        load_env_toml(path).profile("a")


def test_a_long_extends_chain_resolves_and_deep_nesting_is_named(tmp_path):
    # Both ended in a RecursionError naming nothing: the chain was resolved by recursion.
    links = [f'[p{i}]\nextends = "p{i + 1}"\nenv_vars = {{ K{i} = "{i}" }}\n' for i in range(3000)]
    path = tmp_path / "env.toml"
    path.write_text("".join(links) + '[p3000]\nexecutor = "local"\nenv_vars = { K0 = "root" }\n')
    profile = load_env_toml(path).profile("p0")
    assert profile.executor == "local" and profile.env_vars["K0"] == "0" and len(profile.env_vars) == 3000
    path.write_text("[p]\nx = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(EnvTomlError, match=r"env.toml: invalid TOML: nested too deeply"):
        load_env_toml(path)


def test_extends_unknown_profile(tmp_path):
    path = write(tmp_path / "env.toml", '[a]\nextends = "clustr"\n[cluster]\nexecutor = "slurm"\n')
    with pytest.raises(EnvTomlError) as e:
        load_env_toml(path).profile("a")
    msg = str(e.value)
    assert "profile 'a'" in msg and "'clustr'" in msg and "did you mean 'cluster'" in msg


def test_unknown_key_names_file_profile_key_and_suggestion(tmp_path):
    path = write(tmp_path / "env.toml", '[c]\nexecutor = "slurm"\nnodse = 2\n')
    with pytest.raises(EnvTomlError) as e:
        load_env_toml(path).profile("c")
    msg = str(e.value)
    assert str(path) in msg and "profile 'c'" in msg and "'nodse'" in msg
    assert "did you mean 'nodes'" in msg


def test_unknown_key_in_parent_is_reported_for_the_child(tmp_path):
    path = write(tmp_path / "env.toml", '[p]\nexecutor = "slurm"\ngpus_per_nod = 8\n[c]\nextends = "p"\n')
    with pytest.raises(EnvTomlError, match=r"profile 'c': unknown key 'gpus_per_nod'.*gpus_per_node"):
        load_env_toml(path).profile("c")


@pytest.mark.parametrize(
    "body, key",
    [
        ('executor = "slurm"\nnodes = "2"', "nodes"),
        ('executor = "slurm"\nnodes = 0', "nodes"),
        ('executor = "slurm"\ngpus_per_node = true', "gpus_per_node"),
        ('executor = "slurm"\nexclusive = "yes"', "exclusive"),
        ('executor = "slurm"\ncontainer_image = "i"\nmounts = "/a:/a"', "mounts"),
        ('executor = "slurm"\ncontainer_image = "i"\nmounts = ["/a"]', "mounts"),
        ('executor = "slurm"\nmounts = ["/a:/a"]', "mounts"),
        ('executor = "slurm"\ntime = "four hours"', "time"),
        ('executor = "slurm"\nmem = "64 GB"', "mem"),
        # a trailing newline would end the #SBATCH / export line ("$" in a regex allows one)
        ('executor = "slurm"\nmem = "64G\\n"', "mem"),
        ('nproc_per_node = 2\nenv_vars = { "A\\n" = "1" }', "env_vars"),
        # any one-line value: a newline ended its #SBATCH directive and started a line of the
        # job script (an injected directive, a stray command), silently
        ('executor = "slurm"\npartition = "batch\\n#SBATCH --exclusive\\necho hi"', "partition"),
        ('executor = "slurm"\naccount = "a\\rb"', "account"),
        ('executor = "slurm"\ntime = "04:00:00\\n"', "time"),
        ('executor = "slurm"\ncontainer_image = "i\\u0000"', "container_image"),
        ('executor = "slurm"\ncontainer_image = "i"\nmounts = ["/a:/a\\n/b:/b"]', "mounts"),
        ('executor = "slurm"\nsetup = ["module load x\\nrm -rf /"]', "setup"),
        ('executor = "kubernetes"', "executor"),
        ('executor = "slurm"\ntunnel = "telnet"', "tunnel"),
        ('executor = "slurm"\ntunnel = "ssh"\nremote_job_dir = "/j"', "host"),
        ('executor = "slurm"\ntunnel = "ssh"\nhost = "h"', "remote_job_dir"),
        ('executor = "slurm"\nhost = "h"', "host"),
        ('executor = "slurm"\nport = 2222', "port"),
        ('executor = "slurm"\ntunnel = "ssh"\nhost = "h"\nremote_job_dir = "/j"\nport = "22"', "port"),
        ('executor = "slurm"\ntunnel = "ssh"\nhost = "h"\nremote_job_dir = "/j"\nport = 70000', "port"),
        ('executor = "slurm"\ngpus_per_node = 8\nnproc_per_node = 16', "nproc_per_node"),
        ('executor = "local"\npartition = "batch"', "partition"),
        ('nproc_per_node = 2\nsetup = ["x"]', "setup"),
        ('executor = "slurm"\nsetup = "module load x"', "setup"),
        ('executor = "slurm"\nenv_vars = ["A=1"]', "env_vars"),
        ('nproc_per_node = 2\nenv_vars = { "A B" = "1" }', "env_vars"),
        ('nproc_per_node = 2\nenv_vars = { "1A" = "1" }', "env_vars"),
        # NeMo-Run would export it upper-cased (HTTP_PROXY) in a Slurm job script
        ('executor = "slurm"\nenv_vars = { http_proxy = "x" }', "env_vars"),
        ('executor = "slurm"\nextends = 3', "extends"),
    ],
)
def test_invalid_values_name_profile_and_key(tmp_path, body, key):
    path = write(tmp_path / "env.toml", f"[bad]\n{body}\n")
    with pytest.raises(EnvTomlError) as e:
        load_env_toml(path).profile("bad")
    msg = str(e.value)
    assert str(path) in msg and "profile 'bad'" in msg and f"'{key}'" in msg


SLURM_TIME_FORMS = [
    "0",  # no limit
    "90",  # minutes
    "90:30",  # minutes:seconds
    "04:00:00",
    "48:59:59",  # hours:minutes:seconds (the first field is unbounded)
    "1-0",
    "2-23",  # days-hours
    "1-23:59",  # days-hours:minutes
    "1-23:59:59",  # days-hours:minutes:seconds
]


@pytest.mark.parametrize("value", SLURM_TIME_FORMS)
def test_every_slurm_time_form_is_accepted(tmp_path, value):
    path = write(tmp_path / "env.toml", f'[c]\nexecutor = "slurm"\ntime = "{value}"\n')
    assert load_env_toml(path).profile("c").time == value


@pytest.mark.parametrize(
    "value, detail",
    [
        ("04:75:00", "minutes 75 is not below 60"),
        ("04:00:60", "seconds 60 is not below 60"),
        ("10:60", "seconds 60 is not below 60"),
        ("1-24", "hours 24 is not below 24"),
        ("1-25:00:00", "hours 25 is not below 24"),
        ("1-00:60", "minutes 60 is not below 60"),
        ("1-00:00:99", "seconds 99 is not below 60"),
        ("1:2:3:4", None),
        ("1-", None),
        ("-1", None),
        ("1-2-3", None),
        ("\u0664:00:00", None),  # a non-ASCII digit
        ("4h", None),
    ],
)
def test_slurm_time_out_of_range_or_malformed_is_one_error(tmp_path, value, detail):
    path = write(tmp_path / "env.toml", f'[c]\nexecutor = "slurm"\ntime = "{value}"\n')
    with pytest.raises(EnvTomlError) as e:
        load_env_toml(path).profile("c")
    msg = str(e.value)
    assert msg.startswith(f"{path}: profile 'c': key 'time' must be a Slurm time")
    assert "days-hours:minutes:seconds" in msg and "\n" not in msg  # one line
    if detail is not None:
        assert msg.endswith(f"({detail})")


@pytest.mark.parametrize("value", ["jobs", "./jobs", "~/jobs", "lustre/me/jobs", "$HOME/jobs"])
def test_ssh_remote_job_dir_must_be_absolute(tmp_path, value):
    body = f'executor = "slurm"\ntunnel = "ssh"\nhost = "h"\nremote_job_dir = "{value}"'
    path = write(tmp_path / "env.toml", f"[r]\n{body}\n")
    with pytest.raises(EnvTomlError) as e:
        load_env_toml(path).profile("r")
    msg = str(e.value)
    assert msg.startswith(f"{path}: profile 'r': key 'remote_job_dir' must be an absolute path")
    assert repr(value) in msg


def test_unknown_profile_lists_profiles(tmp_path):
    path = write(tmp_path / "env.toml", FULL)
    with pytest.raises(EnvTomlError) as e:
        load_env_toml(path).profile("lapto")
    msg = str(e.value)
    assert "no profile 'lapto'" in msg and "did you mean 'laptop'" in msg
    assert "cluster, laptop, remote" in msg


def test_wandb_section_is_checked(tmp_path):
    path = write(tmp_path / "env.toml", '[wandb]\nprojet = "x"\n')
    with pytest.raises(EnvTomlError, match=r"\[wandb\]: unknown key 'projet'.*'project'"):
        load_env_toml(path)
    path = write(tmp_path / "env.toml", '[wandb]\nproject = "a\\nb"\n')
    with pytest.raises(
        EnvTomlError, match=r"\[wandb\]: key 'project' must be a non-empty string on one line"
    ):
        load_env_toml(path)


def test_invalid_toml_and_missing_file_name_the_file(tmp_path):
    bad = write(tmp_path / "env.toml", "[a\nexecutor = 1\n")
    with pytest.raises(EnvTomlError, match=rf"{bad}: invalid TOML"):
        load_env_toml(bad)
    with pytest.raises(EnvTomlError, match="file not found"):
        load_env_toml(tmp_path / "nope.toml")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[a]\nexecutor = "\xe9"\n')
    with pytest.raises(EnvTomlError, match=rf"{latin1}: not UTF-8 text"):
        load_env_toml(latin1)
    top_level = write(tmp_path / "t.toml", 'executor = "slurm"\n')
    with pytest.raises(EnvTomlError, match="top-level key 'executor' is not a table"):
        load_env_toml(top_level)


def test_discovery_walks_up_to_the_project_root(tmp_path):
    root = tmp_path / "proj"
    (root / "pyproject.toml").parent.mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    write(root / "env.toml", "[laptop]\nnproc_per_node = 1\n")
    deep = root / "a" / "b"
    deep.mkdir(parents=True)
    assert find_env_toml(deep) == root / "env.toml"
    profile, env = load_profile("laptop", start=deep)
    assert profile.nproc_per_node == 1 and env.path == root / "env.toml"
    # A nearer file wins.
    write(root / "a" / "env.toml", "[laptop]\nnproc_per_node = 4\n")
    assert load_profile("laptop", start=deep)[0].nproc_per_node == 4


def test_discovery_stops_at_the_project_root(tmp_path):
    write(tmp_path / "env.toml", "[laptop]\n")  # above the project: must not be used
    root = tmp_path / "proj"
    (root / ".git").mkdir(parents=True)
    inner = root / "src"
    inner.mkdir()
    with pytest.raises(EnvTomlError) as e:
        find_env_toml(inner)
    msg = str(e.value)
    searched = msg.split("searched: ")[1].split(")")[0].split(", ")
    assert "no env.toml" in msg and searched == [str(inner), str(root)]
