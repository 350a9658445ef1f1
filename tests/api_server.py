"""A real llama.cpp server for the tests: llama-cpp-python's OpenAI-compatible server on the bundled GGUF.

Why a module: tests/test_api.py and the 06 notebook's test start the same server the same way (a free
port on 127.0.0.1, `--model_alias`, a log file to show when it fails). A server that cannot be built or
started FAILS the tests that need it (an exception here), it never skips them: `make test` installs
`llama-cpp-python[server]`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from browser_support import free_port  # one way to find a free port, shared with the browser test

START_TIMEOUT_S = 180  # the first start loads the model; a busy 2-core machine is slow


@dataclass
class LlamaServer:
    """A running server: its base URL (ending in /v1), model name, process and log."""

    base_url: str
    model: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def start(model: str = "smollm2", *, api_key: str | None = None, n_ctx: int = 2048) -> LlamaServer:
    """Start `python -m llama_cpp.server` on the bundled GGUF and wait until `/v1/models` answers."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"llama-cpp-python's server is not installed ({err}): run `make test`, or "
                           "`.venv/bin/pip install 'llama-cpp-python[server]==0.3.36' openai`") from err
    from decoderlab.engine.models import default_gguf

    port = free_port()
    log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf()), "--model_alias", model,
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx)]
    if api_key:
        cmd += ["--api_key", api_key]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = LlamaServer(f"http://127.0.0.1:{port}/v1", model, proc, log)
    deadline = time.time() + START_TIMEOUT_S
    request = urllib.request.Request(f"{server.base_url}/models",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                if model in {m["id"] for m in json.load(reply)["data"]}:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"llama_cpp.server did not answer within {START_TIMEOUT_S} s:\n{server.log_tail()}")
