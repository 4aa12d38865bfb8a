"""A background command stopped through its pid file (archkernel.host.background), and
ending processes with SIGTERM then SIGKILL (archkernel.host.processes.terminate).

The commands are small Python programs: each writes its own pid to the pid file named on
its command line, as QEMU (`-pidfile PATH`) and dnsmasq (`--pid-file=PATH`) do.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.host.background import Background
from archkernel.host.processes import terminate

# argv[1] is `--pid-file=PATH` or `-pidfile PATH`; then: "ignore" SIGTERM, or "exit" at once.
PROGRAM = """\
import os, signal, sys, time
args = sys.argv[1:]
path = args[0].split("=", 1)[1] if args[0].startswith("--") else args[1]
if "ignore" in args:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "exit" in args:
    print("no address to listen on", file=sys.stderr)
    sys.exit(3)
with open(path, "w") as f:
    f.write(str(os.getpid()))
time.sleep(600)
"""


def program(pidfile: Path, *words: str, equals: bool = True) -> list[str]:
    named = [f"--pid-file={pidfile}"] if equals else ["-pidfile", str(pidfile)]
    return [sys.executable, "-c", PROGRAM, *named, *words]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("equals", [True, False])
def test_started_and_stopped_through_its_pid_file(tmp_path: Path, equals: bool) -> None:
    pidfile = tmp_path / "run" / "daemon.pid"  # its directory is made
    job = Background("daemon", program(pidfile, equals=equals), pidfile, limit=60)
    job.start(wait=10)
    pid = job.pid()
    assert pid is not None and pid == int(pidfile.read_text())
    assert alive(pid) and job.running
    job.stop()
    assert not alive(pid) and not job.running
    assert job.result is not None and job.result.returncode == -signal.SIGTERM


def test_one_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    job = Background("stubborn", program(pidfile, "ignore"), pidfile, limit=60)
    job.start(wait=10)
    job.stop()
    assert job.result is not None and job.result.returncode == -signal.SIGKILL


def test_stopped_at_once_it_is_still_found_and_ended(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    job = Background("hasty", program(pidfile), pidfile, limit=600)
    job.start()
    job.stop()  # may come before the pid file: found by its command line then
    assert not job.running
    assert job.result is not None and job.result.returncode < 0


def test_one_that_ends_before_its_pid_file_is_an_error_quoting_it(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    job = Background("dnsmasq", program(pidfile, "exit"), pidfile, limit=60)
    with pytest.raises(UserError, match="dnsmasq did not start: no address to listen on"):
        job.start(wait=10)
    assert not job.running


def test_a_missing_program_is_raised_as_it_is(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    job = Background("nothing", ["archkernel-no-such-program"], pidfile, limit=60)
    with pytest.raises(UserError, match="archkernel-no-such-program"):
        job.start(wait=10)


def test_a_pid_file_naming_another_process_is_not_trusted(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        job = Background("stale", ["true"], pidfile, limit=60)
        pidfile.write_text(str(other.pid))  # a killed run's, naming a reused pid
        assert job.pid() is None
        job.start()  # removes the stale file first
        assert not pidfile.exists()
        job.stop()
        assert other.poll() is None  # not signalled
    finally:
        other.kill()
        other.wait()


def test_terminate_ends_each_with_sigterm_or_sigkill() -> None:
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"\n"  # ignoring now
    assert terminate([polite.pid, stubborn.pid], grace=1.0) == []
    assert polite.wait(5) == -signal.SIGTERM
    assert stubborn.wait(5) == -signal.SIGKILL
    assert terminate([], grace=1.0) == []
