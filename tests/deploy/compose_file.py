"""Read docker-compose.yml the way `docker compose` does, for the deploy tests.

`service_environment("worker", env)` gives exactly the variables Compose hands
the container: anchors merged, `${VAR}`, `${VAR:-default}` and `${VAR:?error}`
interpolated from `env` (the .env file), `$$` unescaped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from compose_spec import PyOptions

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

_REF = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(KeyError):
    """A `${VAR:?message}` reference whose variable is unset or empty."""


def load_compose() -> dict[str, Any]:
    """The compose file parsed and validated by the Compose Specification bindings."""
    compose = PyOptions(apply_merge=True).from_yaml(COMPOSE.read_text())
    compose.validate()
    return compose.to_dict()


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def references(value: str) -> list[str]:
    """Names of the variables a value refers to."""
    return [m.group("name") for m in _REF.finditer(value) if m.group("name")]


def required_references(value: str) -> list[str]:
    """Variables referred to without a default: `${VAR}` and `${VAR:?message}`."""
    return [
        m.group("name")
        for m in _REF.finditer(value)
        if m.group("name") and m.group("op") in (None, ":?", "?")
    ]


def interpolate(value: str, env: dict[str, str]) -> str:
    def replace(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        current = env.get(name)
        if op in (":-", "-") and (current is None or (op == ":-" and current == "")):
            return arg
        if op in (":?", "?") and (current is None or (op == ":?" and current == "")):
            raise MissingVariable(f"{name}: {arg}")
        return current or ""

    return _REF.sub(replace, value)


def service_environment(name: str, env: dict[str, str]) -> dict[str, str]:
    raw = load_compose()["services"][name].get("environment") or {}
    return {key: interpolate(str(value), env) for key, value in raw.items()}


def localize(
    env: dict[str, str], *, broker_url: str, s3_endpoint: str, port: int | None = None
) -> dict[str, str]:
    """The compose environment with container addresses replaced by local ones.

    Only addresses change (and the Redis password, since the local Redis has
    none); every other variable reaches the worker exactly as Compose sets it.
    """
    out = dict(env)
    broker = urlsplit(env["ACTVIZ_BROKER_URL"])
    assert broker.hostname == "redis" and broker.password, "compose broker URL changed shape"
    out["ACTVIZ_BROKER_URL"] = broker_url
    assert env["AWS_ENDPOINT_URL_S3"] == "http://s3:9000"
    out["AWS_ENDPOINT_URL_S3"] = s3_endpoint
    if port is not None:
        assert env["ACTVIZ_METRICS_PORT"] == "9100"
        out["ACTVIZ_METRICS_PORT"] = str(port)
    return out
