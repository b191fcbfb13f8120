"""Bare hub ids (``gpt2``, ``org/name``): looked up on the hub only when no local path has that name,
and every way that can fail is one line that says which (offline and not cached, no such repo,
unreachable). Offline cases use a hub cache laid out on disk as huggingface_hub writes it; the
online cases talk to a hub stand-in on 127.0.0.1 (HF_ENDPOINT), never to the network."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest

import layerscope
from layerscope.cli import main
from layerscope.sources.hub import looks_like_repo_id
from test_sources_and_cli import _fake_hub_cache


@pytest.mark.parametrize("spec,expected", [
    ("gpt2", True), ("bert-base-uncased", True), ("Qwen/Qwen2.5-0.5B", True), ("org/name", True),
    ("model.safetensors", False), ("ckpt.pt", False), ("nope.bin", False), ("a/b/c", False), ("./gpt2", False),
    ("/abs/gpt2", False), ("a--b", False), ("-x", False), ("x.", False), ("o/" + "n" * 97, False), ("", False),
])
def test_what_counts_as_a_hub_id(spec, expected):
    assert looks_like_repo_id(spec) is expected


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bare_name_offline_not_cached_says_so(tmp_path, monkeypatch, capsys):
    _fake_hub_cache(tmp_path, monkeypatch)  # an offline cache that holds acme/tiny-llama only
    assert main(["info", "gpt2"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("layerscope: error: gpt2:") and "not in the local cache (HF_HUB_OFFLINE=1)" in line


def test_layerscope_gpt2_is_info_and_says_not_cached(tmp_path, monkeypatch, capsys):
    """``layerscope gpt2`` (no command) is ``layerscope info gpt2``; a near-miss of a command is not."""
    _fake_hub_cache(tmp_path, monkeypatch)
    assert main(["gpt2"]) == 2
    assert "gpt2: not a local path, and not in the local cache (HF_HUB_OFFLINE=1)" in one_line(capsys.readouterr().err)
    assert main(["analyse", "gpt2"]) == 2
    assert "invalid choice: 'analyse'" in one_line(capsys.readouterr().err)


def test_bare_name_is_read_from_the_cache(tmp_path, monkeypatch, capsys):
    _fake_hub_cache(tmp_path, monkeypatch, repo="tinyllama")
    assert layerscope.inspect("tinyllama").dims.n_kv_heads == 2
    assert main(["info", "tinyllama"]) == 0
    assert "llama" in capsys.readouterr().out


def test_local_path_wins_over_a_hub_id(tmp_path, monkeypatch, capsys):
    _fake_hub_cache(tmp_path, monkeypatch)
    local = tmp_path / "src"  # the llama folder the fake cache was copied from
    monkeypatch.chdir(tmp_path)
    assert main(["info", "src"]) == 0 and str(local.name) in capsys.readouterr().out


def test_missing_file_name_never_goes_to_the_hub(tmp_path, monkeypatch, capsys):
    _fake_hub_cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert main(["info", "model.safetensors"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "no such file" in line and "cache" not in line


class _Hub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a repo that does not exist."""

    def do_GET(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def _cli_online(tmp_path, endpoint: str, spec: str) -> subprocess.CompletedProcess:
    """A subprocess, because huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DISABLE_TELEMETRY": "1",
           "LAYERSCOPE_CACHE_DIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "layerscope", "info", spec], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("spec", ["gpt2", "nobody/nothing"])
def test_online_missing_repo_says_no_such_repo(tmp_path, spec):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = _cli_online(tmp_path, f"http://127.0.0.1:{server.server_address[1]}", spec)
    finally:
        server.shutdown()
    line = one_line(proc.stderr)
    assert proc.returncode == 2 and f"{spec}:" in line and "no such repo on the hub" in line


def test_unreachable_hub_says_so(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _cli_online(tmp_path, f"http://127.0.0.1:{port}", "gpt2")
    line = one_line(proc.stderr)
    assert proc.returncode == 2 and "not in the local cache" in line and "unreachable" in line
