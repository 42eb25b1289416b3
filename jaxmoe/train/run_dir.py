"""The run directory a `jaxmoe train` writes into, checked before anything is built."""

from __future__ import annotations

from pathlib import Path

from jaxmoe.config_schema import ConfigError


def check_run_dir(run_dir: Path) -> None:
    """A run directory is new, empty, or a run (it has the config.yaml every run writes
    first): training into a folder of other files would scatter checkpoints among them."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: is a file; expected a directory")
    ancestor = run_dir.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not run_dir.exists() and not ancestor.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: {ancestor} is a file; expected a path whose "
                          "folders are folders")
    if run_dir.is_dir() and not (run_dir / "config.yaml").is_file() and any(run_dir.iterdir()):
        raise ConfigError(
            f"--run-dir {run_dir}: holds other files and no jaxmoe run (no config.yaml); "
            "expected a new or empty directory, or a run to resume")
