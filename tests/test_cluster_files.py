"""The cluster launcher files: what `ray up` checks (Ray's own prepare_config + validate_config), and what
its schema cannot: pinned versions, the reward resource, no port but SSH open to the internet, the shared
mount failing the setup, overrides quoted for the shell, the optional weights step."""

from __future__ import annotations

import copy
import os
import re
import shlex
import stat
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_FILES = sorted(p for p in (REPO / "cluster").glob("*.yaml") if p.name != "runtime_env.yaml")
PROVIDERS_WITH_NODE_TYPES = [p for p in LAUNCHER_FILES if yaml.safe_load(p.read_text())["provider"]["type"] != "local"]
PINNED = ("ray", "torch", "deepspeed", "diffusers", "transformers", "peft", "huggingface_hub")
SHARED = "/mnt/shared"


def _prepared(path: Path) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(yaml.safe_load(path.read_text())))  # what `ray up` does first
    validate_config(config)  # then Ray's JSON schema and its cross-checks
    return config


def _roles(config: dict) -> dict[str, list[str]]:
    """The commands `ray up` runs on the head and on every worker (prepare_config merged setup_commands
    into both)."""
    init = config.get("initialization_commands", [])
    return {"head": [*init, *config["head_setup_commands"]], "worker": [*init, *config["worker_setup_commands"]]}


def _setup(config: dict) -> list[str]:
    return list(dict.fromkeys(c for cmds in _roles(config).values() for c in cmds))


def test_there_are_cluster_files():
    assert {p.name for p in LAUNCHER_FILES} >= {"aws.yaml", "gcp.yaml", "local.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_ray_accepts_the_file(path):
    config = _prepared(path)
    assert config["available_node_types"] and config["head_node_type"] in config["available_node_types"]


def test_validation_can_fail():
    """The check above is not a formality: Ray's validation refuses a misspelled key."""
    import jsonschema

    bad = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())
    bad["available_node_types"]["reward"]["resourcez"] = {"reward": 2}
    path = REPO / "cluster" / ".bad_test.yaml"
    try:
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(jsonschema.ValidationError):
            _prepared(path)
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_setup_installs_this_project_with_pinned_versions(path):
    """Every node installs the exact versions this project is tested with (Ray refuses mixed versions, and
    nodes the autoscaler adds later must not get a newer release), then this repository."""
    for role, cmds in _roles(_prepared(path)).items():
        _check_pins(path, role, cmds)
    mounts = yaml.safe_load(path.read_text())["file_mounts"]
    assert mounts.get("/home/ubuntu/rocm_ray") == ".", "the repository must be synced to ~/rocm_ray"


def _check_pins(path: Path, role: str, cmds: list[str]) -> None:
    text = " ".join(cmds)
    pins = dict(re.findall(r'"([A-Za-z0-9_\-]+)(?:\[[^\]]*\])?==([^"]+)"', text))
    for pkg in PINNED:
        assert pkg in pins, f"{path.name} ({role}): {pkg} is not pinned with == in the setup commands"
        assert pins[pkg] == version(pkg).split("+")[0], f"{path.name}: {pkg}=={pins[pkg]}, tested with {version(pkg)}"
    unpinned = [m for m in re.findall(r"pip install[^;&|]*", text) for name in ("ray", "torch")
                if re.search(rf'["\s]{name}(\[[^\]]*\])?["\s]', m + " ") and f"{name}==" not in m]
    assert not unpinned, unpinned
    install = [i for i, c in enumerate(cmds) if re.search(r"pip install .*-e ~/rocm_ray\b", c)]
    pinned_at = [i for i, c in enumerate(cmds) if "ray[default,train,tune]==" in c]
    assert install and pinned_at and pinned_at[0] < install[0], f"{role}: the pins must come before `pip install -e`"


@pytest.mark.parametrize("path", PROVIDERS_WITH_NODE_TYPES, ids=lambda p: p.name)
def test_reward_resource_exists_on_some_node_type(path):
    config = _prepared(path)
    types = config["available_node_types"]
    reward = [n for n, t in types.items() if t.get("resources", {}).get("reward", 0) >= 1]
    assert reward, f"{path.name}: no node type advertises the `reward` resource"
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # nothing but drivers on the head
    assert any(types[n].get("min_workers", 0) >= 1 or types[n].get("max_workers", 0) >= 1 for n in reward)


def test_local_cluster_documents_the_reward_resource():
    text = (REPO / "cluster/local.yaml").read_text()
    res = re.findall(r"--resources='(\{[^']*\})'", text)
    assert res and all(yaml.safe_load(r).get("reward", 0) >= 1 for r in res)


