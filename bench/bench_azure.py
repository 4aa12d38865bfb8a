"""Benchmark of azure_vhd: the VHD step, a re-run of a finished build, and each step's time.

    python -m bench.bench_azure [--size-gib 30] [--data-mib 1024] [--runs 5] [--dir DIR]

Run as root (the build uses pacstrap, loop devices and mounts). Three parts, one run:

1. Step 8 (`diskimage.vhd`: append the fixed-VHD footer and rename, O(1)) on a sparse raw
   disk of `--size-gib` GiB holding `--data-mib` MiB of data, against `qemu-img convert -f
   raw -O vpc -o subformat=fixed,force_size` of the same raw image. Targets: step 8 at most
   0.1 x qemu-img's time, and the VHD's allocated blocks at most the raw's plus 1 MiB.
   (bench.bench_vhd compares `vhd.append_footer` and `vhd.from_raw` the same way.)
2. The offline build (`archkernel.demo.offline`, then `archkernel run azure_vhd`) finished,
   a re-run timed against `doit list` on the same project, `--runs` times each, alternating.
   Targets: the re-run runs no step, costs at most 1.5 x `doit list` (medians), and reads
   none of the image (bytes read, from /proc/self/io at exit, against `archkernel list`;
   with strace on the machine also: no process opens the image).
3. The time of each step of that offline build, from its `done in Xs` lines.

Everything is written under a temporary directory removed afterwards. Exit 1 if a target
is missed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from archkernel import log as logmod
from archkernel.azure import diskimage, workspace
from archkernel.host.files import temporary_directory
from archkernel.host.run import check_tools, run
from archkernel.plan import execute
from archkernel.settings import Settings, validate
from bench.bench_vhd import QEMU_CONVERT, allocated, make_raw, timed

MiB = 1 << 20
GiB = 1 << 30
REPO = Path(__file__).resolve().parent.parent
_DONE = re.compile(r"^azure_vhd:(\d\d_\w+): (done in ([0-9.]+)s|up to date)", re.MULTILINE)

# Prints the bytes its process read through read() calls when it exits, then runs a module
# as `python -m MODULE ARGS...` would.
_RCHAR = """\
import atexit, runpy, sys
def report():
    io = dict(l.split(': ') for l in open('/proc/self/io').read().splitlines())
    sys.stderr.write('RCHAR=' + io['rchar'] + '\\n')
atexit.register(report)
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(module, run_name='__main__', alter_sys=True)
except SystemExit:
    pass
