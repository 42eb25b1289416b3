"""Saves step 1, waits for it, starts an async save of step 2 and says so on stdout (the test
SIGKILLs this process while step 2 is being written). Arrays hold their step number."""

from __future__ import annotations

import sys

import jax.numpy as jnp

from jaxmoe.checkpoint import manager as ckpt

# 4 x 64 MB: large enough that writing step 2 takes a while after `save` returns.
SHAPE = (4, 16 * 1024 * 1024)


def state(step: int) -> dict:
    return {"w": jnp.full(SHAPE, float(step), jnp.float32), "step": jnp.int32(step)}


def main(directory: str) -> None:
    manager = ckpt.make_manager(directory, keep_last=3)
    ckpt.save(manager, 1, state(1), {"step": 1}, {"batches": 1})
    manager.wait_until_finished()
    print("saved 1", flush=True)
    ckpt.save(manager, 2, state(2), {"step": 2}, {"batches": 2})
    print("saving 2", flush=True)
    manager.wait_until_finished()
    print("saved 2", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