def _open_to_world(rule: dict) -> bool:
    return any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
        r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", []))


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_no_port_but_ssh_is_open_to_the_internet(path):
    """AWS: the inbound rules Ray's own bootstrap creates from this file (its defaults + the file's
    IpPermissions) open only port 22 to 0.0.0.0/0. Every provider: no node config brings other groups /
    firewall tags, and the dashboard listens on the head's loopback (reached through `ray dashboard`)."""
    config = _prepared(path)
    provider = config["provider"]
    if provider["type"] == "aws":
        from ray.autoscaler._private.aws.config import _create_default_inbound_rules

        extra = provider.get("security_group", {}).get("IpPermissions", [])
        rules = _create_default_inbound_rules(["sg-cluster"], extra)
        world = [r for r in rules if _open_to_world(r)]
        assert world and all((r["IpProtocol"], r["FromPort"], r["ToPort"]) == ("tcp", 22, 22) for r in world), world
    for name, t in config["available_node_types"].items():
        nc = t.get("node_config", {})
        assert "SecurityGroupIds" not in nc and "NetworkInterfaces" not in nc, f"{path.name}: {name}"
        tags = nc.get("tags", {}).get("items", []) if isinstance(nc.get("tags"), dict) else []
        assert not set(tags) & {"http-server", "https-server"}, f"{path.name}: {name} tags {tags}"
    head = " ".join(config["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "0.0.0.0" not in " ".join(config["worker_start_ray_commands"] + _setup(config))


def _stubs(tmp_path: Path) -> Path:
    """sudo / mkdir / chown / mount / mountpoint stand-ins: mount fails, mountpoint answers $MOUNTED."""
    d = tmp_path / "bin"
    d.mkdir()
    scripts = {"sudo": 'exec "$@"', "mkdir": "exit 0", "chown": "exit 0", "mount": "exit 32",
               "mountpoint": 'test "$MOUNTED" = 1'}
    for name, body in scripts.items():
        f = d / name
        f.write_text(f"#!/bin/bash\n{body}\n")
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return d


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_a_failed_shared_mount_fails_the_setup(path, tmp_path):
    """The setup command for /mnt/shared, run by bash as Ray runs it, exits non-zero when the mount fails
    (and zero when the share is mounted), on the head and on every worker."""
    roles = _roles(_prepared(path))
    assert all(any(SHARED in c for c in cmds) for cmds in roles.values()), f"{path.name}: a role does not mount"
    cmds = [c for c in _setup(_prepared(path)) if SHARED in c]
    assert not any(re.search(r"\|\|\s*true|;\s*true\b|\|\|\s*:", c) for c in cmds), "failure masked"
    env = {"PATH": f"{_stubs(tmp_path)}:/usr/bin:/bin", "HOME": str(tmp_path)}
    for mounted, ok in (("0", False), ("1", True)):
        rc = subprocess.run(["bash", "-c", cmds[0]], env={**env, "MOUNTED": mounted}, timeout=30).returncode
        assert (rc == 0) == ok, f"{path.name}: mounted={mounted}: exit {rc}"


def test_runtime_env_is_valid_and_uses_the_shared_root():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((REPO / "cluster/runtime_env.yaml").read_text())
    RuntimeEnv(**data)  # Ray's own checks of the fields
    assert data["env_vars"]["ROCM_RAY_OUTPUT_ROOT"] == f"{SHARED}/rocm_ray"
    for path in LAUNCHER_FILES:
        assert any(f"{SHARED}/rocm_ray" in c for c in _setup(_prepared(path))), path.name


def _commands_in(text: str) -> list[list[str]]:
    """Shell command lines that run `rocm-ray ...` in a file's comments / code blocks (continuations joined)."""
    lines = [re.sub(r"^\s*#\s?", "", ln) for ln in text.splitlines()]
    joined, cur = [], ""
    for ln in lines:
        cur += ln.rstrip("\\").strip() + " "
        if not ln.rstrip().endswith("\\"):
            joined.append(cur.strip())
            cur = ""
    return [shlex.split(c) for c in joined if "rocm-ray " in c and "ray.reward_resources" in c]


@pytest.mark.parametrize("name", ["cluster/aws.yaml", "cluster/gcp.yaml", "docs/cluster.md"])
def test_reward_resources_override_is_quoted_for_the_shell(name):
    from rocm_ray.config import parse_overrides

    cmds = _commands_in((REPO / name).read_text())
    assert cmds, f"{name} shows no command with ray.reward_resources"
    for argv in cmds:
        args = [a for a in argv if "reward_resources" in a]
        assert args == ["ray.reward_resources={reward: 1}"], argv  # one argument: quoted
        assert parse_overrides(args) == [("ray.reward_resources", {"reward": 1})]


@pytest.mark.parametrize("path", PROVIDERS_WITH_NODE_TYPES, ids=lambda p: p.name)
def test_weights_step_is_off_by_default_and_fetches_what_hps_kl_needs(path, tmp_path):
    cmd = [c for c in _setup(_prepared(path)) if "hf download" in c]
    assert len(cmd) == 1 and "FETCH=0;" in cmd[0]
    recipe = yaml.safe_load((REPO / "recipes/hps_kl.yaml").read_text())
    assert f"hf download {recipe['model']['pretrained']}" in cmd[0] and "xswu/HPSv2" in cmd[0]
    d = tmp_path / "bin"  # off: runs nothing (an `hf` that would fail proves it)
    d.mkdir()
    (d / "hf").write_text("#!/bin/bash\nexit 1\n")
    (d / "hf").chmod(0o755)
    line = cmd[0].replace("~/venv/bin/hf", str(d / "hf"))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    assert subprocess.run(["bash", "-c", line], env=env, timeout=30).returncode == 0
    assert subprocess.run(["bash", "-c", line.replace("FETCH=0", "FETCH=1")], env=env, timeout=30).returncode != 0


def test_no_file_touches_the_users_ray_home():
    for path in [*LAUNCHER_FILES, REPO / "cluster/runtime_env.yaml"]:
        assert "~/.ray" not in path.read_text() and os.path.expanduser("~/.ray") not in path.read_text()
