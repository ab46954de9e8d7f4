"""Signed links to a page: the fragment rebuilds each object's presigned URL exactly."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from producer.signed import relative_refs, signed_page_url, signed_refs

PAGE = (
    b'<html><body><img src="input.png"><img src="layers/01-a.png"><a href="x.npy">v</a>'
    b'<img data-src="data:image/png;base64,AA"><a href="https://example.com/">e</a>'
    b'<a href="#top">t</a><img src="/abs.png"><img src="../../../outside.png"></body></html>'
)


def fake_presign(made: dict[str, str]):  # noqa: ANN201
    """Presigned URLs the way SigV4 makes them: shared parameters, a per-key signature;
    the date moves on after the second key (a second boundary while signing)."""

    def presign(key: str, expires: int) -> str:
        date = "20261127T100000Z" if len(made) < 2 else "20261127T100001Z"
        sig = f"{abs(hash((key, date))):064x}"[:64]
        made[key] = (
            f"https://s3.example.com/bucket/{key}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential=AKIA%2F20261127%2Fus-east-1%2Fs3%2Faws4_request"
            f"&X-Amz-Date={date}&X-Amz-Expires={expires}&X-Amz-SignedHeaders=host"
            f"&X-Amz-Security-Token=tok%2Ben%3D&X-Amz-Signature={sig}"
        )
        return made[key]

    return presign


def test_relative_references_only() -> None:
    assert relative_refs(PAGE) == ["input.png", "layers/01-a.png", "x.npy", "../../../outside.png"]


def test_the_fragment_rebuilds_each_presigned_url_parameter_for_parameter() -> None:
    made: dict[str, str] = {}
    url = signed_page_url(
        fake_presign(made), "jobs/j1/index.html", lambda: relative_refs(PAGE), 600
    )
    assert url.startswith(made["jobs/j1/index.html"] + "#actviz-signed=")
    refs = signed_refs(url)
    assert set(refs) == {"input.png", "layers/01-a.png", "x.npy"}  # ../ out of the root: unsigned
    assert len({dict(parse_qsl(urlsplit(u).query))["X-Amz-Date"] for u in made.values()}) == 2
    for ref, rebuilt in refs.items():
        key = f"jobs/j1/{ref}"
        assert urlsplit(rebuilt).path == f"/bucket/{key}"
        assert sorted(parse_qsl(urlsplit(rebuilt).query)) == sorted(
            parse_qsl(urlsplit(made[key]).query)
        ), ref


def test_a_local_path_is_returned_as_it_is_and_the_page_not_read() -> None:
    def refs() -> list[str]:
        raise AssertionError("a local page needs no signatures")

    assert signed_page_url(lambda key, e: f"/data/{key}", "jobs/j/index.html", refs, 60) == (
        "/data/jobs/j/index.html"
    )
