"""infra/k8s: every manifest valid for Kubernetes, the worker GPU-bound and drained gently,
and the KEDA ScaledObject watching every Redis list the gpu queue really uses."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import redis
import yaml

from producer.broker import create_app
from producer.contract import MAX_PRIORITY, QUEUE_GPU, TASK_NAME
from producer.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
K8S_VERSION = "1.30.0"
REDIS_DB = 13


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


OVERLAYS = ["base", "dev", "dev-cpu"]


def manifest_files() -> list[Path]:
    """Every Kubernetes object file; kustomizations and JSON patches (YAML lists) excluded."""
    return sorted(
        p
        for p in K8S.rglob("*.yaml")
        if p.name != "kustomization.yaml"
        and not isinstance(next(yaml.safe_load_all(p.read_text())), list)
    )


def all_documents() -> list[tuple[Path, dict]]:
    return [(p, d) for p in manifest_files() for d in documents(p)]


def find(kind: str, name: str | None = None, folder: str = "base") -> dict:
    for path, doc in all_documents():
        wanted = name is None or doc["metadata"]["name"] == name
        if path.parent.name == folder and doc["kind"] == kind and wanted:
            return doc
    raise LookupError(f"{kind}/{name} not in {folder}")


def is_keda(doc: dict) -> bool:
    return doc["apiVersion"].startswith("keda.sh/")


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid_kubernetes_strictly(path):
    docs = documents(path)
    assert docs
    for doc in docs:
        if is_keda(doc):
            continue  # custom resources: no bundled schema; checked field by field below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_does_catch_a_typo():
    deployment = find("Deployment", "actviz-worker")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 10
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_only_keda_objects_lack_a_schema():
    kinds = {(d["apiVersion"], d["kind"]) for _, d in all_documents() if is_keda(d)}
    assert kinds == {
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("keda.sh/v1alpha1", "TriggerAuthentication"),
    }


@pytest.mark.parametrize("folder", OVERLAYS)
def test_kustomization_lists_every_manifest_in_its_folder(folder):
    kustomization = yaml.safe_load((K8S / folder / "kustomization.yaml").read_text())
    listed = {r for r in kustomization["resources"] if not r.startswith("..")}
    patches = {p["path"] for p in kustomization.get("patches", [])}
    present = {p.name for p in (K8S / folder).glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed | patches == present
    assert all((K8S / folder / r).exists() for r in kustomization["resources"])


def test_dev_objects_are_marked_dev_only():
    kustomization = (K8S / "dev" / "kustomization.yaml").read_text()
    assert 'actviz.dev/dev-only: "true"' in kustomization
    for folder in ("dev", "dev-cpu"):
        for path in (K8S / folder).glob("*.yaml"):
            assert "DEV ONLY" in path.read_text(), f"{folder}/{path.name}"
    base_kinds = {d["metadata"]["name"] for p, d in all_documents() if p.parent.name == "base"}
    assert not base_kinds & {"redis", "s3", "s3-init"}


def test_the_dev_s3_runs_the_composes_image_and_start_script_and_the_init_job_checks_the_keys():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["s3"]
    pod = find("Deployment", "s3", folder="dev")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == compose["image"]
    assert container["command"] == compose["entrypoint"]
    copy = (K8S / "dev" / "seaweedfs-start.sh").read_bytes()
    assert copy == (ROOT / "infra" / "s3" / "seaweedfs-start.sh").read_bytes(), "copy out of date"
    env = {e["name"] for e in container["env"]}
    assert env == set(compose["environment"])
    job = find("Job", "s3-init", folder="dev")["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["python", "-m", "producer.bucket_setup"]
    keys = {e["name"] for e in job["env"]}
    assert {
        f"S3_{r}_{k}_KEY" for r in ("ADMIN", "WORKER", "PRODUCER") for k in ("ACCESS", "SECRET")
    } <= keys
    example = (K8S / "dev" / "credentials.env.example").read_text()
    for e in container["env"] + job["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert re.search(rf"^{ref['key']}=", example, re.M), ref["key"]
    assert "minio" not in "".join(p.read_text().lower() for p in (K8S / "dev").iterdir())


def worker_pod() -> dict:
    return find("Deployment", "actviz-worker")["spec"]["template"]["spec"]


def config() -> dict[str, str]:
    return find("ConfigMap", "actviz-config")["data"]


def test_worker_asks_for_one_gpu_and_lands_on_gpu_nodes():
    pod = worker_pod()
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"]
    tolerations = {t["key"]: t for t in pod["tolerations"]}
    assert tolerations["nvidia.com/gpu"]["effect"] == "NoSchedule"
    assert container["args"] == ["worker"]


def test_keda_not_the_deployment_owns_the_replica_count():
    assert "replicas" not in find("Deployment", "actviz-worker")["spec"]


def test_scale_down_waits_for_the_running_job():
    pod = worker_pod()
    assert pod["terminationGracePeriodSeconds"] > int(config()["ACTVIZ_TIME_LIMIT"])
    assert int(config()["ACTVIZ_CONCURRENCY"]) == 1
    (container,) = pod["containers"]
    # A preStop or command override that sends SIGQUIT/SIGKILL would skip the warm shutdown.
    assert "lifecycle" not in container and "command" not in container


def test_probes_hit_healthz_and_readyz_on_the_metrics_port():
    (container,) = worker_pod()["containers"]
    port = int(config()["ACTVIZ_METRICS_PORT"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == port


def test_config_in_configmap_credentials_only_from_the_secret():
    data = config()
    assert not [k for k in data if re.search(r"PASS|SECRET|KEY_ID|TOKEN", k)]
    assert not [v for v in data.values() if re.search(r"://[^/@]*@", v)]
    (container,) = worker_pod()["containers"]
    refs = {next(iter(r)): next(iter(r.values()))["name"] for r in container["envFrom"]}
    assert refs == {"configMapRef": "actviz-config", "secretRef": "actviz-credentials"}
    broker = next(e for e in container["env"] if e["name"] == "ACTVIZ_BROKER_URL")
    assert "$(REDIS_PASSWORD)" in broker["value"] and "$(REDIS_ADDRESS)" in broker["value"]
    assert not any(d["kind"] == "Secret" for p, d in all_documents())


def test_worker_runs_as_non_root_with_a_read_only_root():
    pod = worker_pod()
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


# ---- KEDA ------------------------------------------------------------------


def scaled_object() -> dict:
    return find("ScaledObject", "actviz-worker")


def test_scaled_object_targets_the_worker_and_scales_to_zero():
    spec = scaled_object()["spec"]
    assert spec["scaleTargetRef"]["name"] == find("Deployment", "actviz-worker")["metadata"]["name"]
    assert spec["minReplicaCount"] == 0
    assert spec["maxReplicaCount"] >= 1
    assert spec["cooldownPeriod"] > 0 and spec["pollingInterval"] > 0


def redis_triggers() -> list[dict]:
    return [t for t in scaled_object()["spec"]["triggers"] if t["type"] == "redis"]


def test_every_list_trigger_has_auth_and_the_broker_db():
    triggers = redis_triggers()
    assert len(triggers) == MAX_PRIORITY + 1
    auth = find("TriggerAuthentication", "actviz-redis")
    secret_key = auth["spec"]["secretTargetRef"][0]
    assert (secret_key["parameter"], secret_key["name"]) == ("password", "actviz-credentials")
    for trigger in triggers:
        meta = trigger["metadata"]
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        assert int(meta["listLength"]) >= 1 and int(meta["activationListLength"]) == 0
        assert meta["addressFromEnv"] in config()
        assert meta["databaseIndex"] == config()["REDIS_DB"]
        # KEDA metadata values are strings; an int here is rejected by the CRD.
        assert all(isinstance(v, str) for v in meta.values())


def test_scaling_sums_every_list_and_the_jobs_workers_hold():
    """One metric: the ten priority lists plus the held jobs, per 2 x batch size jobs a
    worker holds when busy (KEDA scalingModifiers); not the largest single trigger."""
    from producer.settings import Settings as ActvizSettings

    spec = scaled_object()["spec"]
    triggers = spec["triggers"]
    names = [t["name"] for t in triggers]
    modifiers = spec["advanced"]["scalingModifiers"]
    terms = [term.strip() for term in modifiers["formula"].split("+")]
    assert sorted(terms) == sorted(names) and len(set(names)) == len(names)
    assert int(modifiers["target"]) == 2 * ActvizSettings().batch_size
    assert modifiers["activationTarget"] == "0" and modifiers["metricType"] == "AverageValue"
    (held,) = [t for t in triggers if t["type"] == "prometheus"]
    assert "actviz_jobs_held" in held["metadata"]["query"]
    assert all(isinstance(v, str) for v in held["metadata"].values())
    # The metric the query sums is one the worker really exports.
    from worker.metrics import HELD

    assert HELD._name == "actviz_jobs_held"


def test_triggers_cover_every_priority_list_of_the_gpu_queue(redis_url):
    # Send one job per priority with the real producer config, then read back the lists.
    app = create_app(Settings(broker_url=redis_url))
    try:
        for priority in range(MAX_PRIORITY + 1):
            app.send_task(TASK_NAME, args=[{}], queue=QUEUE_GPU, priority=priority)
    finally:
        app.close()
    client = redis.Redis.from_url(redis_url)
    lists = {k.decode() for k in client.keys("*") if client.type(k) == b"list"}
    assert QUEUE_GPU in lists and len(lists) == MAX_PRIORITY + 1
    watched = {t["metadata"]["listName"] for t in redis_triggers()}
    assert lists <= watched, f"queued jobs invisible to KEDA in {sorted(lists - watched)}"
    assert watched <= lists, f"triggers on lists nothing writes: {sorted(watched - lists)}"


def build(folder: str, tmp_path: Path) -> list[dict]:
    """`kubectl kustomize` of a copy of infra/k8s, with the dev credentials file filled in."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; the static checks above still ran")
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    example = tree / "dev" / "credentials.env.example"
    (tree / "dev" / "credentials.env").write_text(example.read_text())
    out = subprocess.run(
        [kubectl, "kustomize", str(tree / folder)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


WORKER_IMAGE = {
    "base": "registry.example.com/actviz/actviz-worker:0.1.0-gpu",
    "dev": "actviz-worker:gpu",
    "dev-cpu": "actviz-worker:cpu",
}


@pytest.mark.parametrize("folder", OVERLAYS)
def test_kustomize_builds_valid_objects_in_one_namespace(folder, tmp_path):
    docs = build(folder, tmp_path)
    assert all(d["metadata"].get("namespace") == "actviz" for d in docs if d["kind"] != "Namespace")
    for doc in docs:
        if not is_keda(doc):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    worker = next(
        d for d in docs if d["metadata"]["name"] == "actviz-worker" and d["kind"] == "Deployment"
    )
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["image"] == WORKER_IMAGE[folder]
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (None if folder == "dev-cpu" else "1")
    queues = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["ACTVIZ_QUEUES"]
    assert "gpu" in queues.split(",")
    # The list names carry control characters; the rendered YAML must keep them intact.
    rendered = next(d for d in docs if d["kind"] == "ScaledObject")["spec"]["triggers"]
    assert rendered == scaled_object()["spec"]["triggers"]
