"""Fetching clean-fid's Inception file when downloads are allowed (``data.download``), against a
small file served on loopback by http.server (no real download, no 90 MB file): it arrives
whole and checksummed, a wrong checksum or an unreachable server is one clear MetricsError and
leaves nothing behind, and an existing file is not fetched again. The same with the network
blocked, through the command line: tests/integration_tests/test_inception_download_offline.py."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from fedrun.errors import MetricsError
from fedrun.evaluation import extractors

from helpers import free_port

PAYLOAD = b"not really an Inception network, but bytes with a known digest " * 1000


@pytest.fixture
def server(tmp_path):
    """http://127.0.0.1:PORT/inception-2015-12-05.pt serving PAYLOAD; yields the URL and a count of
    the requests served."""
    root = tmp_path / "served"
    root.mkdir()
    (root / extractors.INCEPTION_FILE).write_bytes(PAYLOAD)
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):  # quiet
            hits.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/{extractors.INCEPTION_FILE}", hits
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_file_arrives_whole_and_checksummed(server, tmp_path):
    url, hits = server
    dest = tmp_path / "weights" / extractors.INCEPTION_FILE
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert extractors.fetch_inception(dest, url, sha256=digest) == dest
    assert dest.read_bytes() == PAYLOAD and len(hits) == 1
    assert extractors.fetch_inception(dest, url, sha256=digest) == dest and len(hits) == 1  # not again
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(".")] == []  # no partial file


def test_a_wrong_checksum_keeps_nothing(server, tmp_path):
    url, _ = server
    dest = tmp_path / extractors.INCEPTION_FILE
    wrong = r"^data\.download: .* gave a file of SHA-256 .* expected 00000000"
    with pytest.raises(MetricsError, match=wrong) as err:
        extractors.fetch_inception(dest, url, sha256="0" * 64)
    assert "\n" not in str(err.value)
    assert not dest.exists() and [p.name for p in tmp_path.iterdir() if "part" in p.name] == []


def test_an_unreachable_server_is_one_clear_line(tmp_path):
    dest = tmp_path / extractors.INCEPTION_FILE
    url = f"http://127.0.0.1:{free_port()}/{extractors.INCEPTION_FILE}"  # nothing listens there
    failed = r"^data\.download: could not download the Inception weights"
    with pytest.raises(MetricsError, match=failed) as err:
        extractors.fetch_inception(dest, url, sha256="", timeout=5)
    assert "eval.feature_extractor" in str(err.value) and "\n" not in str(err.value)
    assert not dest.exists()


def test_without_a_pinned_digest_the_download_says_its_digest(server, tmp_path, monkeypatch):
    url, _ = server
    monkeypatch.delenv(extractors.SHA256_ENV, raising=False)
    monkeypatch.setattr(extractors, "INCEPTION_SHA256", "")
    with pytest.warns(UserWarning, match=hashlib.sha256(PAYLOAD).hexdigest()) as said:
        extractors.fetch_inception(tmp_path / "x.pt", url)
    assert len([w for w in said if "sha256" in str(w.message).lower()]) >= 1
    assert (tmp_path / "x.pt").read_bytes() == PAYLOAD  # kept: nothing to check it against


def test_downloads_only_when_allowed(server, tmp_path, monkeypatch):
    """inception_weights_path fetches a missing file only with download=True, to the place asked."""
    url, hits = server
    monkeypatch.setattr(extractors, "inception_url", lambda: url)
    monkeypatch.setenv(extractors.SHA256_ENV, hashlib.sha256(PAYLOAD).hexdigest())
    target = tmp_path / "mine.pt"
    with pytest.raises(MetricsError, match="--data.download true"):
        extractors.inception_weights_path(target)
    assert hits == [] and extractors.inception_weights_path(target, download=True) == target
    assert Path(target).read_bytes() == PAYLOAD
