"""docker-compose.yml and Dockerfile agree with the code: commands parse, env is read, paths meet.

The file is resolved by Debian's docker-compose 1.29 (`config` needs no Docker engine), so
the checks see what Compose would run, with defaults interpolated.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from amls_cli import build_parser
from ml_backend.config import Config
from tests.support.live_services import missing_service

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
OUR_IMAGE = "amls:latest"
COMPOSE_BIN = "/usr/bin/docker-compose"
SECRETS = {"LABEL_STUDIO_USERNAME": "admin@example.org", "LABEL_STUDIO_PASSWORD": "pw-x",
           "LABEL_STUDIO_API_KEY": "0123456789abcdef0123", "BASIC_AUTH_PASS": "pw-y"}


class RecordingEnv(dict):
    """A mapping that remembers which keys `Config.from_env` asked for."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    binary = shutil.which("docker-compose") or COMPOSE_BIN
    if not Path(binary).exists():
        missing_service("docker-compose not found (apt-get install docker-compose)")
    # A bare environment plus the secrets the file demands: only its defaults interpolate.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **SECRETS}
    done = subprocess.run([binary, "-f", str(COMPOSE), "config"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    return yaml.safe_load(done.stdout)


def _ours(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items()
            if svc.get("image") == OUR_IMAGE}


def _env_names_config_reads() -> set[str]:
    env = RecordingEnv()
    Config.from_env(env)
    return env.asked


def _ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, published port, container port) of each published port, whichever form
    `docker-compose config` prints ("127.0.0.1:8080:8080/tcp" or a mapping)."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, str):
            host_ip, published, target = port.split("/")[0].rsplit(":", 2)
            out.append((host_ip, int(published), int(target)))
        else:
            out.append((port.get("host_ip", "0.0.0.0"), int(port["published"]),
                        int(port["target"])))
    return out


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> volume source."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        out[target] = source
    return out


def _volume_of(service: dict[str, Any], path: str) -> tuple[str, str] | None:
    """(volume, mount point) under which `path` lies in the container, if any."""
    for target, source in _mounts(service).items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source, target
    return None


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_services(compose):
    assert set(compose["services"]) >= {"label-studio", "redis", "ml-backend", "worker"}
    assert re.fullmatch(r"heartexlabs/label-studio:1\.23\.\d+",
                        compose["services"]["label-studio"]["image"])
    for name in ("label-studio", "redis", "ml-backend"):
        assert compose["services"][name].get("healthcheck", {}).get("test"), name


def test_our_commands_parse_with_the_real_cli(compose):
    parser = build_parser()
    commands = {name: svc["command"] for name, svc in _ours(compose).items()}
    assert {"ml-backend", "worker"} <= set(commands)
    for name, command in commands.items():
        assert command[0] == "amls", name
        args = parser.parse_args(command[1:])  # SystemExit on an unknown command or flag
        assert callable(args.func), name
    assert commands["ml-backend"][1] == "serve"
    assert commands["worker"][1] == "worker"


def test_env_is_exactly_what_config_reads_and_valid(compose):
    known = _env_names_config_reads()
    for name, svc in _ours(compose).items():
        env = {k: str(v) for k, v in svc["environment"].items()}
        assert set(env) <= known, f"{name}: unknown variables {set(env) - known}"
        cfg = Config.from_env(env)  # raises ConfigError on a bad value
        assert cfg.label_studio_url and cfg.label_studio_api_key and cfg.redis_url, name
        assert _volume_of(svc, str(cfg.model_dir)), f"{name}: MODEL_DIR is not on a volume"


def test_backend_and_workers_share_models_queue_and_settings(compose):
    ours = _ours(compose)
    backend, worker = ours["ml-backend"], ours["worker"]
    assert backend["environment"] == worker["environment"]
    cfg = Config.from_env({k: str(v) for k, v in backend["environment"].items()})
    assert _volume_of(backend, str(cfg.model_dir)) == _volume_of(worker, str(cfg.model_dir))
    assert urlparse(cfg.redis_url).hostname in compose["services"]
    # Scaling with --scale worker=N needs no fixed name and no host port.
    assert "container_name" not in worker and "ports" not in worker


def test_label_studio_and_backend_reach_each_other(compose):
    services = compose["services"]
    ls_env = services["label-studio"]["environment"]
    backend_env = services["ml-backend"]["environment"]
    cfg = Config.from_env({k: str(v) for k, v in backend_env.items()})
    ls_url = urlparse(cfg.label_studio_url)
    assert ls_url.hostname == "label-studio"
    assert ls_url.port in [target for _, _, target in _ports(services["label-studio"])]
    assert ls_env["LABEL_STUDIO_USER_TOKEN"] == cfg.label_studio_api_key
    assert str(ls_env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"]).lower() == "true"
    assert str(ls_env["USE_DEFAULT_BANNED_SUBNETS"]).lower() == "false"
    serve = services["ml-backend"]["command"]
    setup = services["setup"]["command"]
    backend_url = urlparse(_flag(setup, "--backend-url"))
    assert (backend_url.hostname, backend_url.port) == ("ml-backend", int(_flag(serve, "--port")))


def test_previews_are_served_from_the_volume_the_backend_writes(compose):
    services = compose["services"]
    ls = services["label-studio"]
    ls_env = ls["environment"]
    assert str(ls_env["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"]).lower() == "true"
    root = ls_env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"]
    previews = _flag(services["setup"]["command"], "--previews")
    assert previews.startswith(root.rstrip("/") + "/")  # Label Studio refuses the root itself
    ls_volume = _volume_of(ls, previews)
    assert ls_volume is not None
    assert ls_volume == _volume_of(services["ml-backend"], previews)


def test_setup_config_file_is_in_the_image(compose):
    config = _flag(compose["services"]["setup"]["command"], "--config")
    assert (REPO / config).is_file()
    assert f"COPY {Path(config).parent}" in DOCKERFILE.read_text()


def test_dockerfile_copies_existing_paths_and_runs_the_backend():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    copies = re.findall(r"^COPY (.+) \S+$", text, re.M)
    sources = [s for line in copies for s in line.split()]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
    ignored = (REPO / ".dockerignore").read_text()
    for source in sources:
        assert f"!{source.rstrip('/')}" in ignored, f"{source} is excluded by .dockerignore"
    (cmd,) = re.findall(r"^CMD (\[.*\])$", text, re.M)
    assert yaml.safe_load(cmd)[:2] == ["amls", "serve"]


def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose") or COMPOSE_BIN
    if not Path(binary).exists():
        missing_service("docker-compose not found (apt-get install docker-compose)")
    return subprocess.run([binary, "-f", str(COMPOSE), "config"], cwd=REPO,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret(missing):
    done = _compose_config({k: v for k, v in SECRETS.items() if k != missing})
    assert done.returncode != 0
    assert f"set {missing}" in done.stderr


def test_compose_publishes_on_loopback_unless_told(compose):
    published = [p for svc in compose["services"].values() for p in _ports(svc)]
    assert len(published) == 2 and {ip for ip, _, _ in published} == {"127.0.0.1"}, published
    assert "change-me" not in yaml.safe_dump(compose)
    opened = yaml.safe_load(_compose_config({**SECRETS, "BIND_ADDRESS": "0.0.0.0"}).stdout)
    assert {ip for s in opened["services"].values() for ip, _, _ in _ports(s)} == {"0.0.0.0"}