"""


# --- 1. step 8 against qemu-img -------------------------------------------------------------


@dataclass
class VhdFigures:
    """Seconds (alone, and with the sync that makes the output durable) and allocations."""

    qemu: tuple[float, float]
    step: tuple[float, float]
    raw_alloc: int
    vhd_alloc: int
    qemu_alloc: int


def bench_vhd_step(work: Path, size_gib: int, data_mib: int, chunk_mib: int) -> VhdFigures:
    """Time step 8 and qemu-img convert on the same raw disk; return the figures."""
    settings = validate(
        Settings, {"workdir": str(work / "vhd-step"), "azure": {"disk_size": f"{size_gib}GiB"}}
    )
    p = workspace.paths(settings)
    p.work.mkdir(parents=True)
    start = time.perf_counter()
    make_raw(p.raw, size_gib * GiB, data_mib * MiB, chunk_mib * MiB, seed=1)
    os.sync()
    print(
        f"raw disk: {size_gib} GiB with {data_mib} MiB of data in {chunk_mib} MiB chunks, "
        f"made in {time.perf_counter() - start:.1f}s"
    )
    raw_alloc = allocated(p.raw)
    qemu_vhd = work / "qemu.vhd"
    qemu_t = timed(lambda: run([*QEMU_CONVERT, p.raw, qemu_vhd]))
    step_t = timed(lambda: execute(diskimage.vhd(settings)))
    vhd_alloc = allocated(p.vhd)
    # Untimed sanity: the same disk as qemu-img's, and nothing left of the raw name.
    run(["qemu-img", "compare", "-q", "-f", "vpc", "-F", "vpc", p.vhd, qemu_vhd])
    assert not p.raw.exists()
    return VhdFigures(qemu_t, step_t, raw_alloc, vhd_alloc, allocated(qemu_vhd))


# --- 2. and 3. the offline build, and a re-run of it ----------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCHKERNEL_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, check=False
    )


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(result.args)} failed:\n{result.stderr[-3000:]}")
    return result


def step_times(log: str) -> dict[str, float | None]:
    """Each step's `done in` seconds (None: up to date) from a run's log."""
    return {m[1]: float(m[3]) if m[3] else None for m in _DONE.finditer(log)}


def rchar(module: str, *args: str, cwd: Path) -> int:
    """Bytes read by `python -m MODULE ARGS...` (its own read() calls, at exit)."""
    result = _ok(_python("-c", _RCHAR, module, *args, cwd=cwd))
    lines = [x for x in result.stderr.splitlines() if x.startswith("RCHAR=")]
    return int(lines[-1].removeprefix("RCHAR="))


def opened_by(argv: list[str], paths: list[Path], cwd: Path) -> list[str]:
    """Which of `paths` any process of `argv` opened (strace -f), or [] without strace."""
    log = cwd / "strace.log"
    subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(log), *argv],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        check=True,
    )
    text = log.read_text()
    log.unlink()
    return [str(p) for p in paths if f'"{p}"' in text]


@dataclass
class BuildFigures:
    """The offline build's step times and what its re-runs cost."""

    steps: dict[str, float | None]
    total: float
    image_size: int
    rerun: float  # median seconds of `archkernel run azure_vhd` with nothing to do
    doit_list: float  # median seconds of `doit list`
    ran_something: list[str]  # steps a re-run ran (should be none)
    read_rerun: int  # bytes read by a re-run
    read_list: int  # ... by `archkernel list`
    read_doit_list: int  # ... by `doit list`
    opened: list[str] | None  # image files a re-run opened (None: no strace)


