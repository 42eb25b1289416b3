"""Conversion throughput (GB/s of tensor data) and peak resident memory, jaxmoe <-> HF.

    JAX_PLATFORMS=cpu python tools/bench_convert.py --layers 12 --dir /tmp

All files go into a fresh `bench_convert-XXXXXX` directory created inside --dir (which is
created if missing); only that directory is deleted afterwards (kept with --keep).

Builds a Mixtral-shaped model (width 1024, 8 experts of width 2048 per layer, --layers layers;
12 layers = 0.70B parameters = 2.8 GB in float32) twice on disk: as a per-layer-chunked export
(what `from-hf` writes, streamed layer by layer) and as a training checkpoint (what the
training loop's manager writes from one device: one chunk per array). Then runs each
conversion in a fresh process and reports seconds, GB/s and the process's peak RSS, next to
the RSS of a process that only imports the converter (the floor), a plain copy of the same
bytes (the I/O ceiling under the same load), and the sizes of one layer and of the largest
stored array. Source files are in the page cache (just written), so this measures conversion
cost more than disk speed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxmoe.staging import remove_scratch_dir, scratch_dir  # noqa: E402

MODEL = dict(vocab_size=32000, embed_dim=1024, num_heads=16, num_kv_heads=4, head_dim=64,
             num_experts=8, num_experts_per_tok=2, expert_mlp_dim=2048)


def _config(layers: int):
    from jaxmoe.config import Config, ModelConfig

    return Config(model=ModelConfig(num_layers=layers, **MODEL))


def build(layers: int, root: Path) -> dict[str, float]:
    """Writes root/export (per-layer chunks, streamed) and root/run (training checkpoint)."""
    import numpy as np

    from jaxmoe.checkpoint.manager import make_manager, save
    from jaxmoe.config import to_dict
    from jaxmoe.convert.orbax_io import ParamsWriter, abstract_params, fill_state

    cfg = _config(layers)
    _, abstract = abstract_params(cfg.model)
    rng = np.random.default_rng(0)
    writer = ParamsWriter(root / "export", cfg)
    arrays = {}
    for name, leaf in abstract.items():
        value = (0.02 * rng.standard_normal(leaf.shape, np.float32)).astype(leaf.dtype)
        if name.startswith("rest."):  # Mixtral has no router selection bias: keep it zero
            value[...] = 0
        arrays[name] = value
        if ".units." in name:
            for i in range(value.shape[0]):
                writer.write(name, value[i], i)
        else:
            writer.write(name, value)
    writer.finish()
    sizes = [a.nbytes for a in arrays.values()]
    layer = sum(a[0].nbytes for n, a in arrays.items() if ".units." in n)
    largest_slice = max(a[0].nbytes if ".units." in n else a.nbytes for n, a in arrays.items())
    _, params, rest = fill_state(cfg.model, arrays)
    del arrays  # the JAX copies are enough for the save
    manager = make_manager(root / "run" / "checkpoints", async_save=False)
    save(manager, 1, {"step": np.int32(1), "params": params, "rest": rest}, to_dict(cfg))
    manager.wait_until_finished()
    manager.close()
    return {"model_gb": sum(sizes) / 1e9, "largest_array_gb": max(sizes) / 1e9,
            "one_layer_gb": layer / 1e9, "largest_layer_slice_gb": largest_slice / 1e9}


def child(task: str, args: list[str]) -> None:
    """Runs one conversion in this (fresh) process and prints a JSON line."""
    start = time.perf_counter()
    from jaxmoe.convert import hf

    imported = time.perf_counter()
    out: dict[str, float] = {}
    if task == "to_hf":
        r = hf.to_hf(args[0], args[1], "mixtral", dtype=args[2])
    elif task == "from_hf":
        r = hf.from_hf(args[0], args[1])
    elif task == "copy":
        r = _copy(Path(args[0]), Path(args[1]))
    else:
        r = None
    if r is not None:
        out = {"seconds": r.seconds, "gb": r.bytes / 1e9, "gb_per_s": r.gb_per_s}
    out["import_s"] = imported - start
    out["peak_rss_gb"] = _status_kb("VmHWM") * 1024 / 1e9
    print(json.dumps(out))


def _copy(src: Path, dst: Path):
    """The I/O ceiling under the same load: copy the files byte for byte (read + write +
    fsync), no conversion."""
    from jaxmoe.convert.hf import Report

    start = time.perf_counter()
    dst.mkdir()
    total = 0
    for f in sorted(src.iterdir()):
        with open(f, "rb") as fin, open(dst / f.name, "wb") as fout:
            shutil.copyfileobj(fin, fout, 64 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        total += f.stat().st_size
    return Report(dst, 0, total, time.perf_counter() - start)


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in kB. VmHWM is this process image's peak RSS (unlike
    getrusage's ru_maxrss, which on Linux carries the forking parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_task(task: str, *args: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--child", task, *args], check=True,
                          capture_output=True, text=True, env={**os.environ,
                                                               "JAX_PLATFORMS": "cpu"})
    return json.loads(proc.stdout.strip().splitlines()[-1])


# A fresh directory inside --dir for this run's files, and its removal (nothing else in
# --dir is touched).
make_workdir = functools.partial(scratch_dir, prefix="bench_convert-")
remove_workdir = remove_scratch_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=os.path.basename(__file__),
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="parent of the run's fresh bench_convert-XXXXXX directory")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1:])
        return
    if args.layers < 1:
        parser.error(f"--layers {args.layers}: expected an integer >= 1")
    try:
        root = make_workdir(args.dir)
    except OSError as e:
        parser.error(f"--dir {args.dir!r}: expected a directory this run can create files in "
                     f"({e.strerror or e})")
    try:
        sizes = build(args.layers, root)
        rows = [("import only (floor)", run_task("none"))]
        rows.append(("to-hf float32, per-layer chunks (export)",
                     run_task("to_hf", str(root / "export"), str(root / "hf32"), "float32")))
        rows.append(("to-hf bfloat16, per-layer chunks (export)",
                     run_task("to_hf", str(root / "export"), str(root / "hf16"), "bfloat16")))
        rows.append(("to-hf float32, training checkpoint",
                     run_task("to_hf", str(root / "run"), str(root / "hf_run"), "float32")))
        rows.append(("from-hf float32",
                     run_task("from_hf", str(root / "hf32"), str(root / "back"))))
        rows.append(("plain file copy of the HF files (I/O ceiling)",
                     run_task("copy", str(root / "hf32"), str(root / "copy"))))
    finally:
        if args.keep:
            print(f"files kept in {root}")
        else:
            remove_workdir(root)
    print(f"model: {args.layers} layers, {sizes['model_gb']:.2f} GB float32; one layer "
          f"{sizes['one_layer_gb']:.3f} GB; largest per-layer slice "
          f"{sizes['largest_layer_slice_gb']:.3f} GB; largest stored array "
          f"{sizes['largest_array_gb']:.3f} GB")
    print("| conversion | seconds | GB/s | peak RSS (GB) |")
    print("|---|---:|---:|---:|")
    for name, r in rows:
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        rate = f"{r['gb_per_s']:.2f}" if "gb_per_s" in r else "-"
        print(f"| {name} | {secs} | {rate} | {r['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    from _run import run

    run(main)
