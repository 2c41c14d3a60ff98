"""``--log-format json`` (koala._logging): a real ``koala dev`` whose every log line is a
JSON object with the time, level, logger and message, the actor of the turn that logged,
the trace id of the current span, and an exception's traceback."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from koala._errors import ConfigError
from koala._logging import configure_logging
from koala.testing import free_port

from ._logging_app import SPAN_ID, TRACE_ID

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "tests" / "_logging_app.py")
STARTUP = 30.0  # a bound on start-up under load


def parse(lines: list[str]) -> list[dict[str, Any]]:
    records = []
    for line in lines:
        record = json.loads(line)  # every line, or the test fails here naming it
        assert isinstance(record, dict), line
        for name in ("time", "level", "logger", "message"):
            assert isinstance(record[name], str), (name, line)
        assert record["time"].endswith("Z")
        datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        records.append(record)
    return records


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_koala_dev_logs_json_lines(tmp_path: Path, backend: str) -> None:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), KOALA_BACKEND=backend)
    env["KOALA_LOG_FORMAT"] = "text"  # the flag wins over its environment twin
    stdout, stderr = tmp_path / "out.log", tmp_path / "err.log"
    cmd = [sys.executable, "-m", "koala.cli", "dev", APP, "--http", f"127.0.0.1:{port}"]
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [*cmd, "--log-format", "json"], cwd=ROOT, env=env, stdout=out, stderr=err
        )
    try:
        deadline = time.monotonic() + STARTUP
        while "HTTP on" not in stdout.read_text():
            assert proc.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/speak/k-7", timeout=30).json() == "hello"
        broke = httpx.get(f"{base}/boom", timeout=30)
        assert broke.status_code == 500
        assert httpx.get(f"{base}/traced", timeout=30).json() == "ok"
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr.read_text()
    records = parse(stderr.read_text().splitlines())

    said = [r for r in records if r["message"] == "actor says hello"]
    assert len(said) == 1, records
    assert said[0]["logger"] == "tests.logging_app"
    assert said[0]["level"] == "INFO"
    assert (said[0]["actor_type"], said[0]["actor_key"]) == ("Chatty", "k-7")
    assert "trace_id" not in said[0]  # no span was current there

    failed = [r for r in records if "traceback" in r]
    assert len(failed) == 1, failed  # logged once
    assert failed[0]["logger"] == "koala.http"
    assert failed[0]["level"] == "ERROR"
    assert "GET /boom" in failed[0]["message"]
    assert "ValueError: the route broke on purpose" in failed[0]["traceback"]
    assert "actor_type" not in failed[0]  # a route, not a turn

    traced = [r for r in records if r["message"] == "inside a span"]
    assert len(traced) == 1, records
    assert traced[0]["trace_id"] == format(TRACE_ID, "032x")
    assert traced[0]["span_id"] == format(SPAN_ID, "016x")
    assert any(r["logger"] == "koala.pd.client" for r in records)  # Koala's own lines too


def test_text_stays_the_default_and_bad_settings_are_clear() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("text", "INFO", stream=stream)
        logging.getLogger("koala.test").info("plain %d", 1)
        assert stream.getvalue().rstrip().endswith("INFO koala.test: plain 1")
        configure_logging("json", "warning", stream=stream)
        logging.getLogger("koala.test").info("not shown")
        assert "not shown" not in stream.getvalue()
        with pytest.raises(ConfigError, match="log format must be one of text, json"):
            configure_logging("yaml", "INFO")
        with pytest.raises(ConfigError, match="unknown log level"):
            configure_logging("json", "LOUD")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_json_lines_escape_newlines_and_carry_exceptions() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("json", "DEBUG", stream=stream)
        try:
            raise KeyError("k")
        except KeyError:
            logging.getLogger("koala.test").exception("two\nlines")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    (record,) = parse(lines)
    assert record["message"] == "two\nlines"
    assert "KeyError: 'k'" in record["traceback"]
    assert "actor_type" not in record
    assert "trace_id" not in record


def test_the_cli_refuses_a_bad_log_format() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), KOALA_LOG_FORMAT="xml")
    done = subprocess.run(
        [sys.executable, "-m", "koala.cli", "status", "--pd", "http://127.0.0.1:1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert "KOALA_LOG_FORMAT='xml'" in done.stderr
    assert "text, json" in done.stderr
