"""Real screenshots of the running programs, for docs/: TensorBoard, generate.py and the plain-TF SavedModel.

    .venv/bin/python report/screenshots.py [--run shipped] [--out docs]

writes
  docs/tensorboard_scalars.png   TensorBoard's SCALARS tab for logs/<run> (loss, learning rate, validation)
  docs/tensorboard_text.png      TensorBoard's TEXT tab: the stories the run sampled while training
  docs/generate_terminal.png     `python generate.py ...` run at a bash prompt in an xterm
  docs/savedmodel_plain_tf.png   runs/<run>/saved_model used from plain TensorFlow (no tfgpt) in an xterm

Needs these Debian packages (headless Chromium, a virtual X server, a terminal, ImageMagick's `import`,
the DejaVu fonts):

    apt-get update && apt-get install -y --no-install-recommends \\
        chromium xvfb xterm imagemagick fonts-dejavu-core

A missing one stops the script with one line naming it. TensorBoard runs from this virtual environment
on 127.0.0.1 at a free port and is always stopped at the end, as are Xvfb, xterm and Chromium; every wait
has a timeout and every temporary directory is removed.

The SCALARS tab is the legacy dashboard (headless Chromium draws the TIME SERIES tab's WebGL charts
empty). Its "ignore outliers" switch lives only in the browser's localStorage, so Chromium talks to
TensorBoard through a small 127.0.0.1 proxy that adds one same-origin script to the page which turns it
off, so the charts show each curve from its first point; everything else is TensorBoard's own output.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 400_000
TOOLS = {  # program -> Debian package
    "chromium": "chromium",
    "Xvfb": "xvfb",
    "xterm": "xterm",
    "import": "imagemagick",
}
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf")
TERMINAL = ["-fa", "DejaVu Sans Mono", "-fs", "12", "-bg", "#1d1f21", "-fg", "#e8e8e8", "-b", "10", "+sb",
            "-xrm", "XTerm*cursorColor: #e8e8e8", "-xrm", "XTerm*pointerShape: none"]


class ScreenshotError(RuntimeError):
    """A step failed; the message is one line for the user."""


def check_tools() -> None:
    for program, package in TOOLS.items():
        if shutil.which(program) is None:
            raise ScreenshotError(f"`{program}` not found: apt-get install -y {package}")
    if not FONT.exists():
        raise ScreenshotError(f"{FONT} not found: apt-get install -y fonts-dejavu-core")
    try:
        import numpy  # noqa: F401
        from PIL import Image  # noqa: F401
    except ImportError as e:
        raise ScreenshotError(f"{e.name} missing from {sys.executable}: pip install -r requirements.txt") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, ready, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ready() until it returns something truthy; fail after `timeout` s or when `proc` dies."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = ready()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log and log.exists() else []
            raise ScreenshotError(f"{what}: the process exited with code {proc.returncode} {tail}")
        time.sleep(0.5)
    raise ScreenshotError(f"{what}: not ready after {timeout:.0f} s")


@contextlib.contextmanager
def started(argv: Sequence[str], log: Path, **kw) -> Iterator[subprocess.Popen]:
    """Start a process (own process group) and always stop it, group and all, on leaving."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def http_get(url: str, timeout: float = 5) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read()
    except (OSError, http.client.HTTPException):
        return None


# --- pictures ---------------------------------------------------------------------------------------------


def finish_png(raw: Path, out: Path, *, keep_width: bool = False, pad: int = 12) -> None:
    """Cut away the uniform margin at the bottom (and right) of a capture, then save it small."""
    import numpy as np
    from PIL import Image

    img = Image.open(raw).convert("RGB")
    a = np.asarray(img).astype(np.int16)
    if a.min() == a.max():
        raise ScreenshotError(f"{out.name}: the capture is a blank {img.width}x{img.height} picture")
    rows = np.nonzero((np.abs(a - a[-1:, :, :]) > 8).any(axis=(1, 2)))[0]
    cols = np.nonzero((np.abs(a - a[:, -1:, :]) > 8).any(axis=(0, 2)))[0]
    bottom = min(img.height, int(rows.max()) + 1 + pad) if rows.size else img.height
    right = img.width if keep_width or not cols.size else min(img.width, int(cols.max()) + 1 + pad)
    img = img.crop((0, 0, right, bottom))
    img.save(out, optimize=True)
    if out.stat().st_size > MAX_BYTES:
        img.quantize(colors=256).save(out, optimize=True)
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out} "
          f"({img.width}x{img.height}, {out.stat().st_size // 1000} kB)")


# --- TensorBoard + headless Chromium ----------------------------------------------------------------------

PREFS_PATH = "/__screenshots_prefs.js"
PREFS_JS = b'window.localStorage.setItem("_ignoreYOutliers", "false");\n'


