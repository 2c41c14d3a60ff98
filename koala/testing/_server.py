"""What every real server the test kit starts shares: its directory, its log, stopping."""

from __future__ import annotations

import shutil
import subprocess


class ServerProcess:
    """A server process with its own temporary directory ``dir`` and log file."""

    dir: str
    log_path: str
    proc: subprocess.Popen[bytes] | None

    def log(self) -> str:
        """The end of the server's output (for a failed test's report)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the process (its directory stays, so it can start again)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def destroy(self) -> None:
        """Stop it and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
