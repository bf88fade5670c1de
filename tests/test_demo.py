"""The one-command demo end to end: it serves the dashboard, the overview soon
shows instances in at least five states (held and compensated among them),
and Ctrl-C leaves no process behind."""

from __future__ import annotations

import http.cookiejar
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tests.smtp import free_port

ROOT = Path(__file__).resolve().parent.parent
TILE = re.compile(r'class="tile tile--(\w+)".*?tile__count">(\d+)<', re.S)


def _overview(base: str, password: str) -> dict[str, int]:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(f"{base}/login/").read()
    token = next(c.value for c in jar if c.name == "csrftoken")
    form = urllib.parse.urlencode(
        {"username": "viewer", "password": password, "csrfmiddlewaretoken": token}
    ).encode()
    opener.open(
        urllib.request.Request(
            f"{base}/login/", data=form, headers={"Referer": f"{base}/login/"}
        )
    ).read()
    page = opener.open(f"{base}/?window=all").read().decode()
    return {state: int(n) for state, n in TILE.findall(page)}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_shows_every_path_and_stops_cleanly(tmp_path):
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "CELERY_BROKER_URL"}
    }
    env.update(SAGA_DESK_VAR_DIR=str(tmp_path), PYTHONUNBUFFERED="1")
    log = (tmp_path / "demo.out").open("w+")
    demo = subprocess.Popen(
        [sys.executable, "manage.py", "demo", "--port", str(port), "--rate", "3"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # Every path shows within about 100 s on a quiet machine; the bound
        # leaves room for a CI run whose other tests share the two cores.
        deadline = time.monotonic() + 300
        password, counts = None, {}
        while time.monotonic() < deadline:
            time.sleep(3)
            out = (tmp_path / "demo.out").read_text()
            found = re.search(r"log in as viewer\s+password (\S+)", out)
            if found is None:
                continue
            password = found.group(1)
            try:
                counts = _overview(base, password)
            except OSError:
                continue
            states = {s for s, n in counts.items() if n > 0 and s != "stuck"}
            # Held instances wait on a person; stuck (no progress for 2 min)
            # is counted apart and needs a stall the demo does not make.
            if (
                len(states) >= 5
                and counts.get("needs_attention")
                and counts.get("compensated")
            ):
                break
        assert password, out[-3000:]
        states = {s for s, n in counts.items() if n > 0 and s != "stuck"}
        assert len(states) >= 5 and counts.get("needs_attention"), counts
        assert counts.get("compensated"), (
            counts,
            (tmp_path / "demo.out").read_text()[-3000:],
        )
        with urllib.request.urlopen(f"{base}/health") as health:
            assert health.status == 200
    finally:
        children = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(demo.pid)], capture_output=True, text=True
            ).stdout.split()
        ]
        demo.send_signal(signal.SIGINT)  # what Ctrl-C sends
        demo.wait(timeout=60)
    # Every child ran in its own process group; none may survive.
    time.sleep(1)
    assert children
    assert [pid for pid in children if _group_alive(pid)] == []
    assert "Demo stopped." in (tmp_path / "demo.out").read_text()
