"""docker-compose.yml cannot run here (no Docker engine): check that every service's command and environment
match the code's real entry points and settings."""

from __future__ import annotations

import importlib
import importlib.util
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from nirvana.config import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _cmd(svc: dict[str, Any]) -> list[str]:
    c = svc.get("command", [])
    return shlex.split(c) if isinstance(c, str) else list(c)


def _cli_commands() -> set[str]:
    """Top-level commands of ``nirvana``: the base CLI plus what ``nirvana.cli.cache`` and ``nirvana.cli.service``
    mount (each mounted on a fresh app, so an unrelated package's import error cannot hide them)."""
    import typer

    from nirvana import cli

    app, bench = typer.Typer(), typer.Typer()
    for mod in ("nirvana.cli.cache", "nirvana.cli.service"):
        importlib.import_module(mod).register(app, bench)
    names: set[str] = set()
    for a in (cli.app, app):
        names |= {c.name or c.callback.__name__.replace("_", "-") for c in a.registered_commands if c.callback}
        names |= {g.name for g in a.registered_groups if g.name}
    return names


def _check_entry_point(name: str, argv: list[str]) -> None:
    prog = argv[0]
    if prog == "python":
        assert argv[1] == "-m", (name, argv)
        mod = importlib.import_module(argv[2]) if argv[2] != "workers.app" else None
        assert mod is not None and callable(getattr(mod, "main", None)), f"{name}: {argv[2]} has no main()"
    elif prog == "nirvana":
        assert argv[1] in _cli_commands(), f"{name}: `nirvana {argv[1]}` is not a command"
    elif prog == "uvicorn":
        target = argv[1]
        mod_name, attr = target.split(":")
        assert "--factory" in argv
        factory = getattr(importlib.import_module(mod_name), attr)
        assert callable(factory)
    elif prog == "celery":
        assert argv[1] == "-A" and importlib.util.find_spec(argv[2]) is not None, (name, argv)
        assert argv[3] in ("worker", "beat", "flower"), (name, argv)
    else:
        raise AssertionError(f"{name}: unknown program {prog!r}")


def test_services_and_entry_points(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"postgres", "redis", "migrate", "api", "router", "render", "maintenance", "beat", "flower"}
    for name, svc in services.items():
        if "build" in svc:
            _check_entry_point(name, _cmd(svc))
    assert _cmd(services["migrate"]) == ["nirvana", "migrate"]


def test_environment_names_real_settings(compose: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        for key, value in env.items():
            if key.startswith("NIRVANA_"):
                field = key.removeprefix("NIRVANA_").lower()
                assert field in fields, f"{name}: {key} is not a setting"
                Settings(**{field: value})  # the value validates
        if "build" in svc:
            for key in ("NIRVANA_DATABASE_URL", "NIRVANA_BROKER_URL", "NIRVANA_STORAGE_URL"):
                assert env.get(key), f"{name} lacks {key}"
    vt = int(compose["services"]["render"]["environment"]["NIRVANA_VISIBILITY_TIMEOUT_S"])
    assert vt >= 3600  # above the longest render


def test_production_properties(compose: dict[str, Any]) -> None:
    s = compose["services"]
    assert "pgvector" in s["postgres"]["image"] and s["postgres"].get("shm_size")
    redis_cmd = _cmd(s["redis"])
    assert "noeviction" in redis_cmd and redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    render = s["render"]
    devices = render["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "container_name" not in render and "ports" not in render  # scalable: --scale render=N
    for name in ("api", "router", "render", "maintenance", "beat"):
        dep = s[name]["depends_on"]
        assert dep["migrate"]["condition"] == "service_completed_successfully", name
    assert s["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_celery_settings_match_the_compose_intent() -> None:
    from workers.celery_app import celery_config

    conf = celery_config(Settings(broker_url="redis://redis:6379/0", visibility_timeout_s=3600), ["render.m"])
    assert conf["broker_transport_options"]["visibility_timeout"] == 3600
    assert conf["result_backend_transport_options"]["visibility_timeout"] == 3600
    assert conf["visibility_timeout"] == 3600
    assert conf["task_acks_late"] and conf["worker_prefetch_multiplier"] == 1
    assert conf["task_create_missing_queues"] is False
    assert [q.name for q in conf["task_queues"]] == ["route", "maintenance", "render.m"]
    # Beat's tasks never queue behind routing (a long eviction or sweep must not stall it).
    assert {r["queue"] for t, r in conf["task_routes"].items() if t != "nirvana.route"} == {"maintenance"}
    assert {e["task"] for e in conf["beat_schedule"].values()} <= set(conf["task_routes"])
