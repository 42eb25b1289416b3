"""Reading and writing jaxmoe parameters in orbax's on-disk layout, one slice at a time.

Arrays are addressed by canonical names (`params.moe.units.block0.attn.q.value`: the pytree
path of `{"params": nnx.State, "rest": nnx.State}` joined by dots, as orbax names them) and
read or written directly with TensorStore, so a conversion touches one array, or one layer of
a `[layers, ...]` array, at a time instead of restoring the whole pytree.

Accepted inputs (`resolve_checkpoint`): a run directory (its latest `checkpoints/<step>`), a
`checkpoints/` directory, a step directory (item `state` holds `params` and `rest`, item
`config` the resolved config), or a params-only export (`export.json` marker, items `params`
and `rest`, `config.json`) as `jaxmoe checkpoint export-params` and `from-hf` write it.

`ParamsWriter` writes such an export: zarr3 arrays, one directory per array, stacked arrays
chunked one layer per chunk so later reads stream by layer, plus the `_METADATA` tree file
orbax restores from. It is built in a temporary sibling directory and renamed into place when
complete, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import ast
import collections
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tensorstore as ts
from flax import nnx

from input_pipeline.sources import one_line
from jaxmoe import config as config_lib
from jaxmoe.checkpoint.damage import explain, write_problem
from jaxmoe.model import MoETransformer
from jaxmoe.staging import output_folder, staging_dir

STATE_ITEM, CONFIG_ITEM = "state", "config"
CONFIG_FILE = "metadata"  # orbax JsonCheckpointHandler's file name inside the config item
EXPORT_MARKER, EXPORT_CONFIG = "export.json", "config.json"  # params-only exports
COLLECTIONS = ("params", "rest")  # export items, and the top-level keys inside `state`


class CheckpointFormatError(ValueError):
    """A path is not a jaxmoe checkpoint, or it lacks an array (one line)."""


def array_name(path: Sequence[Any]) -> str:
    """Orbax's name for the leaf at pytree `path`: its keys (dict keys, attribute names,
    sequence indices) joined by dots."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def abstract_params(cfg: config_lib.ModelConfig) -> tuple[Any, dict[str, Any]]:
    """(graphdef, {orbax name: ShapeDtypeStruct}) of the model `cfg` builds (nothing allocated)."""
    model = nnx.eval_shape(lambda: MoETransformer(cfg, nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path({"params": params, "rest": rest})[0]:
        flat[array_name(path)] = leaf
    return graphdef, flat


def fill_state(cfg: config_lib.ModelConfig, arrays: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(graphdef, params, rest) of model `cfg` with every leaf taken from `arrays` (by name)."""
    model = nnx.eval_shape(lambda: MoETransformer(cfg, nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def take(path, leaf):
        name = array_name(path)
        value = arrays[name]
        if tuple(value.shape) != tuple(leaf.shape):
            raise CheckpointFormatError(f"array {name}: shape {tuple(value.shape)}, the config "
                                        f"expects {tuple(leaf.shape)}")
        return jax.numpy.asarray(value, dtype=leaf.dtype)

    tree = jax.tree_util.tree_map_with_path(take, {"params": params, "rest": rest})
    return graphdef, tree["params"], tree["rest"]


def resolve_checkpoint(path: str | Path) -> Path:
    """The step directory or export that `path` names (see the module docstring)."""
    path = Path(os.path.abspath(path))  # no `..`: tensorstore's file driver refuses them
    if not path.is_dir():
        what = "is a file; expected a directory" if path.is_file() else "no such directory"
        raise CheckpointFormatError(f"{path}: {what}")
    for candidate in (path, path / "checkpoints"):
        if (candidate / STATE_ITEM).is_dir() or (candidate / EXPORT_MARKER).is_file():
            return candidate
        steps = [p for p in candidate.iterdir() if p.name.isdigit() and (p / STATE_ITEM).is_dir()
                 ] if candidate.is_dir() else []
        if steps:
            return max(steps, key=lambda p: int(p.name))
    raise CheckpointFormatError(f"{path}: not a jaxmoe checkpoint (expected a run directory, a "
                                "step directory with a 'state' item, or a params-only export)")


def _config_from_dict(values: dict[str, Any]) -> config_lib.Config:
    return config_lib.config_from_dict(values)


def _read_tree_names(item_dir: Path) -> tuple[list[str], bool, bool]:
    """(array names, use_ocdbt, use_zarr3) from an orbax item's `_METADATA`."""
    path = item_dir / "_METADATA"
    try:
        meta = json.loads(path.read_text())
        names = [".".join(ast.literal_eval(k)) for k in meta["tree_metadata"]]
    except (ValueError, SyntaxError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointFormatError(f"{path}: not orbax tree metadata ({type(e).__name__}: "
                                    f"{one_line(e)}; damaged checkpoint?)") from None
    return names, bool(meta.get("use_ocdbt", True)), bool(meta.get("use_zarr3", False))


class ParamsReader:
    """Random access to the arrays of a checkpoint: `read(name, start, stop)` reads the slice
    `[start:stop]` of the leading (layers) axis, or everything when start is None.

    `names` holds canonical names; `missing_rest` is True for an export without a `rest`
    item (router selection biases unknown)."""

    def __init__(self, path: str | Path):
        self.step_dir = resolve_checkpoint(path)
        exported = (self.step_dir / EXPORT_MARKER).is_file()
        config_file = self.step_dir / (EXPORT_CONFIG if exported
                                       else f"{CONFIG_ITEM}/{CONFIG_FILE}")
        items = ([self.step_dir / c for c in COLLECTIONS] if exported
                 else [self.step_dir / STATE_ITEM])
        required = [config_file] + [i / "_METADATA" for i in items if i.name != "rest"]
        for f in required:
            if not f.is_file():
                raise CheckpointFormatError(f"{self.step_dir}: {f.relative_to(self.step_dir)} "
                                            "is missing (incomplete or not a jaxmoe checkpoint)")
        try:
            stored = json.loads(config_file.read_text())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise CheckpointFormatError(f"{config_file}: not a JSON config ({one_line(e)}; "
                                        "damaged checkpoint?)") from None
        self.config = _config_from_dict(stored)
        self.header: dict[str, Any] = {}  # an export's export.json
        if exported:
            try:
                self.header = json.loads((self.step_dir / EXPORT_MARKER).read_text())
            except ValueError as e:
                raise CheckpointFormatError(f"{self.step_dir / EXPORT_MARKER}: not JSON "
                                            f"({one_line(e)}; damaged checkpoint?)") from None
            if not isinstance(self.header, dict):
                raise CheckpointFormatError(f"{self.step_dir / EXPORT_MARKER}: expected a "
                                            "JSON object (damaged checkpoint?)")
        self.missing_rest = exported and not (self.step_dir / "rest" / "_METADATA").is_file()
        # canonical name -> (item directory, stored name, use_ocdbt, use_zarr3)
        self._where: dict[str, tuple[Path, str, bool, bool]] = {}
        for item in items:
            if not (item / "_METADATA").is_file():
                continue
            names, ocdbt, zarr3 = _read_tree_names(item)
            for name in names:
                canonical = f"{item.name}.{name}" if exported else name
                self._where[canonical] = (item, name, ocdbt, zarr3)
        self.names = set(self._where)
        self.zeros: dict[str, np.ndarray] = {}  # stand-ins for absent arrays (`assume_zero`)
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self._stores: dict[str, Any] = {}

    def assume_zero(self, name: str, shape: tuple[int, ...], dtype: Any) -> None:
        """Reads of the absent array `name` return zeros (an export without router biases)."""
        self.zeros[name] = np.zeros(shape, dtype)

    def store(self, name: str) -> Any:
        if name in self.zeros:
            return self.zeros[name]
        if name not in self._where:
            raise CheckpointFormatError(f"checkpoint {self.step_dir}: array {name} is missing")
        if name not in self._stores:
            item, stored, ocdbt, zarr3 = self._where[name]
            kvstore = ({"driver": "ocdbt", "base": f"file://{item}", "path": stored} if ocdbt
                       else {"driver": "file", "path": str(item / stored)})
            spec = {"driver": "zarr3" if zarr3 else "zarr", "kvstore": kvstore,
                    "recheck_cached_data": False, "recheck_cached_metadata": False}
            try:
                self._stores[name] = ts.open(spec, read=True, context=self._context).result()
            except ValueError as e:  # missing or damaged array metadata
                raise CheckpointFormatError(str(explain(e, self.step_dir))) from e
        return self._stores[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.store(name).shape)

    def layers_per_chunk(self, name: str) -> int:
        """How many entries of the leading axis one stored chunk spans (1: per-layer chunks)."""
        store = self.store(name)
        if isinstance(store, np.ndarray):  # a zero stand-in: one "chunk"
            return store.shape[0] if store.ndim else 1
        return int(store.chunk_layout.read_chunk.shape[0]) if store.rank else 1

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        store = self.store(name)
        if start is not None:
            store = store[start:stop]
        if isinstance(store, np.ndarray):
            return store.copy()
        try:
            return np.asarray(store.read().result())
        except ValueError as e:  # TensorStore: a truncated, missing or corrupt data file
            raise CheckpointFormatError(str(explain(e, self.step_dir))) from e


class ParamsWriter:
    """Builds a params-only export at `out_dir` (see the module docstring)."""

    def __init__(self, out_dir: str | Path, cfg: config_lib.Config, source: str = "",
                 hf: dict[str, Any] | None = None):
        """`hf`: what the source model's HF files say beyond the weights (special token ids,
        generation_config.json), kept in export.json for `to_hf`."""
        self.out_dir, problem = output_folder(out_dir)
        if problem:
            raise CheckpointFormatError(problem)
        self.cfg, self.source, self.hf = cfg, source, hf
        _, self.abstract = abstract_params(cfg.model)
        self.tmp_dir = staging_dir(self.out_dir, sum(
            math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in self.abstract.values()))
        for c in COLLECTIONS:
            (self.tmp_dir / c).mkdir(parents=True)
        self._stores: dict[str, Any] = {}
        self._written: dict[str, set] = collections.defaultdict(set)  # name -> indices (None: all)
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self._in_flight: collections.deque = collections.deque()
        self._pending_bytes = 0

    _IN_FLIGHT_BYTES = 128 << 20

    def _open(self, name: str) -> Any:
        if name not in self._stores:
            leaf = self.abstract[name]
            shape = list(leaf.shape)
            stacked = ".units." in name  # scanned layer groups: [layers, ...]
            chunk = [1] + shape[1:] if stacked and shape else shape
            item, stored = name.split(".", 1)
            # Chunks equal to the fill value must still be stored: orbax refuses missing chunks.
            spec = {"driver": "zarr3", "store_data_equal_to_fill_value": True,
                    "kvstore": {"driver": "file", "path": str(self.tmp_dir / item / stored)},
                    "metadata": {"shape": shape, "data_type": np.dtype(leaf.dtype).name,
                                 "chunk_grid": {"name": "regular",
                                                "configuration": {"chunk_shape": chunk}},
                                 "codecs": [{"name": "bytes",
                                             "configuration": {"endian": "little"}}]}}
            self._stores[name] = ts.open(spec, create=True, context=self._context).result()
        return self._stores[name]

    def write(self, name: str, value: np.ndarray, index: int | None = None) -> None:
        """Writes the whole array `name`, or entry `index` of its leading (layers) axis."""
        if name not in self.abstract:
            raise CheckpointFormatError(f"array {name}: not in the model this config builds")
        store = self._open(name)
        target = store if index is None else store[index]
        if tuple(value.shape) != tuple(target.shape):
            where = "" if index is None else f"[{index}]"
            raise CheckpointFormatError(f"array {name}{where}: shape {tuple(value.shape)}, "
                                        f"expected {tuple(target.shape)}")
        # Asynchronous: the write (and its fsync) overlaps reading the next tensors, with at
        # most _IN_FLIGHT_BYTES of buffers pending (the oldest writes are waited for first).
        data = np.ascontiguousarray(value, dtype=self.abstract[name].dtype)
        while self._in_flight and self._pending_bytes + data.nbytes > self._IN_FLIGHT_BYTES:
            self._wait_oldest()
        self._in_flight.append((target.write(data), data.nbytes, name))
        self._pending_bytes += data.nbytes
        self._written[name].add(index)

    def _wait_oldest(self) -> None:
        future, nbytes, name = self._in_flight.popleft()
        self._pending_bytes -= nbytes
        try:
            future.result()
        except Exception as e:  # a full disk, a file-size limit: TensorStore's ValueError
            raise CheckpointFormatError(f"{self.out_dir}: writing array {name}: "
                                        f"{write_problem(e)}") from e

    def _write_metadata(self, collection: str) -> None:
        tree = {}
        for name, leaf in self.abstract.items():
            item, stored = name.split(".", 1)
            if item != collection:
                continue
            keys = stored.split(".")
            tree[str(tuple(keys))] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in keys],
                "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False,
                                   "write_shape": list(leaf.shape)}}
        meta = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": True,
                "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        (self.tmp_dir / collection / "_METADATA").write_text(json.dumps(meta))

    def finish(self) -> Path:
        """Checks every array was written, writes the metadata files and renames into place."""
        while self._in_flight:
            self._wait_oldest()
        missing = sorted(set(self.abstract) - set(self._stores))
        if missing:
            raise CheckpointFormatError(f"array {missing[0]}: never written ({len(missing)} "
                                        "missing)")
        for name, indices in sorted(self._written.items()):
            if None not in indices:  # written entry by entry: every layer must have come
                gaps = sorted(set(range(self.abstract[name].shape[0])) - indices)
                if gaps:
                    raise CheckpointFormatError(f"array {name}: entries {gaps[:8]} of its "
                                                f"leading axis never written")
        for c in COLLECTIONS:
            self._write_metadata(c)
        (self.tmp_dir / EXPORT_CONFIG).write_text(
            json.dumps(config_lib.to_dict(self.cfg), indent=1))
        (self.tmp_dir / EXPORT_MARKER).write_text(json.dumps(
            {"source": self.source, "step": None, "dtype": self.cfg.model.param_dtype,
             **({"converted_by": "jaxmoe convert from-hf", "hf": self.hf}
                if self.hf is not None else {})}, indent=1))
        os.replace(self.tmp_dir, self.out_dir)  # takes the place of an empty folder atomically
        return self.out_dir

    def abort(self) -> None:
        for future, _, _ in self._in_flight:
            try:
                future.result()
            except Exception:  # noqa: BLE001, S110 (the directory is being discarded)
                pass
        self._in_flight.clear()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
