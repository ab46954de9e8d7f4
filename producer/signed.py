"""A presigned link to a page whose images are linked relative to it.

A report links its images by relative key (each byte is stored once). From a
private bucket, a presigned link signs one object only: the page loads, its
images are refused. `signed_page_url` signs the page and every object it
refers to, and puts those signatures in the link's fragment, which browsers
never send to the server:

    https://host/bucket/jobs/<id>/index.html?X-Amz-...&X-Amz-Signature=...
        #actviz-signed={"q": "<query parameters every URL shares>",
                        "s": {"layers/01-conv1.png": "<the parameters its URL adds>", ...}}

The page script (worker/report/static/report.js) sets each image's `src` from
its `data-src`, and rewrites each link's `href`, that it finds in "s" to `new URL(ref, page) + "?" + q + "&" + s[ref]`, which
is the presigned URL of that object, parameter for parameter. Presigned URLs
made together differ only in their signature (and, across a second, their
date), so the fragment costs about 100 characters per image.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urljoin, urlsplit

from producer import contract
from producer.errors import ObjectNotFound

FRAGMENT_NAME = "actviz-signed"


class _Refs(HTMLParser):
    """The relative `src`, `data-src` and `href` values of a page, in order, each once."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.refs: dict[str, None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "data-src", "href") and value and is_relative(value):
                self.refs[value] = None


def is_relative(ref: str) -> bool:
    """A reference resolved against the page's folder: no scheme, host, root or fragment."""
    parts = urlsplit(ref)
    return not (parts.scheme or parts.netloc or ref.startswith(("/", "#", "?")))


def relative_refs(html: bytes) -> list[str]:
    parser = _Refs()
    parser.feed(html.decode("utf-8", errors="replace"))
    parser.close()
    return list(parser.refs)


def signed_page_url(
    presign: Callable[[str, int], str],
    page_key: str,
    refs: Callable[[], Iterable[str]],
    expires: int,
) -> str:
    """The presigned URL of `page_key`, with the signatures of the references `refs()`
    gives (relative to the page: from the job's manifest, or `relative_refs` of the
    page itself).

    `presign(key, expires)` signs one key (Store.presign); `refs` is called only
    when the URL is a web address. A reference that leaves the store's root (more
    '..' than folders) is left unsigned.
    """
    url = presign(page_key, expires)
    if not url.startswith(("http://", "https://")):
        return url  # a local file: relative references work as they are
    folder = posixpath.dirname(page_key)
    signed: dict[str, list[tuple[str, str]]] = {}
    for ref in refs():
        key = posixpath.normpath(posixpath.join(folder, urlsplit(ref).path))
        if key.startswith("../") or key in (".", ".."):
            continue
        signed[ref] = parse_qsl(urlsplit(presign(key, expires)).query, keep_blank_values=True)
    if not signed:
        return url
    shared = [
        pair for pair in next(iter(signed.values())) if all(pair in p for p in signed.values())
    ]
    payload = {
        "q": urlencode(shared),
        "s": {
            ref: urlencode([p for p in pairs if p not in shared]) for ref, pairs in signed.items()
        },
    }
    text = json.dumps(payload, separators=(",", ":"))
    return f"{url}#{FRAGMENT_NAME}={quote(text, safe='')}"


def signed_refs(url: str) -> dict[str, str]:
    """What the page script makes of a signed link: ref -> the URL it loads (for tests
    and for anyone reading a link by hand)."""
    base, _, fragment = url.partition("#")
    name, _, value = fragment.partition("=")
    if name != FRAGMENT_NAME:
        return {}
    payload = json.loads(unquote(value))
    out = {}
    for ref, own in payload["s"].items():
        target = urlsplit(urljoin(base, ref))
        query = "&".join(part for part in (payload["q"], own) if part)
        out[ref] = target._replace(query=query, fragment="").geturl()
    return out


def signed_page_link(store: Any, key: str, expires: int = 3600) -> str | None:
    """A link to the page at `key` with what it refers to signed; None while it does not exist.

    One GET (the page, read for its references). A gallery's page refers to its images,
    to its jobs' reports and to the other pages: all are signed, so the images load from
    a private bucket; a report or page opened from there loads, and its own images need
    its own link (`actviz open`), as its note says.
    """
    try:
        page = store.get(key)
    except ObjectNotFound:
        return None
    return signed_page_url(store.presign, key, lambda: relative_refs(page), expires)


def report_link(
    store: Any, job_id: str, files: list[str] | None, expires: int = 3600
) -> str | None:
    """A link to a job's report with its images signed; None when it has none.

    `files`: the job's files as its manifest (or its result) lists them; the
    report is then linked without a request. Without them the page is looked
    for, and read for what it refers to.
    """
    key = contract.report_key(job_id)
    if files is not None and contract.REPORT_FILE in files:
        # The per-channel PNGs are stored, not shown: not signed.
        shown = [
            f
            for f in files
            if f != contract.REPORT_FILE and not f.startswith(contract.CHANNELS_DIR)
        ]
        return signed_page_url(store.presign, key, lambda: shown, expires)
    return signed_page_link(store, key, expires)