def proxy_server(upstream: str) -> http.server.ThreadingHTTPServer:
    """127.0.0.1 proxy to TensorBoard whose index page first runs PREFS_JS (same origin, so TensorBoard's
    Content-Security-Policy allows it)."""
    hop = {"host", "connection", "accept-encoding", "keep-alive", "transfer-encoding", "content-length"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self.forward()

        def do_POST(self) -> None:
            self.forward()

        def reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for k, v in headers:
                if k.lower() not in hop:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def forward(self) -> None:
            if self.path == PREFS_PATH:
                return self.reply(200, [("Content-Type", "text/javascript")], PREFS_JS)
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
            req = urllib.request.Request(upstream + self.path, data=data, headers=headers, method=self.command)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    status, rheaders, body = r.status, r.getheaders(), r.read()
            except urllib.error.HTTPError as e:
                status, rheaders, body = e.code, list(e.headers.items()), e.read()
            except (OSError, http.client.HTTPException):
                return self.reply(502, [], b"")
            if self.path.split("?")[0].split("#")[0] in ("/", "/index.html") and b"<html" in body[:2000].lower():
                body = f'<script src="{PREFS_PATH}"></script>'.encode() + body
            self.reply(status, rheaders, body)

    return http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)


def chromium_shot(url: str, png: Path, tmp: Path, size: tuple[int, int], scale: float) -> None:
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp))
    argv = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}", f"--force-device-scale-factor={scale}",
            "--virtual-time-budget=20000", f"--screenshot={png}", url]
    log = tmp / f"{png.stem}.chromium.log"
    with started(argv, log) as proc:
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            raise ScreenshotError(f"chromium took over 120 s for {url}") from None
    if not png.exists():
        raise ScreenshotError(f"chromium wrote no screenshot for {url} (exit {proc.returncode}); see {log}")


