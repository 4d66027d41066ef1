"""Source parsing, cache layout and redaction (protocol/sources.py): pure functions."""

from __future__ import annotations

import pytest

from protocol.sources import SourceError, cache_path, parse, redact, shard_names


def test_hf_sources_name_a_file_or_a_folder_at_a_revision() -> None:
    f = parse("hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf")
    assert (f.repo, f.file, f.revision, f.is_folder) == (
        "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf", "main", False)
    folder = parse("hf://mlx-community/Qwen2.5-0.5B-Instruct-4bit@abc123")
    assert (folder.repo, folder.file, folder.revision, folder.is_folder) == (
        "mlx-community/Qwen2.5-0.5B-Instruct-4bit", None, "abc123", True)
    assert str(cache_path("/c", folder)) == "/c/hf/mlx-community/Qwen2.5-0.5B-Instruct-4bit/abc123"


@pytest.mark.parametrize("bad", [
    "hf://org", "hf://org/../x.gguf", "hf://org/repo/../../etc/passwd", "hf://org/repo/%2e%2e/x.gguf",
    "hf://org/repo/sub//x.gguf", "hf:///etc/passwd", "hf://org/repo/.hidden", "hf://org/repo/x y.gguf",
    "hf://org/repo/x.gguf@../main", "http://example.com/m.gguf", "https://u:p@example.com/m.gguf",
    "https:///m.gguf", "https://example.com:99999/m.gguf", "ftp://example.com/m.gguf",
    "https://example.com/m.gguf?sig=a b", "https://example.com/m\n.gguf",
])
def test_unsafe_or_unsupported_sources_are_refused(bad: str) -> None:
    with pytest.raises(SourceError) as info:
        parse(bad)
    assert "u:p" not in str(info.value)


def test_plain_http_only_for_loopback_unless_allowed() -> None:
    assert parse("http://127.0.0.1:8000/m.gguf").url == "http://127.0.0.1:8000/m.gguf"
    assert parse("http://localhost/m.gguf").kind == "https"
    assert parse("http://[::1]/m.gguf").kind == "https"
    assert parse("http://models.lan/m.gguf", allow_insecure_http=True).url == "http://models.lan/m.gguf"


def test_url_layout_uses_a_digest_and_a_checked_name() -> None:
    a = cache_path("/c", parse("https://example.com/a/m.gguf?sig=1"))
    b = cache_path("/c", parse("https://example.com/b/m.gguf?sig=1"))
    assert a.name == b.name == "m.gguf" and a.parent != b.parent
    assert str(a).startswith("/c/https/example.com/")
    odd = cache_path("/c", parse("https://example.com/%2e%2e"))
    assert odd.name == "download" and ".." not in str(odd)


def test_redaction_keeps_scheme_host_and_path_only() -> None:
    assert redact("https://user:secret@host:8443/p/m.gguf?token=abc#frag") == "https://host:8443/p/m.gguf"
    assert redact("http://[::1]:8000/M.gguf?x=1") == "http://[::1]:8000/M.gguf"
    assert redact("hf://org/repo/m.gguf") == "hf://org/repo/m.gguf"
    assert redact("/local/path") == "/local/path"


def test_split_gguf_names_every_shard() -> None:
    assert shard_names("sub/m-00002-of-00003.gguf") == [
        "sub/m-00001-of-00003.gguf", "sub/m-00002-of-00003.gguf", "sub/m-00003-of-00003.gguf"]
    assert shard_names("m.gguf") == ["m.gguf"]
