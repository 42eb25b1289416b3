"""The CLI's re-exec with glibc's hugetlb tunable (jaxmoe/hugepages.py).

References: the kernel's THP mode file format ("always [madvise] never", the bracketed entry
is active) and exec semantics (the process keeps its pid)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxmoe import hugepages

_PROBE = ("from jaxmoe.hugepages import reexec_with_hugepages\n"
          "reexec_with_hugepages()\n"
          "import os\n"
          "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))\n")


@pytest.mark.parametrize("text,enabled", [
    ("always [madvise] never\n", True), ("[always] madvise never\n", True),
    ("always madvise [never]\n", False), ("", False)])
def test_thp_mode_parsing(tmp_path, text, enabled):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert hugepages._thp_enabled(str(path)) is enabled
    assert hugepages._thp_enabled(str(tmp_path / "missing")) is False


def test_wanted_respects_user_settings(monkeypatch):
    monkeypatch.setattr(hugepages, "_thp_enabled", lambda: True)
    monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(hugepages.sys, "platform", "linux")
    assert hugepages.wanted({})
    assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})
    assert not hugepages.wanted({hugepages.OPT_OUT: "0"})
    assert not hugepages.wanted({hugepages._MARK: "done"})  # already restarted once
    monkeypatch.setattr(hugepages, "_thp_enabled", lambda: False)
    assert not hugepages.wanted({})


def _probe(**env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT, hugepages._MARK)}
    env.update(env_extra)
    proc = subprocess.Popen([sys.executable, "-c", _PROBE], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    pid, tunables = out.split()
    return proc.pid, int(pid), tunables, err


def test_reexec_keeps_pid_and_sets_tunable():
    popen_pid, pid, tunables, err = _probe()
    assert pid == popen_pid  # exec, not a child process
    if hugepages.wanted({}):
        assert tunables == hugepages.TUNABLE
        assert "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in err and hugepages.OPT_OUT in err
    else:  # no glibc / THP off on this machine: nothing happens, silently
        assert tunables == "None" and err == ""


def test_opt_out_and_user_tunables_are_left_alone():
    assert _probe(**{hugepages.OPT_OUT: "0"})[2:] == ("None", "")
    assert _probe(GLIBC_TUNABLES="glibc.malloc.arena_max=2")[2:] == (
        "glibc.malloc.arena_max=2", "")


def test_cli_restarts_for_train_only():
    """`train` (here stopped by a config error before anything compiles) restarts; `info`
    does not."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT, hugepages._MARK)}
    note = "GLIBC_TUNABLES=glibc.malloc.hugetlb=1"
    train = subprocess.run([sys.executable, "-m", "jaxmoe.cli", "train", "--config",
                            "configs/tiny_moe.yaml", "--run-dir", "unused",
                            "model.num_experts_per_tok=99"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert train.returncode == 2 and "model.num_experts_per_tok" in train.stderr
    assert (note in train.stderr) == hugepages.wanted(env)
    info = subprocess.run([sys.executable, "-m", "jaxmoe.cli", "info", "--config",
                           "configs/tiny_moe.yaml"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert info.returncode == 0 and note not in info.stderr
