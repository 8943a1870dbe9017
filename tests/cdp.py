"""A small Chrome DevTools Protocol client over a pipe, standard library only.

Chromium started with ``--remote-debugging-pipe`` reads commands from its fd 3 and writes
responses and events to its fd 4, each message one JSON object followed by a NUL byte.
:class:`Browser` starts headless Chromium that way, opens one page (a flattened target
session) and offers what the tests need: navigate, evaluate JavaScript, wait for a
condition, click, screenshot; it closes the browser on exit (``Browser.close``, then kill).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import subprocess
import threading
import time
from pathlib import Path


class CDPError(RuntimeError):
    pass


class Browser:
    def __init__(self, chromium: str, profile: Path, width: int = 1600, height: int = 1000, timeout: float = 60):
        self.timeout = timeout
        self._next_id = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._responses: dict[int, dict] = {}
        self.events: list[dict] = []
        self.console: list[str] = []
        self._closed = False
        cmd_read, self._cmd_write = os.pipe()  # we write commands, Chromium reads them on fd 3
        self._evt_read, evt_write = os.pipe()  # Chromium writes on fd 4, we read
        # the child's ends above fd 4, so that the redirections below cannot clobber one another
        low = (cmd_read, evt_write)
        cmd_read, evt_write = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in low)
        for fd in low:
            os.close(fd)
        args = [chromium, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-dev-shm-usage",
                "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--no-first-run", "--no-default-browser-check",
                f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]

        # bash (dash takes one-digit fds only) puts our pipe ends on the child's fds 3 and 4, then becomes Chromium
        script = f'exec "$@" 3<&{cmd_read} 4>&{evt_write} {cmd_read}<&- {evt_write}>&-'
        self.proc = subprocess.Popen(["/bin/bash", "-c", script, "chromium", *args], pass_fds=(cmd_read, evt_write),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(cmd_read)
        os.close(evt_write)
        self._stderr_tail = b""
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        threading.Thread(target=self._stderr_loop, daemon=True).start()
        self.session = None
        try:
            target = self.call("Target.createTarget", url="about:blank", newWindow=False)["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.target = target
            for domain in ("Page", "Runtime"):
                self.call(f"{domain}.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    # --- transport -------------------------------------------------------------------------------

    def _stderr_loop(self):
        for line in iter(self.proc.stderr.readline, b""):
            self._stderr_tail = (self._stderr_tail + line)[-4000:]

    def _read_loop(self):
        buffer = b""
        while True:
            try:
                chunk = os.read(self._evt_read, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                with self._cond:
                    if "id" in message:
                        self._responses[message["id"]] = message
                    else:
                        self.events.append(message)
                        if message.get("method") == "Runtime.consoleAPICalled":
                            args = message["params"].get("args", [])
                            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
                    self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def call(self, method: str, timeout: float | None = None, session: bool = True, **params) -> dict:
        """Send one command and wait for its response; its ``result``, or :class:`CDPError`."""
        with self._lock:
            self._next_id += 1
            msg_id = self._next_id
        message = {"id": msg_id, "method": method, "params": params}
        if session and self.session:
            message["sessionId"] = self.session
        data = json.dumps(message).encode() + b"\0"
        with self._lock:
            while data:
                data = data[os.write(self._cmd_write, data):]
        deadline = time.time() + (timeout or self.timeout)
        with self._cond:
            while msg_id not in self._responses:
                if self._closed:
                    raise CDPError(f"{method}: the browser went away\n{self._stderr_tail.decode(errors='replace')}")
                left = deadline - time.time()
                if left <= 0:
                    raise CDPError(f"{method}: no answer within {timeout or self.timeout} s")
                self._cond.wait(left)
            response = self._responses.pop(msg_id)
        if "error" in response:
            raise CDPError(f"{method}: {response['error']}")
        return response.get("result", {})

    # --- page helpers -----------------------------------------------------------------------------

    def navigate(self, url: str):
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise CDPError(f"cannot open {url}: {result['errorText']}")

    def evaluate(self, expression: str, timeout: float | None = None):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                           returnByValue=True, userGesture=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(f"{expression[:200]}: {details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120, interval: float = 0.5, what: str = ""):
        """Poll ``expression`` until it is truthy; its value, or TimeoutError with the page's text."""
        deadline = time.time() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except CDPError:
                value = None
            if value:
                return value
            if time.time() > deadline:
                raise TimeoutError(f"waited {timeout} s for {what or expression[:200]}; the page shows:\n"
                                   f"{self.text()[-3000:]}")
            time.sleep(interval)

    def text(self) -> str:
        try:
            return self.evaluate("document.body ? document.body.innerText : ''") or ""
        except CDPError as e:
            return f"(no text: {e})"

    def click(self, selector: str, text: str | None = None):
        """A real mouse click (pressed and released) at the middle of the first visible element
        matching ``selector`` (and containing ``text``)."""
        box = self.evaluate(f"""(() => {{
            const els = [...document.querySelectorAll({json.dumps(selector)})].filter(e =>
                e.offsetParent !== null && ({json.dumps(text)} === null || e.innerText.includes({json.dumps(text)})));
            if (!els.length) return null;
            els[0].scrollIntoView({{block: 'center'}});
            const r = els[0].getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2];
        }})()""")
        if not box:
            raise CDPError(f"nothing visible matches {selector} {text or ''}")
        x, y = box
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", timeout=120)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    # --- shutdown ---------------------------------------------------------------------------------

    def close(self):
        try:
            if self.proc.poll() is None:
                self.call("Browser.close", timeout=10, session=False)
        except (CDPError, OSError):
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)
        self._reader.join(10)  # it ends on the pipe's end of file
        for fd in (self._cmd_write, self._evt_read):
            try:
                os.close(fd)
            except OSError:
                pass
        self.proc.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
