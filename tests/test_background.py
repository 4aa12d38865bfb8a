"""A background command stopped through its pid file (archkernel.host.background), and
ending processes with SIGTERM then SIGKILL (archkernel.host.processes.terminate).

The commands are small Python programs: each writes its own pid to the pid file named on
its command line, as QEMU (`-pidfile PATH`) and dnsmasq (`--pid-file=PATH`) do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archkernel.errors import UserError
from archkernel.host.background import Background
from archkernel.host.processes import terminate
from tests.support.processes import alive

# argv[1] is `--pid-file=PATH` or `-pidfile PATH`; then: "ignore" SIGTERM, "exit" at once,
# or be "slow" to write the pid file.
PROGRAM = """\
import os, signal, sys, time
args = sys.argv[1:]
path = args[0].split("=", 1)[1] if args[0].startswith("--") else args[1]
if "ignore" in args:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "exit" in args:
    print("no address to listen on", file=sys.stderr)
    sys.exit(3)
if "slow" in args:
    time.sleep(600)
with open(path, "w") as f:
    f.write(str(os.getpid()))
time.sleep(600)
"""


def program(pidfile: Path, *words: str, equals: bool = True) -> list[str]:
    named = [f"--pid-file={pidfile}"] if equals else ["-pidfile", str(pidfile)]
    return [sys.executable, "-c", PROGRAM, *named, *words]


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


def test_stopped_before_its_pid_file_it_is_found_by_its_command_line(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    # `limit` would end it after 60 s; found in /proc, it gets SIGTERM at once.
    job = Background("hasty", program(pidfile, "slow"), pidfile, limit=60)
    job.start()
    job.stop()
    assert not job.running and not pidfile.exists()
    assert job.result is not None and job.result.returncode == -signal.SIGTERM


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
    job = Background("job", program(pidfile, "slow", equals=False), pidfile, limit=60)
    job.start()
    # Another run's command naming the same pid file (not our child: a shell left it
    # running on its own) writes it.
    subprocess.run(["sh", "-c", '"$@" & exit 0', "sh", *program(pidfile)], check=True)
    deadline = time.monotonic() + 30  # bounds the test, not a speed expected of it
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the other command wrote no pid file"
        time.sleep(0.05)
    other = int(pidfile.read_text())
    try:
        assert job.pid() is None
        job.stop()  # finds the job by its command line, as our child
        assert not job.running
        assert job.result is not None and job.result.returncode == -signal.SIGTERM
        assert Path(f"/proc/{other}/cmdline").read_bytes().endswith(f"={pidfile}\0".encode())
    finally:
        os.kill(other, signal.SIGKILL)


def test_terminate_ends_each_with_sigterm_or_sigkill() -> None:
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"\n"  # ignoring now
    assert terminate([polite.pid, stubborn.pid], grace=3.0) == []
    assert polite.wait(5) == -signal.SIGTERM
    assert stubborn.wait(5) == -signal.SIGKILL
    assert terminate([], grace=1.0) == []
