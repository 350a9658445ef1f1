"""Helpers for the end-to-end tests: a throw-away JupyterLab server and a Playwright page in Debian's Chromium.

Why a module: the server recipe (temporary notebook copy, settings, workspace and runtime dirs, a
random token, `?reset`) is easy to get subtly wrong, and every pitfall it works around was met once.
Never a Playwright browser download: Chromium comes from apt.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = Path(os.environ.get("E2E_ARTIFACTS", ROOT / "tests" / "artifacts"))
DOCS_IMG = ROOT / "docs" / "img"
# The docs' screenshots are written when missing, or refreshed with DECODERLAB_UPDATE_DOCS_IMG=1, so
# that an ordinary test run leaves the tracked images (and git status) alone.
UPDATE_DOCS = os.environ.get("DECODERLAB_UPDATE_DOCS_IMG") == "1"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
SETTINGS = {  # written into a throw-away user-settings dir
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},  # keep every cell in the DOM
}
KERNEL_IDLE = """() => { const sc = window.jupyterapp?.shell?.currentWidget?.sessionContext;
  return !!sc && sc.session?.kernel?.status === 'idle'; }"""
ALL_CELLS_RAN = """() => { const nb = window.jupyterapp.shell.currentWidget;
  const code = nb.content.widgets.filter(c => c.model.type === 'code');
  return nb.sessionContext.session?.kernel?.status === 'idle'
         && code.every(c => c.model.executionCount !== null); }"""


def missing_requirements() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing: `make browser-deps` (apt-get install chromium chromium-driver fonts-dejavu-core)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install playwright (never `playwright install`)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    base: str
    token: str
    root: Path
    log: Path
    proc: subprocess.Popen

    def url(self, notebook: str) -> str:
        return f"{self.base}/lab/tree/{notebook}?reset&token={self.token}"  # ?reset: ignore a saved workspace

    def _api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"{self.base}/api/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        """Stop every kernel (each notebook's holds a model in memory; CI machines are small)."""
        for session in self._api("sessions") or []:
            self._api(f"sessions/{session['id']}", method="DELETE")
        for kernel in self._api("kernels") or []:
            self._api(f"kernels/{kernel['id']}", method="DELETE")

    def stop(self) -> None:
        self.proc.terminate()  # SIGTERM: jupyter_server shuts its kernels down
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_lab(tmp: Path, timeout_s: float = 90) -> Lab:
    """JupyterLab on 127.0.0.1 over a temporary copy of the notebooks (autosave never touches the repo)."""
    root = tmp / "nbs"
    shutil.copytree(NOTEBOOKS, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for name, value in SETTINGS.items():
        f = tmp / "user-settings" / f"{name}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(value))
    port, token = free_port(), secrets.token_hex(24)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp / "cfg"), JUPYTER_DATA_DIR=str(tmp / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp / "rt"), IPYTHONDIR=str(tmp / "ipy"), MPLBACKEND="Agg",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")  # see tests/test_notebooks.py: 2 threads on 2 cores stall here
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           f"--LabApp.workspaces_dir={tmp / 'ws'}", f"--LabApp.user_settings_dir={tmp / 'user-settings'}",
           "--LabApp.expose_app_in_browser=True", "--JupyterNotebookApp.expose_app_in_browser=True",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    log = tmp / "server.log"
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while True:
        try:
            req = urllib.request.Request(f"{base}/api/status", headers={"Authorization": f"token {token}"})
            urllib.request.urlopen(req, timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("jupyter lab died:\n" + log.read_text()[-3000:])
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"jupyter lab did not start in {timeout_s:.0f} s:\n" + log.read_text()[-3000:])
            time.sleep(0.2)
    return Lab(base=base, token=token, root=root, log=log, proc=proc)


def open_and_run_all(page, lab: Lab, notebook: str, timeout_s: float = 300) -> float:
    """Open a notebook, wait for its kernel, clear outputs, run every cell; return the run's seconds."""
    page.goto(lab.url(notebook))
    page.wait_for_function(KERNEL_IDLE, timeout=120_000)  # run-all sent while the kernel starts is dropped
    t0 = time.time()
    page.evaluate("window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(ALL_CELLS_RAN, timeout=timeout_s * 1000, polling=500)
    return time.time() - t0


def save_screenshot(locator, name: str, docs_name: str | None = None) -> Path:
    """Screenshot one element into tests/artifacts/ (JupyterLab scrolls inside its own panel: never the
    full page); also to docs/img/`docs_name` when that is missing or DECODERLAB_UPDATE_DOCS_IMG=1."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    locator.scroll_into_view_if_needed()
    locator.screenshot(path=str(path))
    if docs_name and (UPDATE_DOCS or not (DOCS_IMG / docs_name).exists()):
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_IMG / docs_name)
    return path
