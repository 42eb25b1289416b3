"""Reading checkpoints without the model: a listing of their arrays, and params-only exports.

`describe(DIR)` lists every stored array (shape, dtype, sharding, bytes), the step, the data
iterator files and the config, from metadata only (no array bytes are read).
`export_params(DIR, OUT, dtype)` writes the parameters alone (optionally cast, e.g. to
bfloat16 for inference) as `OUT/params/` (same OCDBT + zarr3 format), the router selection
biases as `OUT/rest/` (never cast) and `OUT/config.json`;
`restore_params(PATH)` reads either kind back as a nested dict of arrays.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from etils import epath

from jaxmoe.checkpoint.damage import (
    CheckpointError,
    CheckpointMismatch,
    NotACheckpoint,
    check_shapes,
    explain,
    flat_names,
    older_steps_text,
    quiet_writer_thread_failures,
    write_problem,
)
from jaxmoe.checkpoint.manager import TMP_MARKER
from jaxmoe.staging import output_folder, remove_failed_staging_dir, staging_dir

EXPORT_MARKER = "export.json"


def resolve_step_dir(path: str | Path) -> Path:
    """A run directory, its `checkpoints/` folder, a step folder or an export -> the folder
    holding the arrays (the latest complete step when several are present)."""
    p = Path(os.path.abspath(path))  # normalised: no `..` in the paths it names
    if (p / "state").is_dir() or (p / EXPORT_MARKER).is_file():
        return p
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if not p.is_dir():
        what = "is a file; expected a directory" if p.is_file() else "no such directory"
        raise NotACheckpoint(f"{path}: {what}")
    steps = sorted(int(c.name) for c in p.iterdir()
                   if c.name.isdigit() and (c / "state").is_dir())
    if not steps:
        partial = [c.name for c in p.iterdir() if TMP_MARKER in c.name]
        raise (CheckpointError if partial else NotACheckpoint)(
            f"{path}: no complete checkpoint (expected a run directory, its checkpoints/ "
            "folder, a step folder holding state/, or an export)"
            + (f"; incomplete saves: {', '.join(sorted(partial))}" if partial else ""))
    return p / str(steps[-1])


def _item(step_dir: Path) -> tuple[Path, bool]:
    """(the array item's folder, whether it is an export)."""
    exported = (step_dir / EXPORT_MARKER).is_file()
    return step_dir / ("params" if exported else "state"), exported


def read_metadata(step_dir: Path, item: Path | None = None) -> dict[str, Any]:
    """The stored array metadata (a nested dict; leaves have shape, dtype, sharding)."""
    item = item or _item(step_dir)[0]
    if not (item / "_METADATA").is_file():
        raise CheckpointError(f"checkpoint {step_dir}: file {item.name}/_METADATA is missing; "
                              "the checkpoint is incomplete or damaged")
    try:
        return ocp.PyTreeCheckpointHandler().metadata(epath.Path(item)).tree
    except Exception as e:
        raise explain(e, step_dir, item.name) from e


def read_json(step_dir: Path, path: Path) -> Any:
    """The JSON file `path` of the checkpoint `step_dir` (its config, a data iterator's
    position, an export's header); a CheckpointError naming the file if it is damaged."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"checkpoint {step_dir}: file {path.relative_to(step_dir)}: not "
                              f"valid JSON ({e}); the checkpoint is damaged") from None


def read_config(step_dir: Path) -> dict[str, Any] | None:
    for path in (step_dir / "config" / "metadata", step_dir / "config.json"):
        if path.is_file():
            return read_json(step_dir, path)
    return None


def _spec(leaf: Any) -> str:
    spec = getattr(leaf.sharding, "partition_spec", None)
    if spec is None:
        return "-"
    if not any(spec):
        return "replicated"
    return "(" + ", ".join("None" if s is None else s if isinstance(s, str)
                           else "+".join(s) for s in spec) + ")"


def _bytes(leaf: Any) -> int:
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def describe(path: str | Path, *, config: bool = True) -> str:
    """A listing of the checkpoint at `path` (see `resolve_step_dir`) as text."""
    step_dir = resolve_step_dir(path)
    leaves = flat_names(read_metadata(step_dir))
    _, exported = _item(step_dir)
    if exported:  # named as in a training checkpoint: params.*, and rest.* (router biases)
        leaves = {f"params.{k}": v for k, v in leaves.items()}
        if (step_dir / "rest").is_dir():
            leaves.update({f"rest.{k}": v for k, v in
                           flat_names(read_metadata(step_dir, step_dir / "rest")).items()})
    on_disk = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())
    total = sum(_bytes(v) for v in leaves.values())
    mesh = next((dict(zip(v.sharding.axis_names, np.asarray(v.sharding.shape).tolist()))
                 for v in leaves.values() if hasattr(v.sharding, "axis_names")), None)
    header = read_json(step_dir, step_dir / EXPORT_MARKER) if exported else {}
    step = header.get("step") if exported else step_dir.name
    source = f" of {header['source']}" if header.get("source") else ""
    lines = [f"checkpoint {step_dir}" + (f" (params-only export{source})" if exported else ""),
             ("no training step" if step is None else f"step {step}")
             + f"; {len(leaves)} arrays, {_human(total)} in memory, "
             f"{_human(on_disk)} on disk"
             + (f"; saved on mesh {mesh}" if mesh else "")]
    width = max(len(n) for n in leaves) + 2
    lines.append(f"{'array':<{width}}{'shape':<22}{'dtype':<10}{'sharding':<30}{'bytes':>14}")
    for name in sorted(leaves):
        v = leaves[name]
        lines.append(f"{name:<{width}}{tuple(v.shape)!s:<22}{np.dtype(v.dtype)!s:<10}"
                     f"{_spec(v):<30}{_bytes(v):>14,}")
    groups: dict[str, int] = {}
    for name, v in leaves.items():
        groups[name.split(".")[0]] = groups.get(name.split(".")[0], 0) + _bytes(v)
    lines.append("totals: " + ", ".join(f"{g} {_human(b)}" for g, b in sorted(groups.items())))
    data = sorted(p.name for p in (step_dir / "data").glob("process_*.json"))
    if data:
        states = [read_json(step_dir, step_dir / "data" / n) for n in data]
        batches = [s.get("batches") for s in states if isinstance(s, dict)]
        lines.append(f"data iterator: {len(data)} process file(s) ({', '.join(data)}); "
                     f"batches consumed per process: {batches}")
    elif not exported:
        lines.append("data iterator: none saved")
    cfg = read_config(step_dir)
    if config and cfg is not None:
        lines.append("config:")
        lines.extend("  " + line for line in yaml.safe_dump(cfg, sort_keys=False).splitlines())
    return "\n".join(lines)


SPREAD_AXIS = "devices"


def spreader(devices: list[jax.Device] | None = None
             ) -> Callable[[tuple[int, ...]], jax.sharding.Sharding]:
    """A function of an array's shape giving where to put it so that no device holds more
    than its share: split over all `devices` (default: this process's) along the largest
    dimension their number divides; an array with no such dimension goes whole to one
    device, taking the devices in turn (never replicated)."""
    devices = list(jax.local_devices() if devices is None else devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), (SPREAD_AXIS,))
    turn = itertools.count()

    def sharding(shape: tuple[int, ...]) -> jax.sharding.Sharding:
        fits = [d for d in range(len(shape)) if shape[d] % len(devices) == 0]
        if len(devices) == 1 or not fits:
            return jax.sharding.SingleDeviceSharding(devices[next(turn) % len(devices)])
        spec = [None] * len(shape)
        spec[max(fits, key=lambda d: shape[d])] = SPREAD_AXIS
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    return sharding


def restore_params(path: str | Path, *, dtype: Any = None,
                   sharding: jax.sharding.Sharding | Callable[[tuple[int, ...]],
                                                              jax.sharding.Sharding] | None = None,
                   collection: str = "params", target: Any = None) -> Any:
    """The parameters of a training checkpoint or an export, as a nested dict of arrays.

    dtype: cast floating arrays while reading (None keeps the stored dtype); sharding: where
    every array goes, or a function of the array's shape giving that (e.g. `spreader()`;
    default: the first local device); collection: "params" or "rest" (the router selection
    biases; None when the checkpoint has none). target: a tree to read into instead (leaves
    with shape, dtype and sharding, e.g. a train state's params): the stored names and
    shapes must be its own (CheckpointMismatch), dtypes are cast to its."""
    step_dir = resolve_step_dir(path)
    try:
        return _restore_params(step_dir, dtype, sharding, collection, target)
    except CheckpointError as e:
        raise _naming_older(e, step_dir) from e


def _stored_collection(step_dir: Path, collection: str) -> tuple[Path, bool, Any]:
    """(the item folder, whether it is an export, the collection's array metadata: None for
    a "rest" the checkpoint lacks)."""
    item, exported = _item(step_dir)
    if exported:
        item = step_dir / collection
        if collection != "params" and not item.is_dir():
            return item, exported, None
    meta = read_metadata(step_dir, item)
    params_meta = meta if exported else meta.get(collection)
    if not params_meta and collection != "params":
        return item, exported, None
    if params_meta is None:
        raise CheckpointError(f"checkpoint {step_dir}: no {collection} in item {item.name}")
    return item, exported, params_meta


def check_params_fit(path: str | Path, target: Any) -> Path:
    """The step folder or export at `path`, once the names and shapes of its parameters are
    known to be `target`'s (CheckpointMismatch otherwise); reads metadata only."""
    step_dir = resolve_step_dir(path)
    check_shapes(step_dir, _stored_collection(step_dir, "params")[2], target,
                 check_dtypes=False)
    return step_dir


def _restore_params(step_dir: Path, dtype: Any, sharding: Any, collection: str,
                    target: Any = None) -> Any:
    item, exported, params_meta = _stored_collection(step_dir, collection)
    if params_meta is None:
        return None
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract_leaf(leaf):
        cast = dtype is not None and np.issubdtype(np.dtype(leaf.dtype), np.floating)
        where = sharding(tuple(leaf.shape)) if callable(sharding) else sharding
        return jax.ShapeDtypeStruct(leaf.shape, dtype if cast else leaf.dtype, sharding=where)

    if target is None:
        abstract = jax.tree.map(abstract_leaf, params_meta)
    else:
        check_shapes(step_dir, params_meta, target, check_dtypes=False)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    if not exported:
        abstract = {collection: abstract}
    args = ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=not exported)
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            out = checkpointer.restore(epath.Path(item), args=args)
    except Exception as e:
        raise explain(e, step_dir, item.name) from e
    return out if exported else out[collection]


def _naming_older(error: CheckpointError, step_dir: Path) -> CheckpointError:
    """`error`, plus the complete checkpoints older than `step_dir` of its run, if any (what
    a user of a damaged newest checkpoint can read instead). Not for a mismatch: that is the
    config's fault, and the older checkpoints would not fit it either."""
    if isinstance(error, CheckpointMismatch) or not step_dir.name.isdigit():
        return error
    older = sorted(int(c.name) for c in step_dir.parent.iterdir() if c.name.isdigit()
                   and int(c.name) < int(step_dir.name) and (c / "state").is_dir())
    if not older:
        return error
    return CheckpointError(f"{error}; {older_steps_text(older)}, e.g. "
                           f"{step_dir.parent / str(older[-1])}")


def export_params(path: str | Path, out: str | Path, *, dtype: str | None = None) -> Path:
    """Writes the parameters of the checkpoint at `path` to `out` (a new or empty folder).

    Each array is read straight into shards spread over this process's devices
    (`spreader`), so no device holds more than its share of a model that fits them
    together. One process only (the output folder is assembled and renamed locally). The
    export is assembled in a sibling temporary folder and renamed into place, so `out`
    either holds a complete export or is as it was."""
    out, problem = output_folder(out)
    if problem:
        raise CheckpointError(problem)
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise CheckpointError(f"--dtype {dtype}: expected float32, bfloat16 or float16")
    if jax.process_count() > 1:
        raise CheckpointError(f"export-params runs in one process; this is one of "
                              f"{jax.process_count()} (run it on a single host)")
    step_dir = resolve_step_dir(path)
    spread = spreader()
    params = restore_params(step_dir, dtype=None if dtype is None else jax.numpy.dtype(dtype),
                            sharding=spread)
    rest = restore_params(step_dir, collection="rest", sharding=spread)  # never cast
    try:
        tmp = staging_dir(out, sum(x.nbytes for x in jax.tree.leaves((params, rest))))
    except OSError as e:
        raise CheckpointError(f"export-params: {e}") from e
    try:
        handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)
        with quiet_writer_thread_failures(), ocp.Checkpointer(handler) as checkpointer:
            checkpointer.save(epath.Path(tmp / "params"), args=ocp.args.PyTreeSave(params))
            if rest:
                checkpointer.save(epath.Path(tmp / "rest"), args=ocp.args.PyTreeSave(rest))
        cfg = read_config(step_dir)
        if cfg is not None:
            (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        header = {"source": str(step_dir), "step": int(step_dir.name) if
                  step_dir.name.isdigit() else None, "dtype": dtype or "as stored"}
        (tmp / EXPORT_MARKER).write_text(json.dumps(header, indent=1))
        os.rename(tmp, out)  # takes the place of an empty folder atomically
    except BaseException as e:
        remove_failed_staging_dir(tmp)
        if isinstance(e, Exception) and not isinstance(e, CheckpointError):
            raise CheckpointError(f"writing {out}: {write_problem(e)}") from e
        raise
    return out
