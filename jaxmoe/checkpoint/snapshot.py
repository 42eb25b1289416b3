"""A reused copy of the train state that async saves write from, on CPU devices.

An async orbax save of arrays on CPU devices reads them in place: the host "copy" is a view
of the device buffer, held until the bytes are on disk. The next train step donates its
state buffers, but XLA cannot reuse a buffer something else still reads, so it allocates
the whole new state afresh (fresh pages: ~1 s per GB on the benchmark host) while the save
runs; `tools/bench_checkpoint.py` saw that step take 6.3 s instead of ~2 s.

`StateSnapshot.take` copies the state into buffers kept from the previous save (a jitted
copy that donates them, so no memory is allocated after the first save) and the save reads
the copy; the step keeps donating its own buffers. Cost: one more copy of the train state
resident in host memory, and a memcpy of it in `save()`. Arrays on other devices (TPU, GPU)
are passed through: their save copies them to host memory and holds no device buffer.
"""

from __future__ import annotations

from typing import Any

import jax


def _on_cpu(x: Any) -> bool:
    return (isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            and all(d.platform == "cpu" for d in x.sharding.device_set))


def _fits(buffers: tuple[jax.Array, ...], arrays: list[jax.Array]) -> bool:
    """Whether `arrays` can be copied into `buffers` as they lie (shape, dtype, layout)."""
    return len(buffers) == len(arrays) and all(
        b.shape == a.shape and b.dtype == a.dtype
        and b.sharding.is_equivalent_to(a.sharding, a.ndim) for b, a in zip(buffers, arrays))


# Built once: jit's cache then compiles each once per set of shapes and shardings, and a
# save does not trace or compile again. Outputs keep their inputs' shardings.
_fresh_copy = jax.jit(lambda src: tuple(x.copy() for x in src))
# Writes `src` into `dst`, which is donated: XLA reuses its memory for the result.
_copy_into = jax.jit(lambda dst, src: tuple(jax.lax.dynamic_update_slice(d, x, (0,) * x.ndim)
                                            for d, x in zip(dst, src)), donate_argnums=0)


class StateSnapshot:
    """Copies of a pytree's CPU arrays in buffers reused from one `take` to the next.

    The caller must not `take` again while a save still reads the previous copy (wait for
    it first): its buffers are overwritten."""

    def __init__(self) -> None:
        # per set of devices (one jitted copy each): the copies of the last `take`
        self._groups: dict[frozenset, tuple[jax.Array, ...]] = {}

    def take(self, tree: Any) -> Any:
        """`tree` with every CPU array replaced by a copy (others, and PRNG keys, as is)."""
        leaves, treedef = jax.tree.flatten(tree)
        groups: dict[frozenset, list[int]] = {}
        for i, x in enumerate(leaves):
            if _on_cpu(x):
                groups.setdefault(frozenset(x.sharding.device_set), []).append(i)
        self._groups = {k: v for k, v in self._groups.items() if k in groups}
        out = list(leaves)
        for devices, where in groups.items():
            arrays = [leaves[i] for i in where]
            kept = self._groups.pop(devices, None)  # released before a fresh allocation
            if kept is not None and _fits(kept, arrays):
                copies = _copy_into(kept, tuple(arrays))
            else:
                del kept
                copies = _fresh_copy(tuple(arrays))
            self._groups[devices] = copies
            for i, copy in zip(where, copies):
                out[i] = copy
        return jax.tree.unflatten(treedef, out)

    @property
    def nbytes(self) -> int:
        """Bytes of the copies held (over all devices; 0 before the first `take`)."""
        return sum(x.nbytes for copies in self._groups.values() for x in copies)

    def release(self) -> None:
        """Drops the copies (their memory returns once no save reads them)."""
        self._groups = {}
