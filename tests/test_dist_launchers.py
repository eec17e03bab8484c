"""The rendezvous of train/dist.h under real launchers, with CPU processes
(tests/tools/dist_rendezvous_check.c): each rank must learn its rank, meet rank 0 and receive its
blob, whichever way it was started.

Run as: /usr/bin/python3 tests/test_dist_launchers.py TOKENFORMER_BINARY SCRATCH_DIR
- torchrun with a static rendezvous (--master_port): its agent serves a TCP store of its own on
  MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE=True), so rank 0 must listen on MASTER_PORT + 1;
- torchrun --standalone (c10d rendezvous): MASTER_PORT as the agent hands it out;
- OpenMPI's mpirun, where one is installed (a SKIP line otherwise).
Needs python3-torch (for torchrun).
"""
import os
import re
import shutil
import socket
import subprocess
import sys

from testlib import check, exit_status

LINE = re.compile(r"rank (\d+) of (\d+) \((\w+), local rank (\d+)\): rendezvous at (\S+):(\d+) \((.*)\), "
                  r"blob from rank 0 (\d+)$")


def free_port():
    """A port nothing listens on, with the one after it free too (the static case needs both)."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port < 65535:
            with socket.socket() as next_probe:
                try:
                    next_probe.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    pass
    raise RuntimeError("no two free consecutive ports")


def rendezvous(name, command, world, launcher, port=None, port_from=None):
    """Runs command; every rank must print its line, all with the same rendezvous and blob."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    ranks = {}
    for line in result.stdout.splitlines():
        match = LINE.search(line)
        if match:
            ranks[int(match.group(1))] = match.groups()
    if not check(result.returncode == 0 and sorted(ranks) == list(range(world)),
                 f"{name}: exit {result.returncode}, ranks {sorted(ranks)} reported (expected 0..{world - 1})"):
        print(result.stdout[-2000:], result.stderr[-3000:])
        return
    seen = {(r[1], r[2], r[5], r[7]) for r in ranks.values()}  # world, launcher, port, rank 0's blob
    check(len(seen) == 1 and next(iter(seen))[:2] == (str(world), launcher),
          f"{name}: all ranks agree on world size {world}, launcher {launcher}, port and blob: {sorted(seen)}")
    if port is not None:
        actual = ranks[0]
        check(int(actual[5]) == port and port_from in actual[6],
              f"{name}: rendezvous on port {actual[5]} ({actual[6]}), expected {port} ({port_from}...)")


def main():
    tool = os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), "dist_rendezvous_check")
    # Debian's torch 1.13 on Python 3.11 cannot parse torchrun's default --redirects/--tee of "0"
    # (IntFlag iteration skips zero); "1" (stdout, teed to ours) parses in every version.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--redirects", "1",
                "--tee", "1"]
    port = free_port()
    rendezvous("torchrun, static rendezvous", torchrun + ["--nnodes", "1", "--master_port", str(port),
                                                         "--no_python", tool],
               2, "torchrun", port + 1, "MASTER_PORT + 1")
    rendezvous("torchrun --standalone", torchrun + ["--standalone", "--no_python", tool], 2, "torchrun")
    mpirun = shutil.which("mpirun")
    if mpirun:
        rendezvous("mpirun -np 2", [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", tool], 2, "openmpi")
    else:
        print("  SKIP mpirun: not installed here (OpenMPI's launcher is checked where it is)")
    return exit_status("test_dist_launchers")


if __name__ == "__main__":
    sys.exit(main())