def tensorboard_shots(run: str, out: Path, tmp: Path) -> None:
    logdir = REPO / "logs"
    if not any((logdir / run).glob("events.out.tfevents.*")):
        raise ScreenshotError(f"no TensorBoard events in {logdir / run}")
    exe = Path(sys.executable).with_name("tensorboard")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "tensorboard.main"]
    port = free_port()
    argv += ["--logdir", "logs", "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "0"]
    tb = f"http://127.0.0.1:{port}"
    with started(argv, tmp / "tensorboard.log", cwd=REPO) as proc:

        def loaded() -> bool:  # the run's scalars and texts are read (TensorBoard loads the logs after starting)
            scalars = http_get(f"{tb}/data/plugin/scalars/tags") or b""
            text = http_get(f"{tb}/data/plugin/text/tags") or b""
            return f'"{run}"'.encode() in scalars and f'"{run}"'.encode() in text

        wait_until("TensorBoard", loaded, 180, proc, tmp / "tensorboard.log")
        server = proxy_server(tb)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            base = f"http://127.0.0.1:{server.server_address[1]}/"
            runs = urllib.request.quote(f"^{run}$", safe="")
            shots = [
                ("tensorboard_scalars", f"#scalars&_smoothingWeight=0&regexInput={runs}", (1000, 1500), 1.25),
                ("tensorboard_text", f"#text&regexInput={runs}", (1500, 1300), 1.0),
            ]
            for name, fragment, size, scale in shots:
                raw = tmp / f"{name}.raw.png"
                chromium_shot(base + fragment, raw, tmp, size, scale)
                finish_png(raw, out / f"{name}.png")
        finally:
            server.shutdown()
            server.server_close()
            thread.join(10)


# --- xterm on Xvfb ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def x_display(tmp: Path, size: str = "1600x1200x24") -> Iterator[str]:
    """A fresh Xvfb on a free display number (Xvfb picks it: -displayfd)."""
    r, w = os.pipe()
    log = tmp / "xvfb.log"
    try:
        with started(["Xvfb", "-displayfd", str(w), "-screen", "0", size, "-nolisten", "tcp"], log,
                     pass_fds=(w,)) as proc:
            os.close(w)
            w = -1
            buf = b""
            end = time.monotonic() + 30
            os.set_blocking(r, False)
            while not buf.endswith(b"\n"):
                if time.monotonic() > end or proc.poll() is not None:
                    raise ScreenshotError(f"Xvfb did not start: {log.read_text(errors='replace').strip()[-300:]}")
                with contextlib.suppress(BlockingIOError):
                    chunk = os.read(r, 64)
                    if not chunk:
                        raise ScreenshotError("Xvfb did not start (no display number)")
                    buf += chunk
                time.sleep(0.1)
            yield f":{int(buf)}"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def terminal_shot(name: str, commands: Sequence[str], cwd: Path, env: dict[str, str], out: Path, tmp: Path,
                  *, size: tuple[int, int] = (100, 30), timeout: float = 300) -> None:
    """Type `commands` at a bash prompt in an xterm (cwd `cwd`), run them, capture the window when done."""
    marker, winid = tmp / f"{name}.done", tmp / f"{name}.windowid"
    prompt = shlex.quote("\\033[1;32mtfgpt\\033[0m$ ")  # a neutral prompt: the repository, not this machine's path
    lines = ["cd " + shlex.quote(str(cwd)), f'echo "$WINDOWID" > {shlex.quote(str(winid))}', "rc=0"]
    for command in commands:
        lines += [f"printf '%b%s\\n' {prompt} {shlex.quote(command)}", command, "rc=$?"]
    lines += [f"printf '%b' {prompt}", f'echo "$rc" > {shlex.quote(str(marker))}.tmp',
              f"mv {shlex.quote(str(marker))}.tmp {shlex.quote(str(marker))}", "exec sleep 900"]
    script = tmp / f"{name}.sh"
    script.write_text("\n".join(lines) + "\n")
    with x_display(tmp) as display:
        xenv = {**env, "DISPLAY": display}
        argv = ["xterm", *TERMINAL, "-geometry", f"{size[0]}x{size[1]}+0+0", "-T", name,
                "-e", "bash", "--noprofile", "--norc", str(script)]
        with started(argv, tmp / f"{name}.xterm.log", env=xenv) as proc:
            rc = wait_until(f"`{commands[-1]}` in xterm", lambda: marker.exists() and marker.read_text().strip(),
                            timeout, proc, tmp / f"{name}.xterm.log")
            if rc != "0":
                raise ScreenshotError(f"`{commands[-1]}` failed in the terminal (exit {rc}); run it by hand to see why")
            time.sleep(1.0)  # let xterm draw the last lines
            window = winid.read_text().strip() or "root"
            raw = tmp / f"{name}.raw.png"
            subprocess.run(["import", "-display", display, "-window", window, str(raw)], check=True, timeout=60,
                           env=xenv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finish_png(raw, out / f"{name}.png", keep_width=True, pad=10)


def terminal_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(LANG="C.UTF-8", LC_ALL="C.UTF-8", TERM="xterm", PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}")
    env.update(extra)
    return env


def generate_shot(run: str, out: Path, tmp: Path) -> None:
    command = f"python generate.py --model runs/{run} --temperature 0.8 --seed 7 --max-new-tokens 120"
    if run == "shipped":
        command = command.replace(" --model runs/shipped", "")
    terminal_shot("generate_terminal", [command], REPO, terminal_env(), out, tmp, size=(100, 24))


SNIPPET = '''\
import tensorflow as tf
import tensorflow_text  # registers the SentencePiece ops

m = tf.saved_model.load("{path}")
prompts = ["Once upon a time", "Tom had a red ball."]
out = m.signatures["generate"](
    prompts=tf.constant(prompts), max_new_tokens=tf.constant(80),
    temperature=tf.constant(0.8), top_k=tf.constant(0), top_p=tf.constant(0.95),
    seed=tf.constant(7, tf.int64))
for prompt, completion in zip(prompts, out["completions"].numpy()):
    print(prompt + completion.decode("utf-8"), end="\\n\\n")
'''


def savedmodel_shot(run: str, out: Path, tmp: Path) -> None:
    saved = REPO / "runs" / run / "saved_model"
    if not (saved / "saved_model.pb").exists():
        raise ScreenshotError(f"no SavedModel in {saved}")
    work = Path(tempfile.mkdtemp(prefix="plain-tf-"))  # no tfgpt here, and PYTHONPATH is unset
    try:
        (work / "saved_model").symlink_to(saved)  # a relative path in the snippet, not this machine's
        (work / "use_savedmodel.py").write_text(SNIPPET.format(path="saved_model"))
        commands = ["python -c 'import tfgpt' 2>&1 | tail -1", "cat use_savedmodel.py",
                    "python use_savedmodel.py 2>/dev/null"]
        terminal_shot("savedmodel_plain_tf", commands, work, terminal_env(TF_CPP_MIN_LOG_LEVEL="3"), out, tmp,
                      size=(100, 34))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="shipped", help="run name: logs/<run>, runs/<run> (default shipped)")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="output folder (default docs/)")
    parser.add_argument("--only", choices=["tensorboard", "generate", "savedmodel"], action="append",
                        help="make only these captures (repeatable; default all)")
    args = parser.parse_args(argv)
    steps = {"tensorboard": tensorboard_shots, "generate": generate_shot, "savedmodel": savedmodel_shot}
    try:
        check_tools()
        args.out = args.out.resolve()
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tfgpt-screenshots-") as tmp:
            for name in args.only or list(steps):
                steps[name](args.run, args.out, Path(tmp))
    except ScreenshotError as e:
        print(f"screenshots.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
