"""The CLI's re-exec with glibc's hugetlb tunable (jaxmoe/hugepages.py).

References: the kernel's THP mode file format ("always [madvise] never": the bracketed entry
is active), glibc's GLIBC_TUNABLES syntax (colon-separated name=value), and exec semantics
(the process keeps its pid)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

from jaxmoe import hugepages

# The probe forces the THP check on, so the exec path runs wherever glibc has the tunable,
# including CI hosts whose THP mode is not `madvise`.
_PROBE = ("import jaxmoe.hugepages as h\n"
          "h._thp_madvise = lambda: True\n"
          "h.reexec_with_hugepages()\n"
          "import os\n"
          "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))\n")
_NOTE = "jaxmoe: running with GLIBC_TUNABLES="
_CAN_EXEC = sys.platform == "linux" and hugepages._glibc_has_tunable()


def _clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT, hugepages._MARK)}
    env.update(extra)
    return env


@pytest.mark.parametrize("text,madvise", [
    ("always [madvise] never\n", True), ("[always] madvise never\n", False),
    ("always madvise [never]\n", False), ("", False)])
def test_thp_mode_parsing(tmp_path, text, madvise):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert hugepages._thp_madvise(str(path)) is madvise
    assert hugepages._thp_madvise(str(tmp_path / "missing")) is False


def test_with_tunable_keeps_user_settings():
    assert hugepages.with_tunable(None) == hugepages.TUNABLE
    assert hugepages.with_tunable("") == hugepages.TUNABLE
    assert hugepages.with_tunable("glibc.pthread.rseq=0") == \
        "glibc.pthread.rseq=0:glibc.malloc.hugetlb=1"
    assert hugepages.with_tunable("glibc.malloc.hugetlb=0") is None  # the user decided


def test_wanted_conditions(monkeypatch):
    monkeypatch.setattr(hugepages, "_thp_madvise", lambda: True)
    monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(hugepages.sys, "platform", "linux")
    monkeypatch.setattr(hugepages.sys, "argv", ["jaxmoe", "train"])
    assert hugepages.wanted({})
    assert hugepages.wanted({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    for off in ("0", "false", "OFF", "no"):
        assert not hugepages.wanted({hugepages.OPT_OUT: off})
    assert not hugepages.wanted({hugepages._MARK: "done"})  # already restarted once
    monkeypatch.setattr(hugepages.sys, "argv", ["-"])  # script on stdin
    assert not hugepages.wanted({})
    monkeypatch.setattr(hugepages.sys, "argv", ["jaxmoe", "train"])
    for libc in (("glibc", "2.34"), ("", ""), ("glibc", "x")):
        monkeypatch.setattr(hugepages.platform, "libc_ver", lambda libc=libc: libc)
        assert not hugepages.wanted({})
    monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(hugepages.sys, "platform", "darwin")
    assert not hugepages.wanted({})
    monkeypatch.setattr(hugepages.sys, "platform", "linux")
    monkeypatch.setattr(hugepages, "_thp_madvise", lambda: False)
    assert not hugepages.wanted({})


def _probe(**env_extra):
    proc = subprocess.Popen([sys.executable, "-c", _PROBE], env=_clean_env(**env_extra),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    pid, tunables = out.split()
    return proc.pid, int(pid), tunables, err


@pytest.mark.skipif(not _CAN_EXEC, reason="needs Linux with glibc >= 2.35")
def test_reexec_keeps_pid_and_sets_tunable():
    popen_pid, pid, tunables, err = _probe()
    assert pid == popen_pid  # exec, not a child process
    assert tunables == hugepages.TUNABLE
    assert f"{_NOTE}{hugepages.TUNABLE} " in err and hugepages.OPT_OUT in err
    # A user's own tunables are kept, the hugetlb one appended.
    _, _, tunables, err = _probe(GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert tunables == f"glibc.malloc.arena_max=2:{hugepages.TUNABLE}" and _NOTE in err


def test_opt_outs_leave_the_process_as_started():
    for env in ({hugepages.OPT_OUT: "0"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}):
        popen_pid, pid, tunables, err = _probe(**env)
        assert tunables == env.get("GLIBC_TUNABLES", "None") and _NOTE not in err


# `jaxmoe ARGS` through cli.entry with the THP check forced on (as _PROBE), so the restart
# decision is tested on hosts whose THP mode is not `madvise` too.
_CLI = ("import sys, jaxmoe.hugepages as h\n"
        "h._thp_madvise = lambda: True\n"
        "from jaxmoe.cli import entry\n"
        "sys.argv = ['jaxmoe', *sys.argv[1:]]\n"
        "sys.exit(entry())\n")


def test_cli_restarts_for_train_only(tmp_path):
    """`train` restarts wherever glibc has the tunable, after its input was checked: a config
    error or a bad run directory gets its one line with no restart note before it; a valid
    command (here stopped after the restart by a mesh that does not fit the one CPU device)
    restarts. `info` never does; the installed console script calls `jaxmoe.__main__.entry`,
    which imports the CLI and calls `entry` (tests/test_startup_signals.py)."""
    env = _clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=1")

    def train(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _CLI, "train", "--config",
                               "configs/tiny_moe.yaml", *extra], env=env, capture_output=True,
                              text=True, timeout=120)

    bad = train("--run-dir", str(tmp_path / "bad"), "model.num_experts_per_tok=99")
    assert bad.returncode == 2 and _NOTE not in bad.stderr, bad.stderr
    assert bad.stderr.strip().startswith("jaxmoe: config error: model.num_experts_per_tok=99")
    run_dir_file = train("--run-dir", "README.md")
    assert run_dir_file.returncode == 2 and _NOTE not in run_dir_file.stderr
    assert "--run-dir README.md: is a file" in run_dir_file.stderr
    mesh = train("--run-dir", str(tmp_path / "mesh"), "mesh.data=2")
    assert mesh.returncode == 2 and "jaxmoe: mesh error" in mesh.stderr, mesh.stderr
    assert (_NOTE in mesh.stderr) == _CAN_EXEC, mesh.stderr
    assert not (tmp_path / "bad").exists()
    info = subprocess.run([sys.executable, "-c", _CLI, "info", "--config",
                           "configs/tiny_moe.yaml"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert info.returncode == 0 and _NOTE not in info.stderr
    script = importlib.metadata.entry_points(group="console_scripts", name="jaxmoe")
    assert [e.value for e in script] == ["jaxmoe.__main__:entry"]
