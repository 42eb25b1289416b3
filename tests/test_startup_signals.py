"""Ctrl-C while `jaxmoe train` starts (before the training loop's guard), and while any
`jaxmoe` command imports its CLI: exit 130 with one line. (Python's KeyboardInterrupt
landed inside XLA: it was swallowed by JAX's garbage collection callback, so the run
trained to its end, or the process crashed with a segmentation fault while compile threads
lived.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jaxmoe import startup_signals

ROOT = Path(__file__).resolve().parents[1]

# The child: SIGINT handled as in an interactive shell (a test runner may start it ignored),
# and a pause at the start of restore_or_init (which compiles the init) that says READY and
# waits for stdin to close, so the signal arrives at a known point of start-up, no sleeps.
# The pause swallows a KeyboardInterrupt as JAX's `_xla_gc_callback` did (the reported loss:
# the run then trained to its end).
CHILD = """
import signal, sys, runpy
signal.signal(signal.SIGINT, signal.default_int_handler)
from jaxmoe.checkpoint.run import RunCheckpointer
real = RunCheckpointer.restore_or_init
def paused(self, *args):
    try:
        print("READY", flush=True)
        sys.stdin.read()
    except KeyboardInterrupt:
        pass
    return real(self, *args)
RunCheckpointer.restore_or_init = paused
runpy.run_module("jaxmoe.cli", run_name="__main__")
"""


def test_ctrl_c_during_start_up_exits_130_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "JAXMOE_HUGEPAGES": "0", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "train", "--config", "configs/tiny_moe.yaml",
         "--run-dir", str(run_dir), "--no-progress", "train.steps=2", "train.eval_batches=1",
         "train.sample_tokens=0"], cwd=ROOT, env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in child.stdout:
            lines.append(line)
            if line == "READY\n":
                break
        assert lines[-1:] == ["READY\n"], "".join(lines)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(input="", timeout=600)  # closes stdin: start-up goes on
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, err[-3000:]
    assert err == "jaxmoe: interrupted (SIGINT) before training started; nothing saved\n", err
    assert "step" not in out and "checkpoint:" not in out, out
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]


def test_a_second_signal_gets_the_default_action(monkeypatch):
    """The first signal is recorded and gives the signal its default action back, so a
    second one ends the process even while the main thread is inside a compile (where no
    Python handler runs); `release` restores the handlers from before and reports it."""
    before = signal.getsignal(signal.SIGINT)
    assert startup_signals.install()
    try:
        assert signal.getsignal(signal.SIGINT) is startup_signals._handle
        startup_signals.check()  # nothing received yet
        os.kill(os.getpid(), signal.SIGINT)
        # both kinds: a supervisor's SIGTERM after a user's Ctrl-C was recorded and dropped
        assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) \
            == signal.SIG_DFL
        try:
            startup_signals.check()
            raise AssertionError("check() did not raise")
        except startup_signals.Interrupted as e:
            assert e.signum == signal.SIGINT and str(e) == "SIGINT"
    finally:
        received = startup_signals.release()
    assert received == signal.SIGINT and signal.getsignal(signal.SIGINT) is before
    assert startup_signals.release() is None


def test_multi_host_runs_keep_their_signal_handlers():
    """jax.distributed installs its own SIGTERM handler (the preemption service the training
    loop syncs on); restoring the start-up handler's saved SIG_DFL over it made a SIGTERM
    kill one process of a multi-host run at once, unsaved, while the others hung. So only
    single-process runs are guarded (reference: the flags that start jax.distributed)."""
    from types import SimpleNamespace

    from jaxmoe.cli import guards_start_up

    def args(address=None, count=None, pid=None, distributed=False):
        return SimpleNamespace(coordinator_address=address, num_processes=count,
                               process_id=pid, distributed=distributed)

    assert guards_start_up(args())
    assert not guards_start_up(args("localhost:1234", 2, 0))
    assert not guards_start_up(args(distributed=True))


# The child runs the `jaxmoe` command's entry point with a pause at the start of the CLI's
# import (a meta-path finder that says READY and waits for stdin to close), which swallows
# a KeyboardInterrupt as JAX's `_xla_gc_callback` did while JAX was being imported.
IMPORT_CHILD = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
class Pause:
    def find_spec(self, name, path=None, target=None):
        if name == "jaxmoe.cli":
            sys.meta_path.remove(self)
            try:
                print("READY", flush=True)
                sys.stdin.read()
            except KeyboardInterrupt:
                pass
        return None
sys.meta_path.insert(0, Pause())
from jaxmoe.__main__ import entry
sys.argv = ["jaxmoe", "info", "--config", "configs/tiny_moe.yaml"]
sys.exit(entry())
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_cli_is_imported_ends_the_command(sig):
    """`jaxmoe CMD` holds Ctrl-C and SIGTERM while its CLI is imported (about a second,
    twice for `train`): one line, exit 128 + the signal, and the command does not run.
    (A Ctrl-C there printed a page of import traceback, or was swallowed and `jaxmoe train`
    trained to its end; reference: `jaxmoe info` prints its table when not interrupted.)"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", IMPORT_CHILD], cwd=ROOT, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "READY\n"
        child.send_signal(sig)
        out, err = child.communicate(input="", timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    name = signal.Signals(sig).name
    assert (child.returncode, err, out) == (128 + sig, f"jaxmoe: interrupted ({name})\n", "")


def test_the_paused_child_runs_the_command_when_not_interrupted():
    """The reference for the test above: the same child, no signal, prints `jaxmoe info`."""
    done = subprocess.run([sys.executable, "-c", IMPORT_CHILD], cwd=ROOT, input="",
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "\nrouted_experts " in done.stdout, done.stderr[-2000:]


def test_the_entry_point_imports_none_of_the_dependencies():
    """What the guard relies on: importing `jaxmoe.__main__` (the console script's module)
    imports none of jaxmoe's dependencies, so nothing before the guard takes long."""
    code = ("import sys, jaxmoe.__main__\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib', 'flax', "
            "'numpy', 'optax', 'orbax', 'grain', 'tensorstore', 'yaml', 'tqdm'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.returncode == 0 and out.stdout == "[]\n", (out.stdout, out.stderr)
