"""TLS Redis with a password, presigned URL expiry, and no credentials in worker logs.

A pickle-serialized message is refused and the refusal logged: see
tests/service/test_round_trip.py::test_pickle_message_is_refused_and_logged.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import harness
import pytest
import redis

from producer import Client, Settings
from producer.storage import S3Store

pytestmark = pytest.mark.timeout(180)


def write_self_signed(folder: Path) -> dict[str, str]:
    """A self-signed certificate for 127.0.0.1 / localhost; it is its own CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = {"cert": str(folder / "redis.crt"), "key": str(folder / "redis.key")}
    Path(paths["cert"]).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(paths["key"]).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths["ca"] = paths["cert"]
    return paths


def test_rediss_with_a_password_carries_a_job_and_no_log_holds_a_secret(
    s3, bucket: str, models: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    tls = write_self_signed(tmp_path)
    server = harness.RedisServer(tmp_path, password=harness.REDIS_PASSWORD, tls=tls)
    server.start()
    # The operator's CA reaches OpenSSL the standard way; certificates are verified.
    monkeypatch.setenv("SSL_CERT_FILE", tls["ca"])
    env = harness.worker_env(
        server.url,
        f"s3://{bucket}/results",
        [f"s3://{bucket}/models/"],
        SSL_CERT_FILE=tls["ca"],
        ACTVIZ_MODEL_CACHE_DIR=str(tmp_path / "models"),
    )
    assert env["ACTVIZ_BROKER_URL"].startswith("rediss://:rel-redis@pw:3a8e%2F51%20x@")
    worker = harness.start_worker(env, tmp_path / "worker.log")
    try:
        client = Client(settings=Settings.from_env(environ=env))
        result = client.submit(models["tiny"], harness.random_png(60, 16, 16)).wait(timeout=60)
        assert result.layers == ["conv_a", "conv_b"]
        plain = redis.Redis(port=server.port, password=harness.REDIS_PASSWORD, socket_timeout=2)
        with pytest.raises(redis.exceptions.ConnectionError):  # TLS only: plain text is refused
            plain.ping()
    finally:
        worker.stop()
        server.stop()
    log = worker.log_text()
    assert "rediss://***@127.0.0.1" in log or "rediss://:**@127.0.0.1" in log
    harness.record("Security", "rediss:// with password and verified TLS", "job succeeded")

    config = subprocess.run(
        [str(harness.ACTVIZ), "config"], env=env, capture_output=True, text=True, timeout=60
    )
    assert config.returncode == 0, config.stderr
    assert "rediss://***@127.0.0.1" in config.stdout

    # Every worker log of this run (the tests above included), and `actviz config`, are
    # free of every secret, as typed and as escaped in the URL.
    texts = {str(p): p.read_text(errors="replace") for p in harness.WORKER_LOGS if p.exists()}
    texts["actviz config"] = config.stdout + config.stderr
    leaks = [name for name, text in texts.items() if any(s in text for s in harness.SECRETS)]
    assert leaks == []
    harness.record(
        "Security", "worker logs checked for secrets / leaks", f"{len(harness.WORKER_LOGS)} / 0"
    )


def test_presigned_urls_carry_their_expiry(s3, bucket: str) -> None:  # noqa: ANN001
    """The link names its expiry; S3 and MinIO refuse it afterwards.

    moto_server does not enforce the expiry (checked: the same URL still
    answers 200 after it), so this checks what the worker controls: the
    signed expiry time.
    """
    s3.put_object(Bucket=bucket, Key="presign/probe.txt", Body=b"visible")
    store = S3Store(bucket, "presign")
    now = time.time()
    url = store.presign("probe.txt", expires=2)
    query = parse_qs(urlparse(url).query)
    if "X-Amz-Expires" in query:  # SigV4: a lifetime in seconds
        assert query["X-Amz-Expires"] == ["2"]
    else:  # SigV2: an absolute expiry time
        assert now + 1 <= int(query["Expires"][0]) <= now + 4
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"visible"
    harness.record("Security", "presigned URL expiry signed into the link", "2 s")
