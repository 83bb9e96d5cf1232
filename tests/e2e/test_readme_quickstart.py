"""The README's quickstart, run as written against `postback up` (its ports and data dir moved
to the test's own): every command in it works, and the webhook it promises arrives, signed."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from postback.embedded import free_port
from tests.e2e.test_stack import start_stack

ROOT = Path(__file__).resolve().parents[2]


def quickstart() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- quickstart -->", 1)[1].split("<!-- /quickstart -->", 1)[0]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def test_the_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    base, peer = free_port(6), free_port()
    data_dir = tmp_path / "data"
    script = (
        quickstart()
        .replace("localhost:8080", f"localhost:{base}")
        .replace("9000", str(peer))
        .replace(".postback/", f"{data_dir}/")
        .replace("uv run python", shlex.quote(sys.executable))
    )
    proc, _ = start_stack(data_dir, base)
    try:
        # Output to files, and the script in a group of its own: when a failing command ends
        # it before its `kill`, the example peer it started neither holds a pipe open nor
        # outlives the test.
        with (tmp_path / "out").open("w") as stdout, (tmp_path / "err").open("w") as stderr:
            shell = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=ROOT,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
            try:
                shell.wait(timeout=120)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(shell.pid, signal.SIGKILL)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    out, err = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert shell.returncode == 0, out + err
    assert "signature verified:\n" in out, out + err
    # The receiver verified the webhook's signature with the consumer's secret, then printed it.
    printed = out.split("signature verified:\n", 1)[1]
    message, _ = json.JSONDecoder().raw_decode(printed)
    assert message["type"] == "call.completed"
    assert message["data"]["result"] == {"report": {"title": "sales report", "pages": 12}}
    assert message["data"]["cost"] == 25
    # The last command reads the call: completed, and its outcome delivered to the webhook.
    call = json.loads(out.rstrip().rsplit("\n", 1)[-1])
    assert call["request_id"] == message["data"]["request_id"]
    assert (call["status"], call["outcome"]) == ("delivered", "completed"), call
