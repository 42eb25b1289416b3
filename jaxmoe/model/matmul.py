"""Two-operand contractions with low-precision inputs and float32 accumulation, both ways.

The matmuls of GQA attention, the MLPs, the blocked experts and the output head go through
`einsum` (MLA attention and the capacity path do not yet): inputs in the compute dtype
(bfloat16 by default), accumulation in float32, result cast back to the compute dtype. Its
backward pass is written out (`jax.custom_vjp`) so that the two gradient contractions also
take compute-dtype inputs with float32 accumulation. Autodiff of
`einsum(..., preferred_element_type=float32)` instead feeds a float32 cotangent into the
gradient matmuls, which then run in float32.

Why this matters on XLA:CPU (measured by tools/bench_matmul.py, docs/benchmarks.md): dots
with bfloat16 inputs and a float32 result run in a fast library kernel (~650 GFLOP/s on 2
cores for [1024, 256] x [256, 512]); a bfloat16 result or float32 inputs fall back to a
~200 GFLOP/s path, and so does a dot whose single contracted dimension is the minor one of
neither operand -- exactly the weight gradient x^T dy of a [tokens, in] input. Splitting that one
contracted dimension in two makes XLA insert a transpose and use the fast kernel (3x on the
weight gradients here); it is done only in programs lowered for CPU, where it was measured.
"""

from __future__ import annotations

import functools
import string

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _parse(spec: str) -> tuple[str, str, str]:
    lhs, out = spec.replace(" ", "").split("->")
    a, b = lhs.split(",")
    return a, b, out


def _check(spec: str) -> None:
    if spec.count("->") != 1 or spec.split("->")[0].count(",") != 1:
        raise ValueError(f"einsum spec {spec!r}: expected 'x,y->out' (two operands, explicit "
                         "output)")
    a, b, out = _parse(spec)
    for name, term in (("first", a), ("second", b), ("output", out)):
        if not term.isalpha() or len(set(term)) != len(term):
            raise ValueError(f"einsum spec {spec!r}: {name} term {term!r} must be distinct letters")
    if set(out) - set(a + b) or set(a) - set(b + out) or set(b) - set(a + out):
        raise ValueError(f"einsum spec {spec!r}: every index must appear in two of the three "
                         "terms (no index summed out of a single operand)")


def _split_contraction(spec: str, x_shape: tuple, y_shape: tuple):
    """(spec, x_shape, y_shape) with a lone contracted index that is the minor dim of neither
    operand split in two; None when there is nothing to split."""
    a, b, out = _parse(spec)
    summed = [c for c in a if c in b and c not in out]
    if len(summed) != 1:
        return None
    i, j = a.index(summed[0]), b.index(summed[0])
    n = x_shape[i]
    if i == len(a) - 1 or j == len(b) - 1 or n % 2 or n < 32:
        return None
    new = next(ch for ch in string.ascii_letters if ch not in a + b + out)
    return (f"{a[:i]}{new}{a[i:]},{b[:j]}{new}{b[j:]}->{out}",
            (*x_shape[:i], 2, n // 2, *x_shape[i + 1:]),
            (*y_shape[:j], 2, n // 2, *y_shape[j + 1:]))


def accumulation_dtype(*dtypes) -> jnp.dtype:
    """float32, or wider when an input is wider (float64 reference runs stay float64)."""
    return jnp.promote_types(jnp.result_type(*dtypes), _F32)


def _contract(spec: str, x: jax.Array, y: jax.Array, out_dtype) -> jax.Array:
    acc = accumulation_dtype(x.dtype, y.dtype)

    def plain(x, y):
        return jnp.einsum(spec, x, y, preferred_element_type=acc).astype(out_dtype)

    split_form = _split_contraction(spec, x.shape, y.shape)
    if split_form is None:
        return plain(x, y)
    split_spec, x_shape, y_shape = split_form

    def split(x, y):
        return jnp.einsum(split_spec, x.reshape(x_shape), y.reshape(y_shape),
                          preferred_element_type=acc).astype(out_dtype)

    # The split helps XLA:CPU only; the platform is chosen when the program is lowered, so a
    # TPU program compiled ahead of time on a CPU host gets the plain contraction.
    return jax.lax.platform_dependent(x, y, cpu=split, default=plain)


def _vma(x: jax.Array) -> frozenset:
    """Mesh axes x varies along inside shard_map (`.vma` in newer jax, `.mat.varying` in 0.10)."""
    t = jax.typeof(x)
    vma = getattr(t, "vma", None)
    if vma is None:
        vma = getattr(getattr(t, "mat", None), "varying", None)
    return frozenset(vma or ())


def align_varying(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """Inside `shard_map`: marks every input of a custom-VJP function as varying along all mesh
    axes any of them varies along. Its cotangents then vary along no more axes than it does,
    and autodiff of this cast (outside the custom VJP) sums them over the axes added here.
    Elsewhere the identity."""
    union = frozenset().union(*map(_vma, xs))
    return tuple(jax.lax.pcast(x, tuple(sorted(union - _vma(x))), to="varying")
                 if union - _vma(x) else x for x in xs)


def match_varying(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """A cotangent made varying along the axes its (aligned) primal varies along."""
    missing = _vma(primal) - _vma(cotangent)
    return jax.lax.pcast(cotangent, tuple(sorted(missing)), to="varying") if missing \
        else cotangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum(spec: str, x: jax.Array, y: jax.Array, out_dtype) -> jax.Array:
    return _contract(spec, x, y, out_dtype)


def _einsum_fwd(spec, x, y, out_dtype):
    return _contract(spec, x, y, out_dtype), (x, y)


def _einsum_bwd(spec, out_dtype, res, g):
    x, y = res
    a, b, out = _parse(spec)
    g = g.astype(jnp.promote_types(x.dtype, y.dtype))
    dx = _contract(f"{out},{b}->{a}", g, y, x.dtype)
    dy = _contract(f"{a},{out}->{b}", x, g, y.dtype)
    return match_varying(dx, x), match_varying(dy, y)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def einsum(spec: str, x: jax.Array, y: jax.Array, out_dtype=None) -> jax.Array:
    """`jnp.einsum(spec, x, y)` accumulated in float32 (or the inputs' wider dtype), result in
    `out_dtype` (default x.dtype).

    spec: two operands of distinct letters (no ellipsis), each index in two of the three terms.
    Gradients are computed with the same input dtypes and float32 accumulation.
    """
    _check(spec)
    return _einsum(spec, *align_varying(x, y), jnp.dtype(out_dtype or x.dtype))
