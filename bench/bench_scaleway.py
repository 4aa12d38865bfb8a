"""Benchmark: the cached boot path of scaleway_kexec against importing its dependencies.

On every boot of a C1 whose initrd is already patched, `archkernel run scaleway_kexec`
checks the machine, fetches the bootscript, finds it unchanged, and kexecs: that is the
time the tool adds to every boot on a slow ARM CPU. The target is at most 1.5 times the
time a bare interpreter takes to `import doit, tftpy, libarchive, pydantic`, measured in
the same run.

Against the fake C1 of the tests (tests/support/c1.py: in.tftpd on loopback, stand-in
kexec and systemctl that record their arguments): one full run first, then the commands
interleaved, `--reps` times each. Prints best and median wall time of each and the ratio
of the medians. For context it also times the same boot with its settings validated again
(the validated-settings cache removed before each run) and the dependencies imported as
they are used (`import pydantic` alone is lazy). Run as root from the repository root:

    python -m bench.bench_scaleway [--reps 15]

`--profile` also prints the slowest imports of one cached run (`python -X importtime`).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from archkernel.settings import CACHE_FILE
from tests.support.c1 import FakeC1, archkernel_command, c1_template, serving, write_executable

TARGET = 1.5
IMPORTS = "import doit, tftpy, libarchive, pydantic"
IMPORTS_IN_USE = "import doit.doit_cmd, tftpy, libarchive; from pydantic import BaseModel"


def children_cpu() -> float:
    """CPU time (user + system) of every waited-for child and grandchild so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall time and CPU time of one run of `argv` (the CPU time minds the load less)."""
    start, start_cpu = time.perf_counter(), children_cpu()
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed, cpu = time.perf_counter() - start, children_cpu() - start_cpu
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stderr}")
    return elapsed, cpu


def importtime(argv: list[str], env: dict[str, str], cwd: Path, top: int = 15) -> str:
    """The slowest imports (cumulative microseconds) of one run of `argv`."""
    python = [sys.executable, "-X", "importtime"]
    if argv[0].endswith("archkernel"):
        argv = [*python, "-m", "tasks.cli", *argv[1:]]
    else:
        argv = [*python, *argv[1:]]
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    rows = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = (part.strip() for part in line.split("|"))
            if cumulative.isdigit():
                rows.append((int(cumulative), name))
    rows.sort(reverse=True)
    return "\n".join(f"  {us / 1000:8.1f} ms  {name}" for us, name in rows[:top])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="runs of each command (default 15)")
    parser.add_argument("--profile", action="store_true", help="show the slowest imports")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: in.tftpd chroots into its directory", file=sys.stderr)
        return 1

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-scaleway-") as tmp:
        base = Path(tmp)
        c1 = FakeC1.create(base / "c1", c1_template(base / "template"))
        # On a C1, kexec and systemctl are C programs: time the tool, not Python stand-ins.
        # These shell stand-ins record their arguments as the tests' do (one line a call).
        shell_calls = base / "calls.txt"
        for name in ("kexec", "systemctl"):
            write_executable(
                c1.bin / name, f'#!/bin/sh\nprintf "{name} %s\\n" "$*" >> {shell_calls}\n'
            )
        with serving(c1):
            # Installed, the package ships bytecode; this checkout may run with
            # PYTHONDONTWRITEBYTECODE. Both commands cache bytecode in a private prefix,
            # warmed by the first runs, so neither compiles on the timed runs.
            env = c1.env(PYTHONPYCACHEPREFIX=str(base / "pycache"))
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            cached = [
                *archkernel_command(),
                "run",
                "scaleway_kexec",
                "--settings",
                str(c1.settings),
            ]
            cache = c1.workdir / CACHE_FILE
            commands = {
                "archkernel run scaleway_kexec (cached)": cached,
                f"python -c '{IMPORTS}'": [sys.executable, "-c", IMPORTS],
                # For context: the same boot validating its settings (no cache); the
                # imports as used (`import pydantic` loads pydantic lazily; BaseModel
                # loads the rest); and one call of a stand-in.
                "the same boot, settings validated again": cached,
                "the imports as used (doit.doit_cmd, pydantic.BaseModel)": [
                    sys.executable,
                    "-c",
                    IMPORTS_IN_USE,
                ],
                "one call of the stand-in kexec (2 per run)": [str(c1.bin / "kexec")],
            }
            uncached = "the same boot, settings validated again"
            full, _ = timed(cached, env, c1.base)  # builds the patched initrd
            for argv in commands.values():  # warm the page and bytecode caches
                timed(argv, env, c1.base)
            times: dict[str, list[tuple[float, float]]] = {label: [] for label in commands}
            for _ in range(args.reps):
                for label, argv in commands.items():
                    if label == uncached:
                        cache.unlink()  # the run writes it again
                    times[label].append(timed(argv, env, c1.base))
                    if label.endswith("(cached)") and not cache.is_file():
                        raise SystemExit(f"the run left no {cache}: it was not a cached run")
            calls = [line.split() for line in shell_calls.read_text().splitlines()]
            profile = profile_deps = ""
            if args.profile:
                profile = importtime(cached, env, c1.base)
                profile_deps = importtime(commands[f"python -c '{IMPORTS}'"], env, c1.base)

    kexecs = sum(1 for call in calls if call[:2] == ["kexec", "-l"])
    if kexecs != 2 * args.reps + 3:
        print(
            f"expected {2 * args.reps + 3} kexec -l calls, the stand-in saw {kexecs}",
            file=sys.stderr,
        )
        return 1
    medians = {
        label: tuple(statistics.median(x) for x in zip(*runs, strict=True))
        for label, runs in times.items()
    }
    ours, deps, validated, in_use = list(medians)[:4]
    ratio = medians[ours][0] / medians[deps][0]
    print(f"scaleway_kexec cached boot path, {args.reps} runs each (load {load_before:.2f})")
    print(f"  first run (builds the initrd): {full:.3f} s")
    print(f"  {'':<62} wall best  median    CPU median")
    for label, runs in times.items():
        best = min(wall for wall, _ in runs)
        wall, cpu = medians[label]
        print(f"  {label:<62} {best:6.3f} s {wall:6.3f} s   {cpu:6.3f} s")
    verdict = "ok" if ratio <= TARGET else "above target"
    print(
        f"  ratio to the bare `{IMPORTS}` (row 2): wall {ratio:.2f} "
        f"(target <= {TARGET}: {verdict}), CPU {medians[ours][1] / medians[deps][1]:.2f}"
    )
    print(
        f"  ratio to the imports as used (row 4): wall {medians[ours][0] / medians[in_use][0]:.2f}"
    )
    again = medians[validated][0] / medians[ours][0]
    print(f"  validating the settings again (row 3) costs {again:.2f} times the cached boot")
    if args.profile:
        print("slowest imports of a cached run (cumulative):")
        print(profile)
        print(f"slowest imports of `{IMPORTS}` (cumulative):")
        print(profile_deps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
