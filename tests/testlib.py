"""Helpers shared by the Python tests: a failure list with one-line reports, running the binary or
one of the test tool programs (tests/tools/*.c, built next to the tokenformer binary), and the
exit status of a test."""

import subprocess

failures = []


def report(name, ok, detail):
    """check() for a named comparison with its measured detail."""
    check(ok, f"{name}: {detail}")


def run_program(program, *args, stdin=None):
    """stdout of program with args; a non-zero exit raises with its stderr."""
    result = subprocess.run([program, *map(str, args)], input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{program} {' '.join(map(str, args))} failed: {result.stderr.strip()}")
    return result.stdout


def check(condition, message):
    """One line per check: ok or FAIL, and what was checked; returns the condition."""
    print(("  ok   " if condition else "  FAIL ") + message, flush=True)
    if not condition:
        failures.append(message)
    return condition


def run_command(command, expect=0, separate_stderr=False):
    """Runs command (its arguments made strings); when the exit status is not expect (None: any
    is), prints the command and the end of its output. stderr goes into stdout unless
    separate_stderr (predict --json prints JSON on stdout and logs on stderr)."""
    result = subprocess.run([str(c) for c in command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if separate_stderr else subprocess.STDOUT, text=True)
    if expect is not None and result.returncode != expect:
        print(f"  command: {' '.join(map(str, command))[:300]}")
        print(f"  exit {result.returncode}; output: {result.stdout[-3000:]}")
        if separate_stderr:
            print(f"  stderr: {result.stderr[-1500:]}")
    return result


def exit_status(test):
    """What a test's main() returns: 1 after any failure; the count is printed."""
    print(f"{test}: {len(failures)} failure(s)")
    return 1 if failures else 0
