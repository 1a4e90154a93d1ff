"""deploy/kubernetes/ cannot be applied here (no cluster): load every manifest and check it against the code —
entry points, settings, queues, probe routes, the GPU and beat limits, and the metrics KEDA scales on."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from nirvana.config import Settings
from nirvana.service.models import MAINTENANCE_QUEUE, QUEUE_PREFIX, ROUTE_QUEUE

ROOT = Path(__file__).resolve().parents[2]
KDIR = ROOT / "deploy" / "kubernetes"
METRICS_PY = ROOT / "nirvana" / "service" / "metrics.py"

API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "StatefulSet": "apps/v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}
WORKLOADS = ("Deployment", "StatefulSet", "Job")
# The autoscaling series the API exports (nirvana/service/metrics.py); docs/SERVICE.md "Scaling out".
SCALING_METRICS = ("nirvana_queue_depth", "nirvana_queue_workers", "nirvana_render_backlog_seconds")
# Variables a nirvana container may take that are not settings: S3 credentials for botocore (s3fs).
NON_SETTING_ENV = re.compile(r"AWS_[A-Z_]+")


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(KDIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for d in yaml.safe_load_all(path.read_text()):
            if d is not None:
                d["__file__"] = path.name
                out.append(d)
    return out


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod(d: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = d["spec"]["template"]["spec"]
    return spec


def _containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(``Kind/name``, container) of every workload, init containers included."""
    out = []
    for d in docs:
        if d["kind"] in WORKLOADS:
            pod = _pod(d)
            for c in pod.get("initContainers", []) + pod["containers"]:
                out.append((f"{d['kind']}/{d['metadata']['name']}", c))
    return out


def _argv(c: dict[str, Any]) -> list[str]:
    return [str(a) for a in c.get("command", []) + c.get("args", [])]


def _is_nirvana(c: dict[str, Any]) -> bool:
    return str(c["image"]).split(":")[0].rsplit("/", 1)[-1] == "nirvana"


def _config(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, str]:
    d = _one(docs, kind, name)
    data = dict(d.get("data") or {})
    data.update(d.get("stringData") or {})
    return {k: str(v) for k, v in data.items()}


