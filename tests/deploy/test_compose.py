"""docker-compose.yml: valid Compose Specification, GPU reservation, health-gated start, no secrets."""

from __future__ import annotations

import re

import pytest
import yaml
from compose_file import (
    COMPOSE,
    MissingVariable,
    interpolate,
    load_compose,
    read_env_file,
    references,
    required_references,
    service_environment,
)
from compose_spec import PyCompose, PyOptions, parse_duration

from producer.settings import Settings

SECRET_KEY = re.compile(r"PASS|SECRET|TOKEN|AUTH|CREDENTIAL|ACCESS_KEY|PRIVATE", re.I)
URL_USERINFO = re.compile(r"://(?P<userinfo>[^@/\s]*)@")


@pytest.fixture(scope="module")
def compose():
    return load_compose()


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


def test_file_validates_against_the_compose_specification(compose):
    # The bindings reject unknown keys and wrong types; to_spec() re-checks every
    # service against the pydantic models generated from the specification's schema.
    spec = PyOptions(apply_merge=True).from_yaml(COMPOSE.read_text()).to_spec()
    assert set(spec.services) == set(compose["services"])
    assert "version" not in yaml.safe_load(COMPOSE.read_text())


def test_the_validator_does_reject_a_broken_file():
    broken = COMPOSE.read_text().replace("stop_grace_period: 7m", "stop_grace_periods: 7m", 1)
    with pytest.raises(ValueError, match="stop_grace_periods"):
        PyOptions(apply_merge=True).from_yaml(broken)
    with pytest.raises(ValueError, match="condition"):
        PyCompose.from_yaml(
            "services:\n  a:\n    image: x\n    depends_on:\n"
            "      b: {condition: service_ready}\n  b:\n    image: y\n"
        )


def test_worker_reserves_an_nvidia_gpu(services):
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    gpu = [d for d in devices if "gpu" in d["capabilities"]]
    assert gpu and gpu[0]["driver"] == "nvidia"
    assert gpu[0].get("count") == "all" or int(gpu[0]["count"]) >= 1


def test_cpu_worker_sits_behind_the_cpu_profile_without_a_gpu(services):
    cpu = services["worker-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    assert "gpu" in cpu["environment"]["ACTVIZ_QUEUES"].split(",")


def test_workers_start_only_after_healthy_redis_s3_and_bucket_init(services):
    expected = {
        "redis": "service_healthy",
        "s3": "service_healthy",
        "s3-init": "service_completed_successfully",
    }
    for name in ("worker", "worker-cpu"):
        conditions = {dep: v["condition"] for dep, v in services[name]["depends_on"].items()}
        assert conditions == expected, name
    init = services["s3-init"]
    assert init["depends_on"]["s3"]["condition"] == "service_healthy"
    assert init["build"]["dockerfile"] == "producer/Dockerfile"
    assert init["entrypoint"] == ["python", "-m", "producer.bucket_setup"]


def test_every_health_dependency_has_a_healthcheck(services):
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if spec["condition"] == "service_healthy":
                assert services[dep].get("healthcheck", {}).get("test"), dep
    for name in ("redis", "s3", "worker", "worker-cpu"):
        assert services[name]["healthcheck"]["test"], name


def test_worker_healthcheck_waits_for_readiness(services):
    test = " ".join(services["worker"]["healthcheck"]["test"])
    assert "/readyz" in test and "urllib.request" in test


def test_redis_keeps_jobs_aof_on_and_never_evicts(services):
    command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert "--requirepass" in command
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])


def test_s3_is_pinned_by_digest_and_keeps_data_in_a_volume(compose, services):
    s3 = services["s3"]
    assert re.fullmatch(r"chrislusf/seaweedfs@sha256:[0-9a-f]{64}", s3["image"]), s3["image"]
    volume = next(v.split(":")[0] for v in s3["volumes"] if v.endswith(":/data"))
    assert volume in compose["volumes"]
    script = next(v.split(":")[0] for v in s3["volumes"] if v.endswith("seaweedfs-start.sh:ro"))
    assert (COMPOSE.parent / script).is_file()
    assert s3["ports"] == ["127.0.0.1:9000:9000"]


def test_every_image_is_pinned_and_no_init_step_hides_a_failure(services):
    for name, service in services.items():
        image = service["image"]
        assert "@sha256:" in image or ("build" in service) or re.search(r":[\w.-]+$", image), name
        assert not image.endswith(":latest") or "build" in service, name
        script = " ".join(str(part) for part in (service.get("command") or []))
        assert "|| true" not in script, name


def test_stop_grace_period_outlasts_the_job_hard_time_limit(services):
    for name in ("worker", "worker-cpu"):
        limit = int(services[name]["environment"]["ACTVIZ_TIME_LIMIT"])
        assert parse_duration(services[name]["stop_grace_period"]) > limit, name
        assert services[name]["stop_signal"] == "SIGTERM"


