"""Helpers shared by the Python tests: a failure list with one-line reports, and running one of
the test tool programs (tests/tools/*.c, built next to the tokenformer binary)."""

import subprocess

failures = []


def report(name, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        failures.append(name)


def run_program(program, *args, stdin=None):
    """stdout of program with args; a non-zero exit raises with its stderr."""
    result = subprocess.run([program, *map(str, args)], input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{program} {' '.join(map(str, args))} failed: {result.stderr.strip()}")
    return result.stdout