def _env(docs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """Container environment: name → (where it comes from, literal value or None)."""
    env: dict[str, tuple[str, str | None]] = {}
    for src in c.get("envFrom", []):
        kind, ref = ("ConfigMap", src["configMapRef"]) if "configMapRef" in src else ("Secret", src["secretRef"])
        for k, v in _config(docs, kind, ref["name"]).items():
            env[k] = (kind, v)
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = ("env", str(e["value"]))
        else:
            ref = e["valueFrom"].get("secretKeyRef") or e["valueFrom"].get("configMapKeyRef")
            kind = "Secret" if "secretKeyRef" in e["valueFrom"] else "ConfigMap"
            env[e["name"]] = (kind, _config(docs, kind, ref["name"])[ref["key"]])
    return env


def _cli_commands() -> set[str]:
    """Top-level ``nirvana`` commands: the base CLI plus what ``nirvana.cli.cache`` and ``nirvana.cli.service``
    mount."""
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


def _promql_strings(query: str) -> list[tuple[str, str, str]]:
    """``label op "value"`` matchers of a PromQL query, values unescaped as PromQL does."""
    out = []
    for label, op, raw in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', query):
        out.append((label, op, re.sub(r"\\(.)", r"\1", raw)))
    return out


def test_kustomization_lists_every_manifest(docs: list[dict[str, Any]]) -> None:
    k = yaml.safe_load((KDIR / "kustomization.yaml").read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    files = {p.name for p in KDIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(k["resources"]) == sorted(files)
    assert not list(KDIR.glob("*.yml")), "use .yaml"
    for d in docs:
        assert d["apiVersion"] == API_VERSIONS[d["kind"]], (d["__file__"], d["kind"], d["apiVersion"])
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert kinds >= {
        ("StatefulSet", "postgres"),
        ("Service", "postgres"),
        ("StatefulSet", "redis"),
        ("Service", "redis"),
        ("Job", "nirvana-migrate"),
        ("Deployment", "api"),
        ("Service", "api"),
        ("Deployment", "router"),
        ("Deployment", "render"),
        ("Deployment", "maintenance"),
        ("Deployment", "beat"),
        ("ConfigMap", "nirvana-config"),
        ("Secret", "nirvana-secrets"),
        ("ScaledObject", "render"),
    }


def test_selectors_match_and_services_resolve(docs: list[dict[str, Any]]) -> None:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            sel = d["spec"]["selector"]["matchLabels"]
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert sel.items() <= labels.items(), d["metadata"]["name"]
        if d["kind"] == "StatefulSet":
            assert d["spec"]["volumeClaimTemplates"], f"{d['metadata']['name']}: no PVC"
            _one(docs, "Service", d["spec"]["serviceName"])
    for svc in (d for d in docs if d["kind"] == "Service"):
        pods = [
            d
            for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")
            and svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, f"Service/{svc['metadata']['name']} selects {len(pods)} workloads"
        ports = {p.get("name"): p["containerPort"] for c in _pod(pods[0])["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            tp = p["targetPort"]
            assert tp in ports or tp in ports.values(), (svc["metadata"]["name"], tp)


def test_commands_are_real_entry_points(docs: list[dict[str, Any]]) -> None:
    seen = set()
    for where, c in _containers(docs):
        if not _is_nirvana(c):
            continue
        argv = _argv(c)
        assert argv, f"{where}: a nirvana container needs an explicit command"
        prog = argv[0]
        if prog == "python":
            assert argv[1] == "-m", (where, argv)
            mod = importlib.import_module(argv[2])
            assert callable(getattr(mod, "main", None)), f"{where}: {argv[2]} has no main()"
        elif prog == "nirvana":
            assert argv[1] in _cli_commands(), f"{where}: `nirvana {argv[1]}` is not a command"
        elif prog == "uvicorn":
            mod_name, attr = argv[1].split(":")
            assert "--factory" in argv and callable(getattr(importlib.import_module(mod_name), attr)), where
        else:
            raise AssertionError(f"{where}: unknown program {prog!r}")
        seen.add(" ".join(argv[:3]))
    assert {
        "nirvana migrate",
        "python -m workers.router",
        "python -m workers.render",
        "python -m workers.maintenance",
        "python -m workers.beat",
    } <= seen
    assert _argv(_pod(_one(docs, "Job", "nirvana-migrate"))["containers"][0]) == ["nirvana", "migrate"]
    assert _pod(_one(docs, "Job", "nirvana-migrate"))["restartPolicy"] in ("OnFailure", "Never")


def test_environment_names_real_settings(docs: list[dict[str, Any]]) -> None:
    fields = set(Settings.model_fields)
    for where, c in _containers(docs):
        if not _is_nirvana(c):
            continue
        env = _env(docs, c)
        for key, (src, value) in env.items():
            if key.startswith("NIRVANA_"):
                field = key.removeprefix("NIRVANA_").lower()
                assert field in fields, f"{where}: {key} is not a setting"
                Settings.model_validate({field: value})  # the value validates
            else:
                assert NON_SETTING_ENV.fullmatch(key), f"{where}: unexpected variable {key}"
                assert src == "Secret" or key == "AWS_ENDPOINT_URL", f"{where}: {key} must come from a Secret"
        for key in ("NIRVANA_DATABASE_URL", "NIRVANA_BROKER_URL", "NIRVANA_STORAGE_URL"):
            assert env.get(key, ("", ""))[1], f"{where} lacks {key}"
        # Credentials only from Secrets; blobs on object storage shared by every node.
        assert env["NIRVANA_DATABASE_URL"][0] == "Secret", where
        assert str(env["NIRVANA_STORAGE_URL"][1]).startswith("s3://"), where
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= {k for k, (s, _) in env.items() if s == "Secret"}
        vt = int(str(env.get("NIRVANA_VISIBILITY_TIMEOUT_S", ("", "0"))[1]))
        assert vt >= 3600, f"{where}: visibility timeout below the longest render"
    assert "[s3]" in (ROOT / "Dockerfile").read_text(), "the image must install the s3 extra for s3:// storage"
    for d in docs:
        if d["kind"] == "ConfigMap":
            assert not re.search(r"password|secret|://[^/@]+:[^/@]+@", yaml.safe_dump(d.get("data")), re.I), d


def test_render_gpu_and_beat_singleton(docs: list[dict[str, Any]]) -> None:
    render = _pod(_one(docs, "Deployment", "render"))["containers"]
    assert len(render) == 1
    assert render[0]["resources"]["limits"]["nvidia.com/gpu"] == 1  # one GPU per render worker
    env = _env(docs, render[0])
    assert env["NIRVANA_DEVICE"][1] == "cuda"
    # The API divides the backlog by render_max_batch: it must see the workers' value (the shared ConfigMap).
    assert "NIRVANA_RENDER_MAX_BATCH" not in {e["name"] for e in render[0].get("env", [])}
    for where, c in _containers(docs):
        if where != "Deployment/render":
            limits = (c.get("resources") or {}).get("limits") or {}
            assert "nvidia.com/gpu" not in limits, f"{where} takes a GPU"
    assert "replicas" not in _one(docs, "Deployment", "render")["spec"], "KEDA owns render's replicas"

    beat = _one(docs, "Deployment", "beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"
    runs_beat = [w for w, c in _containers(docs) if "workers.beat" in _argv(c) or "--beat" in _argv(c)]
    assert runs_beat == ["Deployment/beat"], f"exactly one beat per deployment, found {runs_beat}"
    scaled = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "ScaledObject"}
    assert "beat" not in scaled


def test_backing_services_as_compose(docs: list[dict[str, Any]]) -> None:
    pg = _pod(_one(docs, "StatefulSet", "postgres"))
    assert "pgvector" in pg["containers"][0]["image"]
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pg["volumes"])  # /dev/shm for HNSW builds
    redis = _one(docs, "StatefulSet", "redis")
    argv = _argv(_pod(redis)["containers"][0])
    assert "noeviction" in argv and argv[argv.index("--appendonly") + 1] == "yes"
    assert redis["spec"]["volumeClaimTemplates"]  # AOF on a persistent volume


def test_probes_and_scrape_hit_real_routes(docs: list[dict[str, Any]]) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    # Routes are registered when the app is built; services open only in the lifespan (not run here).
    app = create_app(Settings(broker_url="redis://redis:6379/0"))
    get_paths = {p for p, ops in app.openapi()["paths"].items() if "get" in ops}
    api = _pod(_one(docs, "Deployment", "api"))["containers"][0]
    argv = _argv(api)
    port = int(argv[argv.index("--port") + 1])
    assert {p["name"]: p["containerPort"] for p in api["ports"]}["http"] == port
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        get = api[probe]["httpGet"]
        assert get["path"] in get_paths, f"{probe}: no GET {get['path']} in the app"
        assert get["port"] in ("http", port)
    # Liveness needs no dependency: it answers without the lifespan's connections.
    assert TestClient(app).get("/healthz").status_code == 200

    ann = _one(docs, "Service", "api")["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == port
    assert ann["prometheus.io/path"] in get_paths


def test_keda_scales_render_on_real_metrics_and_queues(docs: list[dict[str, Any]]) -> None:
    so = _one(docs, "ScaledObject", "render")
    target = so["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment" and target["name"] == "render"
    _one(docs, "Deployment", "render")
    assert 1 <= so["spec"]["minReplicaCount"] < so["spec"]["maxReplicaCount"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert float(meta["threshold"]) > 0 and meta["serverAddress"].startswith("http")
    query = meta["query"]
    assert "nirvana_render_backlog_seconds" in query
    assert "max by (queue)" in query  # every API pod reports the deployment-wide value: no sum over pods

    matchers = _promql_strings(query)
    assert matchers, query
    for label, op, value in matchers:
        assert label == "queue", (label, query)
        if op == "=~":
            rx = re.compile(value)
            assert rx.fullmatch(QUEUE_PREFIX + "m"), f"{value!r} misses render queues"
            for other in (ROUTE_QUEUE, MAINTENANCE_QUEUE, "renderXm"):
                assert not rx.fullmatch(other), f"{value!r} matches {other!r}"
        else:
            assert value in (ROUTE_QUEUE, MAINTENANCE_QUEUE) or value.startswith(QUEUE_PREFIX), value


def _exported_metrics() -> set[str]:
    return set(re.findall(r"MetricFamily\(\s*\"(nirvana_\w+)\"", METRICS_PY.read_text()))


def test_keda_query_metrics_exist_in_the_code(docs: list[dict[str, Any]]) -> None:
    query = _one(docs, "ScaledObject", "render")["spec"]["triggers"][0]["metadata"]["query"]
    used = set(re.findall(r"\bnirvana_\w+", query))
    assert used, query
    exported = _exported_metrics()
    assert used <= exported, (
        f"the KEDA query uses metrics nirvana/service/metrics.py does not export: {used - exported}"
    )
    # The three scaling series the docs and manifests name.
    assert set(SCALING_METRICS) <= exported, set(SCALING_METRICS) - exported
    for path in sorted(KDIR.glob("*.yaml")):  # comments included: they must not name a series that does not exist
        for name in set(re.findall(r"\bnirvana_[a-z_]*[a-z]", path.read_text())):
            assert name in exported or name.removesuffix("_total") in exported, f"{path.name}: unknown {name}"


def test_no_shell_wrappers(docs: list[dict[str, Any]]) -> None:
    """Commands are exec form (signals reach the worker: Celery's warm shutdown on scale-in)."""
    for where, c in _containers(docs):
        argv = _argv(c)
        assert argv and argv[0].rsplit("/", 1)[-1] not in ("sh", "bash"), where