def test_flower_on_5555_watches_the_same_broker(services):
    flower = services["flower"]
    assert any(p.endswith(":5555") for p in flower["ports"])
    assert (
        flower["environment"]["ACTVIZ_BROKER_URL"]
        == services["worker"]["environment"]["ACTVIZ_BROKER_URL"]
    )
    # The actviz app's priority steps (tests/deploy/test_celery_tools.py runs this command).
    assert flower["entrypoint"][:4] == ["celery", "-A", "producer.celery_app", "flower"]
    # Workers send task events only when asked (ACTVIZ_TASK_EVENTS off): Flower asks.
    assert "--enable_events=True" in flower["entrypoint"]
    assert flower["build"]["dockerfile"] == "producer/Dockerfile"


def test_demo_producer_submits_the_builtin_model_and_waits(services):
    producer = services["producer"]
    assert producer["profiles"] == ["demo"]
    command = " ".join(producer["command"])
    assert "actviz submit" in command and "--model builtin:demo" in command
    assert "--wait" in command and "image_path()" in command
    assert producer["restart"] == "no"


def secret_free(value: str) -> str:
    """What is left of a value once its ${VAR} references are removed."""
    return re.sub(r"\$\{[^}]*\}", "", value)


def test_no_plain_text_secrets_every_secret_is_a_variable(services):
    checked = 0
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            if SECRET_KEY.search(key):
                # Only separators may sit between references, as in USER:PASSWORD.
                leftover = secret_free(value)
                assert references(value) and re.fullmatch(r"[:@/]*", leftover), f"{name}.{key}"
                checked += 1
            for m in URL_USERINFO.finditer(value):
                userinfo = m.group("userinfo")
                assert secret_free(userinfo).strip(":") == "", f"{name}.{key}"
                checked += 1
    assert checked >= 8


def test_every_required_variable_is_documented_in_env_example():
    documented = read_env_file()
    required = set(required_references(COMPOSE.read_text()))
    assert required, "compose refers to no required variables"
    assert required <= set(documented), required - set(documented)


def test_missing_secret_stops_compose_with_a_message():
    env = read_env_file()
    del env["REDIS_PASSWORD"]
    with pytest.raises(MissingVariable, match="REDIS_PASSWORD"):
        service_environment("worker", env)
    assert interpolate("$${HOME}", {}) == "${HOME}"


def test_worker_environment_makes_valid_settings():
    env = read_env_file()
    worker_env = service_environment("worker", env)
    settings = Settings.from_env(worker_env)
    assert settings.broker_url == f"redis://:{env['REDIS_PASSWORD']}@redis:6379/0"
    assert settings.storage_url.startswith("s3://actviz/")
    assert settings.metrics_port == 9100
    assert settings.preload == ("builtin:demo",)
    assert settings.queues == ("gpu",)
    assert settings.log_json is True
    assert settings.model_allow == ("builtin:", "s3://actviz/models/")
    assert worker_env["AWS_ENDPOINT_URL_S3"] == "http://s3:9000"
    assert worker_env["AWS_SECRET_ACCESS_KEY"] == env["ACTVIZ_S3_SECRET_KEY"]
    assert env["REDIS_PASSWORD"] not in str(settings.redacted())


def test_files_that_hold_real_secrets_are_ignored_by_git():
    root = COMPOSE.parent
    ignored = (root / ".gitignore").read_text().splitlines()
    assert ".env" in ignored
    dev = root / "infra" / "k8s" / "dev"
    assert "credentials.env" in (dev / ".gitignore").read_text().splitlines()
    # Only the examples are in the tree, and they hold placeholders, not secrets.
    for example in (root / ".env.example", dev / "credentials.env.example"):
        values = read_env_file(example)
        secrets = {k: v for k, v in values.items() if re.search(r"PASSWORD|SECRET|TOKEN", k)}
        assert secrets and all(v.startswith("change-me") for v in secrets.values()), example


def _merged(base: dict, override: dict) -> dict:
    """Compose's own merge of an override file: mappings merge key by key, the rest wins."""
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            _merged(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def test_the_sentinel_override_points_the_workers_at_three_sentinels():
    from compose_file import ROOT

    from producer.broker import celery_config

    override = yaml.safe_load((ROOT / "infra" / "compose" / "sentinel.yml").read_text())
    merged = _merged(yaml.safe_load(COMPOSE.read_text()), override)
    merged = {k: v for k, v in merged.items() if not k.startswith("x-")}
    spec = PyOptions(apply_merge=True).from_yaml(yaml.safe_dump(merged)).to_spec()
    assert {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"} <= set(spec.services)
    env = read_env_file()
    for name in ("worker", "worker-cpu"):
        raw = merged["services"][name]["environment"]
        settings = Settings.from_env(environ={k: interpolate(str(v), env) for k, v in raw.items()})
        assert (
            settings.broker_url.count("sentinel://") == 3 and settings.sentinel_master == "actviz"
        )
        options = celery_config(settings)["broker_transport_options"]
        assert options["master_name"] == "actviz" and options["actviz_heartbeat"] == 10.0
        assert "sentinel-1" in merged["services"][name]["depends_on"]
    monitor = " ".join(merged["services"]["sentinel-1"]["command"])
    assert "sentinel monitor actviz redis 6379 2" in monitor  # a quorum of two of three
    assert "--replicaof redis 6379" in " ".join(merged["services"]["redis-replica"]["command"])
