"""Access and TLS in the deployment files: the Kubernetes Deployment mounts the API keys from a
Secret the way the service reloads them, the TLS component serves both ports over TLS with
probes that still work, and compose runs with keys and TLS (it binds 0.0.0.0)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.access.auth import hash_key, load_keys
from tests.deploy.manifests import (
    CONFIG_ENV,
    K8S,
    ROOT,
    compose,
    compose_env,
    pod_spec,
    read_env_file,
    serving_deployment,
)


def test_k8s_mounts_the_keys_secret_reloadably() -> None:
    spec = pod_spec(serving_deployment())
    (container,) = spec["containers"]
    keys_file = Path(read_env_file(CONFIG_ENV)["THINKAHEAD_AUTH__KEYS_FILE"])
    (volume,) = [v for v in spec["volumes"] if v["name"] == "api-keys"]
    assert volume["secret"]["secretName"] == "thinkahead-api-keys"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "api-keys"]
    # subPath mounts never see Secret updates: the directory must be mounted.
    assert "subPath" not in mount and mount["readOnly"] is True
    assert keys_file.parent == Path(mount["mountPath"])


def test_example_keys_secret_is_a_valid_keys_file(tmp_path: Path) -> None:
    (secret,) = yaml.safe_load_all((K8S / "examples" / "api-keys-secret.yaml").read_text())
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "thinkahead-api-keys"
    path = tmp_path / "keys.json"
    path.write_text(secret["stringData"]["keys.json"])
    keys = load_keys(path)
    assert {p.name for p in keys.values()} == {"backend", "dashboard"}


def test_tls_component_patches_paths_that_exist() -> None:
    comp = yaml.safe_load((K8S / "tls" / "kustomization.yaml").read_text())
    assert comp["kind"] == "Component"
    literals = dict(lit.split("=", 1) for lit in comp["configMapGenerator"][0]["literals"])
    assert {"THINKAHEAD_TLS__CERT_FILE", "THINKAHEAD_TLS__KEY_FILE"} <= set(literals)
    (patch,) = [p for p in comp["patches"] if p["target"]["kind"] == "Deployment"]
    ops = yaml.safe_load(patch["patch"])
    mounts = [o["value"] for o in ops if o["path"].endswith("volumeMounts/-")]
    assert all(Path(v).parent == Path(mounts[0]["mountPath"]) for v in literals.values())
    probe = next(o for o in ops if o["path"].endswith("/startupProbe"))["value"]
    assert probe["httpGet"]["scheme"] == "HTTPS" and "grpc" not in probe


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders_with_tls_and_gpu(tmp_path: Path) -> None:
    shutil.copytree(K8S, tmp_path / "k8s")
    kust = tmp_path / "k8s" / "kustomization.yaml"
    data = yaml.safe_load(kust.read_text())
    data["components"] = ["gpu", "tls"]
    kust.write_text(yaml.safe_dump(data))
    out = subprocess.run(
        ["kubectl", "kustomize", str(tmp_path / "k8s")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    (dep,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "thinkahead"
    ]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS", probe
    secrets = {v["secret"]["secretName"] for v in dep["spec"]["template"]["spec"]["volumes"]
               if "secret" in v}  # fmt: skip
    assert secrets == {"thinkahead-api-keys", "thinkahead-tls"}


def test_compose_serves_with_keys_and_tls() -> None:
    data = compose()
    for name in ("service", "service-gpu"):
        svc = data["services"][name]
        env = compose_env(svc)
        mounted = {f"/run/secrets/{s}" for s in svc["secrets"]}
        for key in (
            "THINKAHEAD_AUTH__KEYS_FILE",
            "THINKAHEAD_TLS__CERT_FILE",
            "THINKAHEAD_TLS__KEY_FILE",
        ):
            assert env[key] in mounted, (name, key)
        assert "https://" in " ".join(svc["healthcheck"]["test"])
    for secret in data["secrets"].values():
        assert secret["file"].startswith("./deploy/secrets/")
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "thinkahead"]
    assert job["scheme"] == "https"


def test_compose_secrets_script_writes_a_keys_file_and_a_certificate(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    script = tmp_path / "deploy" / "compose-secrets.sh"
    script.parent.mkdir()
    shutil.copy(ROOT / "deploy" / "compose-secrets.sh", script)
    subprocess.run(
        ["bash", str(script)], check=True, capture_output=True, timeout=120, env=os.environ
    )
    out = tmp_path / "deploy" / "secrets"
    key = (out / "api-key.txt").read_text().strip()
    keys = load_keys(out / "keys.json")
    assert keys[hash_key(key)].scopes == frozenset({"recommend", "events"})
    assert json.loads((out / "keys.json").read_text())["keys"][0]["name"] == "compose"
    assert (out / ".gitignore").read_text().strip() == "*"
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(out / "ca.pem"), str(out / "server.pem")],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