def bench_build(work: Path, runs: int) -> BuildFigures:
    """Build the offline image, then time and measure re-runs of it."""
    from archkernel.demo import offline

    start = time.perf_counter()
    repo = offline.build(work / "offline")
    print(f"offline repository: {time.perf_counter() - start:.1f}s")
    settings = str(repo.settings)
    project = repo.dir
    start = time.perf_counter()
    build = _ok(_python("-m", "tasks.cli", "run", "azure_vhd", "--settings", settings, cwd=project))
    total = time.perf_counter() - start
    steps = step_times(build.stderr)
    image = project / "build" / "azure" / "archlinux-azure.vhd"

    archkernel_run = ["-m", "tasks.cli", "run", "azure_vhd", "--settings", settings]
    doit_list = ["-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(project), "list"]
    doit_list.append(f"settings={settings}")
    rerun_s: list[float] = []
    list_s: list[float] = []
    ran_something = []
    for _ in range(runs):
        start = time.perf_counter()
        again = _ok(_python(*archkernel_run, cwd=project))
        rerun_s.append(time.perf_counter() - start)
        ran_something += [s for s, t in step_times(again.stderr).items() if t is not None]
        start = time.perf_counter()
        _ok(_python(*doit_list, cwd=project))
        list_s.append(time.perf_counter() - start)

    read_rerun = rchar("tasks.cli", *archkernel_run[2:], cwd=project)
    read_list = rchar("tasks.cli", "list", "--settings", settings, cwd=project)
    read_doit_list = rchar("doit", *doit_list[2:], cwd=project)
    opened = None
    if shutil.which("strace"):
        opened = opened_by([sys.executable, *archkernel_run], [image], cwd=project)
    return BuildFigures(
        steps=steps,
        total=total,
        image_size=image.stat().st_size,
        rerun=statistics.median(rerun_s),
        doit_list=statistics.median(list_s),
        ran_something=sorted(set(ran_something)),
        read_rerun=read_rerun,
        read_list=read_list,
        read_doit_list=read_doit_list,
        opened=opened,
    )


def report(args: argparse.Namespace, v: VhdFigures, b: BuildFigures) -> None:
    """Print the three tables."""
    print(f"\n1. step 8 (footer + rename) vs qemu-img convert, {args.size_gib} GiB disk")
    print(f"{'':30}{'alone':>10}{'+ sync':>10}")
    print(f"{'qemu-img convert':30}{v.qemu[0]:9.3f}s{v.qemu[1]:9.3f}s")
    print(f"{'azure_vhd:08_vhd':30}{v.step[0]:9.4f}s{v.step[1]:9.3f}s")
    print(f"{'ratio':30}{v.step[0] / v.qemu[0]:10.4f}{v.step[1] / v.qemu[1]:10.4f}")
    print(f"{'allocated: raw':30}{v.raw_alloc / MiB:9.1f} MiB")
    over = (v.vhd_alloc - v.raw_alloc) / 1024
    print(f"{'allocated: step 8 VHD':30}{v.vhd_alloc / MiB:9.1f} MiB ({over:+.0f} KiB)")
    print(f"{'allocated: qemu-img VHD':30}{v.qemu_alloc / MiB:9.1f} MiB")

    print(f"\n2. re-run of the finished offline build (median of {args.runs})")
    print(f"{'archkernel run azure_vhd':30}{b.rerun:9.3f}s  (ran: {b.ran_something or 'nothing'})")
    print(f"{'doit list':30}{b.doit_list:9.3f}s")
    print(f"{'ratio':30}{b.rerun / b.doit_list:10.2f}")
    print(f"{'bytes read: re-run':30}{b.read_rerun / 1024:9.0f} KiB")
    print(f"{'bytes read: archkernel list':30}{b.read_list / 1024:9.0f} KiB")
    print(f"{'bytes read: doit list':30}{b.read_doit_list / 1024:9.0f} KiB")
    print(f"{'image size':30}{b.image_size / MiB:9.0f} MiB")
    if b.opened is not None:
        print(f"{'image opened by the re-run':30}{'yes' if b.opened else 'no':>9}  (strace -f)")

    print("\n3. steps of the offline build (archkernel run azure_vhd)")
    for step, seconds in b.steps.items():
        print(f"{step:30}{seconds or 0:9.1f}s")
    print(f"{'whole run (wall)':30}{b.total:9.1f}s")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its figures; exit 1 if a target is missed."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_azure", description=__doc__)
    parser.add_argument("--size-gib", type=int, default=30, help="disk for step 8 (30)")
    parser.add_argument("--data-mib", type=int, default=1024, help="data on it (1024)")
    parser.add_argument("--chunk-mib", type=int, default=4, help="data chunk size (4)")
    parser.add_argument("--runs", type=int, default=5, help="re-runs and doit lists timed (5)")
    parser.add_argument("--dir", default=None, help="where to put the files (default: TMPDIR)")
    args = parser.parse_args(argv)
    logmod.setup(-1)
    check_tools(["qemu-img"], "the azure_vhd benchmark")

    with temporary_directory(prefix="bench-azure-", parent=args.dir) as work:
        v = bench_vhd_step(work, args.size_gib, args.data_mib, args.chunk_mib)
        shutil.rmtree(work / "vhd-step")
        (work / "qemu.vhd").unlink()
        b = bench_build(work, args.runs)

    report(args, v, b)
    targets = {
        "step 8 <= 0.1 x qemu-img convert": v.step[0] <= 0.1 * v.qemu[0],
        "step 8 VHD allocated <= raw + 1 MiB": v.vhd_alloc <= v.raw_alloc + MiB,
        "re-run runs no step": not b.ran_something,
        "re-run <= 1.5 x doit list": b.rerun <= 1.5 * b.doit_list,
        # `doit list` loads the same tasks and reads no image; 1 MiB more is far above noise.
        "re-run reads none of the image": b.read_rerun - b.read_doit_list < MiB and not b.opened,
    }
    print()
    for target, met in targets.items():
        print(f"{'met   ' if met else 'MISSED'} {target}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
