"""A paged KV cache: one pool of fixed-size pages shared by every sequence (vLLM's design).

Shape glossary: P pages in the pool, Ps page size (positions per page), B sequence slots
(rows of the batch), M pages a sequence may hold (max pages per sequence), K kv heads,
H key head dim, Hv value head dim, T new tokens in one append, Tq query tokens, N query heads.

``PagedKVCache`` is a pytree of arrays with static shapes, so every operation works eagerly
and under ``jax.jit``:

- ``key_pages [P, Ps, K, H]``, ``value_pages [P, Ps, K, Hv]``: the pool.
- ``page_table [B, M]`` int32: page id of each sequence's ``m``-th page, ``-1`` = none.
- ``lengths [B]`` int32: tokens written per sequence.
- ``page_free [P]`` bool: pages nobody holds.
- ``errors [B]`` int32: misuse flags per sequence (``OUT_OF_PAGES``, ``PAST_PAGES``,
  ``BAD_PAGE_TABLE``), 0 when healthy.

Life of a sequence: ``allocate`` reserves pages for the tokens it is about to get (prefill
chunk or one decode token), ``append`` writes their keys/values, ``paged_decode_attention``
attends over its pages in place (no dense gather), ``free`` returns its pages to the pool.

Misuse (running out of pages, writing past a sequence's pages, a page table pointing outside
the pool or at a page another sequence holds) raises a ``ValueError`` eagerly. Under ``jit``
the values are unknown at trace time, so instead: the offending writes are dropped (another
sequence's pages are never touched), the sequence's ``errors`` flag is set, and attention
returns NaN for it until it is freed. ``check(cache)`` raises on any flag.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattn.core import _checks, spec
from jattn.kernels import decode as _decode

OUT_OF_PAGES = 1  # allocate found too few free pages
PAST_PAGES = 2  # append wrote past the pages the sequence holds
BAD_PAGE_TABLE = 4  # a page id outside [0, P), or a page also held by another sequence


class PagedKVCache(NamedTuple):
    """A paged KV cache (a pytree of arrays: pass it through ``jit``).

    Attributes:
      key_pages: ``[P, Ps, K, H]`` the shared pool of key pages.
      value_pages: ``[P, Ps, K, Hv]``.
      page_table: int32 ``[B, M]``: the pages of each sequence in order, -1 = no page.
      lengths: int32 ``[B]`` tokens held per sequence.
      page_free: bool ``[P]``.
      errors: int32 ``[B]`` misuse bit flags (``OUT_OF_PAGES``, ``PAST_PAGES``, ``BAD_PAGE_TABLE``).
    """

    key_pages: jax.Array  # [P, Ps, K, H]
    value_pages: jax.Array  # [P, Ps, K, Hv]
    page_table: jax.Array  # [B, M] int32, -1 = no page
    lengths: jax.Array  # [B] int32
    page_free: jax.Array  # [P] bool
    errors: jax.Array  # [B] int32 bit flags

    @property
    def page_size(self) -> int:
        return self.key_pages.shape[1]


def init(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *, batch_size: int,
         max_pages_per_sequence: int, value_head_dim: int | None = None,
         dtype=jnp.float32) -> PagedKVCache:
    """An empty cache: every page free, every sequence slot empty.

    Args:
      num_pages: P, pages in the shared pool.
      page_size: Ps, positions per page.
      num_kv_heads, head_dim: K and H.
      value_head_dim: Hv; default H.
      batch_size: B, sequence slots.
      max_pages_per_sequence: M, the page-table width (a sequence holds at most M·Ps tokens).
      dtype: dtype of the pages.

    Returns:
      PagedKVCache with zero pages, ``page_table = -1``, zero lengths and errors.
    """
    Hv = head_dim if value_head_dim is None else value_head_dim
    for name, x in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim), ("value_head_dim", Hv), ("batch_size", batch_size),
                    ("max_pages_per_sequence", max_pages_per_sequence)):
        if not isinstance(x, (int, np.integer)) or isinstance(x, bool) or x < 1:
            raise ValueError(f"{name}: expected a positive int, got {x!r}")
    _checks.floating("dtype", jnp.zeros((), dtype))
    return PagedKVCache(
        key_pages=jnp.zeros((num_pages, page_size, num_kv_heads, head_dim), dtype),
        value_pages=jnp.zeros((num_pages, page_size, num_kv_heads, Hv), dtype),
        page_table=jnp.full((batch_size, max_pages_per_sequence), -1, jnp.int32),
        lengths=jnp.zeros((batch_size,), jnp.int32),
        page_free=jnp.ones((num_pages,), bool),
        errors=jnp.zeros((batch_size,), jnp.int32),
    )


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


def _per_sequence(name: str, x, B: int, default=None):
    """An int ``[B]`` argument (or a scalar broadcast to it) as int32 ``[B]``."""
    if x is None:
        x = default
    _checks.integer(name, x)
    _checks.broadcastable(name, x, (B,), "[B] per sequence")
    return jnp.broadcast_to(jnp.asarray(x, jnp.int32), (B,))


def _table_problems(cache: PagedKVCache) -> jax.Array:
    """[B] bool: the sequence's page table points outside the pool, at a free page, or at a
    page some other entry also holds."""
    P = cache.key_pages.shape[0]
    table = cache.page_table  # [B, M]
    held = table >= 0
    out_of_pool = held & (table >= P)
    ids = jnp.where(held & ~out_of_pool, table, P)  # [B, M]; P = "none"
    holders = jnp.zeros((P + 1,), jnp.int32).at[ids.reshape(-1)].add(1)  # [P + 1]
    shared = held & ~out_of_pool & (holders[ids] > 1)
    freed = held & ~out_of_pool & cache.page_free[jnp.minimum(ids, P - 1)]
    return jnp.any(out_of_pool | shared | freed, axis=-1)  # [B]


def check(cache: PagedKVCache) -> None:
    """Raise ``ValueError`` if any sequence carries an error flag or its page table is bad.

    Call it eagerly (outside ``jit``) after jitted steps to surface misuse.

    Args:
      cache: the paged cache (concrete arrays).

    Returns:
      None; raises ``ValueError`` naming the sequences and their misuse.
    """
    errors = np.asarray(cache.errors) | np.where(np.asarray(_table_problems(cache)), BAD_PAGE_TABLE, 0)
    bad = np.nonzero(errors)[0]
    if bad.size:
        names = {OUT_OF_PAGES: "out of pages", PAST_PAGES: "append past the sequence's pages",
                 BAD_PAGE_TABLE: "bad page table"}
        what = {int(b): [n for f, n in names.items() if errors[b] & f] for b in bad}
        raise ValueError(f"paged KV cache: misuse in sequences {what}")


@jax.jit
def _allocate(cache: PagedKVCache, num_new: jax.Array) -> PagedKVCache:
    P, Ps = cache.key_pages.shape[:2]
    B, M = cache.page_table.shape
    held = jnp.sum(cache.page_table >= 0, axis=-1)  # [B]; pages are held as a prefix
    needed = jnp.clip(-(-(cache.lengths + num_new) // Ps), 0, None)  # [B]
    extra = jnp.maximum(needed - held, 0)  # [B]
    fits_table = needed <= M
    extra = jnp.where(fits_table, extra, 0)
    free_ids = jnp.nonzero(cache.page_free, size=P, fill_value=P)[0]  # [P] free pages first
    n_free = jnp.sum(cache.page_free)
    # Sequences are served in order; once one does not fit, neither do the later ones.
    granted = jnp.cumsum(extra) <= n_free  # [B]
    extra = jnp.where(granted, extra, 0)
    first = jnp.cumsum(extra) - extra  # [B] offset into free_ids
    m = jnp.arange(M)[None, :]  # [1, M]
    new_slot = (m >= held[:, None]) & (m < held[:, None] + extra[:, None])  # [B, M]
    pick = jnp.clip(first[:, None] + m - held[:, None], 0, P - 1)  # [B, M]
    table = jnp.where(new_slot, free_ids[pick], cache.page_table)
    taken = jnp.where(new_slot, table, P)  # [B, M]
    page_free = cache.page_free.at[taken.reshape(-1)].set(False, mode="drop")
    failed = (~granted & (needed > held)) | ~fits_table
    errors = cache.errors | jnp.where(failed, OUT_OF_PAGES, 0)
    return cache._replace(page_table=table, page_free=page_free, errors=errors)


def allocate(cache: PagedKVCache, num_new) -> PagedKVCache:
    """Reserve pages so that sequence ``b`` can take ``num_new[b]`` more tokens.

    Pages come from the free pool in order of sequence. Eagerly, too few free pages (or more
    than ``max_pages_per_sequence``) raise ``ValueError`` and change nothing; under ``jit``
    the sequences that could not be served get ``OUT_OF_PAGES`` and no new pages.

    Args:
      cache: the cache.
      num_new: ``[B]`` (or a scalar) int, tokens each sequence is about to append.

    Returns:
      The cache with the pages reserved.
    """
    B = cache.lengths.shape[0]
    num_new = _per_sequence("num_new", num_new, B)
    if _concrete(cache, num_new):
        P, Ps = cache.key_pages.shape[:2]
        M = cache.page_table.shape[1]
        n = np.asarray(num_new)
        if np.any(n < 0):
            raise ValueError(f"num_new: expected non-negative counts, got {n.tolist()}")
        needed = -(-(np.asarray(cache.lengths) + n) // Ps)
        if np.any(needed > M):
            raise ValueError(
                f"allocate: sequences would need {needed.tolist()} pages, max_pages_per_sequence is {M}"
            )
        held = np.sum(np.asarray(cache.page_table) >= 0, axis=-1)
        want, free = int(np.maximum(needed - held, 0).sum()), int(np.asarray(cache.page_free).sum())
        if want > free:
            raise ValueError(f"allocate: out of pages: need {want} more pages, {free} of {P} are free")
    return _allocate(cache, num_new)


@jax.jit
def _append(cache: PagedKVCache, key, value, num_new) -> PagedKVCache:
    P, Ps = cache.key_pages.shape[:2]
    B, M = cache.page_table.shape
    T = key.shape[1]
    pos = cache.lengths[:, None] + jnp.arange(T)[None, :]  # [B, T]
    real = jnp.arange(T)[None, :] < num_new[:, None]  # [B, T]
    slot = jnp.clip(pos // Ps, 0, M - 1)
    page = jnp.take_along_axis(cache.page_table, slot, axis=1)  # [B, T]
    no_page = real & ((pos // Ps >= M) | (page < 0) | (page >= P))  # [B, T]
    bad_row = jnp.any(no_page, axis=-1) | (cache.errors != 0) | _table_problems(cache)  # [B]
    # A flagged sequence writes nothing: its (or anyone's) pages stay as they were.
    write = real & ~bad_row[:, None]  # [B, T]
    page = jnp.where(write, page, P)  # P is out of bounds: dropped
    offset = pos % Ps
    key_pages = cache.key_pages.at[page, offset].set(key.astype(cache.key_pages.dtype), mode="drop")
    value_pages = cache.value_pages.at[page, offset].set(value.astype(cache.value_pages.dtype), mode="drop")
    errors = cache.errors | jnp.where(jnp.any(no_page, axis=-1), PAST_PAGES, 0)
    return cache._replace(
        key_pages=key_pages, value_pages=value_pages,
        lengths=jnp.where(bad_row, cache.lengths, cache.lengths + num_new), errors=errors,
    )


def append(cache: PagedKVCache, key, value, num_new=None) -> PagedKVCache:
    """Write ``key/value [B, T, K, H|Hv]`` after each sequence's last token.

    Sequence ``b`` takes its first ``num_new[b]`` tokens (default T: right-padded chunks for
    prefill, T = 1 for a decode step); pages must have been reserved by ``allocate``.
    Writing past them raises ``ValueError`` eagerly; under ``jit`` the sequence writes
    nothing, keeps its length and gets ``PAST_PAGES``.

    Args:
      cache: the paged cache.
      key: ``[B, T, K, H]`` new keys.
      value: ``[B, T, K, Hv]`` new values.
      num_new: int ``[B]`` (or a scalar) tokens to take per sequence, in ``[0, T]``; default T.

    Returns:
      The cache with the tokens written and ``lengths`` advanced.
    """
    B, M = cache.page_table.shape
    _, Ps, K, H = cache.key_pages.shape
    Hv = cache.value_pages.shape[-1]
    for name, x in (("key", key), ("value", value)):
        _checks.floating(name, x)
    shape = _checks.rank("key", key, 4, "[B, T, K, H]")
    T = shape[1]
    _checks.exact_shape("key", key, (B, T, K, H), "[B, T, K, H] matching the cache")
    _checks.exact_shape("value", value, (B, T, K, Hv), "[B, T, K, Hv] matching the cache")
    num_new = _per_sequence("num_new", num_new, B, default=T)
    if _concrete(cache, num_new):
        n = np.asarray(num_new)
        if np.any((n < 0) | (n > T)):
            raise ValueError(f"num_new: expected values in [0, {T}], got {n.tolist()}")
        held = np.sum(np.asarray(cache.page_table) >= 0, axis=-1)
        end = np.asarray(cache.lengths) + n
        if np.any(end > held * Ps):
            raise ValueError(
                f"append: writing past the sequences' pages: they would hold {end.tolist()} tokens, "
                f"their pages hold {(held * Ps).tolist()} (call allocate first)"
            )
        check(cache)
    return _append(cache, key, value, num_new)


@jax.jit
def _free(cache: PagedKVCache, rows) -> PagedKVCache:
    P = cache.key_pages.shape[0]
    table = cache.page_table
    released = jnp.where(rows[:, None] & (table >= 0), table, P)  # [B, M]
    return cache._replace(
        page_table=jnp.where(rows[:, None], -1, table),
        lengths=jnp.where(rows, 0, cache.lengths),
        page_free=cache.page_free.at[released.reshape(-1)].set(True, mode="drop"),
        errors=jnp.where(rows, 0, cache.errors),
    )


def free(cache: PagedKVCache, rows) -> PagedKVCache:
    """Return the pages of some sequences to the pool and empty their slots.

    Also clears their error flags: a freed slot starts clean.

    Args:
      cache: the paged cache.
      rows: bool ``[B]``, the sequences to free.

    Returns:
      The cache with those slots empty and their pages free.
    """
    B = cache.lengths.shape[0]
    _checks.boolean("rows", rows)
    _checks.exact_shape("rows", rows, (B,), "[B] bool: sequences to free")
    return _free(cache, jnp.asarray(rows))


@functools.partial(jax.jit, static_argnames=("static", "Tq"))
def _paged_decode(q, cache: PagedKVCache, *, static: _decode.Static, Tq: int):
    P, Ps, K, H = cache.key_pages.shape
    Hv = cache.value_pages.shape[-1]
    M = cache.page_table.shape[1]
    table = cache.page_table

    def fetch(pools, b, j):
        key_pages, value_pages = pools
        page = jnp.clip(table[b, j], 0, P - 1)  # a bad id is flagged below, never read wildly
        k = jax.lax.dynamic_index_in_dim(key_pages, page, 0, keepdims=False)  # [Ps, K, H]
        v = jax.lax.dynamic_index_in_dim(value_pages, page, 0, keepdims=False)  # [Ps, K, Hv]
        return k, v, j * Ps + jnp.arange(Ps), j * Ps

    out = _decode.run_splits(
        q, cache.lengths, (cache.key_pages, cache.value_pages), fetch, Tq, Hv, static, M, q.dtype,
    )  # [B, K, R, Hv]
    held = jnp.sum(table >= 0, axis=-1)  # [B]
    bad = (cache.errors != 0) | _table_problems(cache) | (cache.lengths > held * Ps) | (cache.lengths < 0)
    return _decode.poison_rows(out, bad)


def paged_decode_attention(query, cache: PagedKVCache, *, scale=None, logits_soft_cap=None,
                           local_window_size=None):
    """``jattn.decode_attention`` over a paged cache, straight from the pages.

    Sequence ``b`` attends over its ``lengths[b]`` tokens with the same semantics (query token
    ``t`` at position ``lengths[b] - Tq + t``, bottom-right causal; ``lengths = 0`` gives 0).
    One split is one page: only the pages a sequence needs are read, in place.

    Args:
      query: ``[B, Tq, N, H]`` (N a multiple of the cache's K).
      cache: the paged cache (append the query tokens' own keys first).
      scale, logits_soft_cap, local_window_size: as in ``decode_attention``.

    Returns:
      ``[B, Tq, N, Hv]`` in the dtype of ``query``. A sequence with a misuse flag or a bad page
      table returns NaN (eagerly: ``ValueError``).
    """
    _, Ps, K, H = cache.key_pages.shape
    B = cache.lengths.shape[0]
    Hv = cache.value_pages.shape[-1]
    M = cache.page_table.shape[1]
    pages = (jax.ShapeDtypeStruct((B, M * Ps, K, H), cache.key_pages.dtype),  # the cache seen as [B, S, K, H|Hv]
             jax.ShapeDtypeStruct((B, M * Ps, K, Hv), cache.value_pages.dtype))
    Tq, N = spec.check_arrays(query, *pages, names={"key": "cache.key_pages", "value": "cache.value_pages"},
                              any_batch=False, given="key", T="Tq", nonempty=True)[1:3]
    if _concrete(cache):
        check(cache)
    scale, cap, left = _decode.check_common(scale, logits_soft_cap, local_window_size, H)
    G = N // K
    q = _decode.group_queries(query, B, Tq, K, G, H)  # [B, K, R, H]
    static = _decode.Static(split_size=Ps, scale=scale, logits_soft_cap=cap, window_left=left)
    out = _paged_decode(q, cache, static=static, Tq=Tq)
    return _decode.ungroup(out, (B,), Tq, K, G, Hv)


def from_dense(key, value, lengths, *, page_size: int, num_pages: int | None = None,
               max_pages_per_sequence: int | None = None) -> PagedKVCache:
    """A paged cache holding the first ``lengths[b]`` tokens of dense keys and values.

    Allocates and appends through the public API (eagerly); mostly for tests and benchmarks.

    Args:
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      lengths: int ``[B]`` tokens to keep per sequence.
      page_size: Ps, positions per page.
      num_pages: P; default ``B·M`` (every sequence can fill its table).
      max_pages_per_sequence: M; default ``ceil(S / page_size)``.

    Returns:
      The ``PagedKVCache``.
    """
    B, S, K, H = _checks.rank("key", key, 4, "[B, S, K, H]")
    M = max_pages_per_sequence or -(-S // page_size)
    cache = init(num_pages or B * M, page_size, K, H, batch_size=B, max_pages_per_sequence=M,
                 value_head_dim=jnp.shape(value)[-1], dtype=jnp.result_type(key))
    cache = allocate(cache, lengths)
    return append(cache, key, value, lengths)


__all__ = [
    "BAD_PAGE_TABLE", "OUT_OF_PAGES", "PAST_PAGES", "PagedKVCache", "allocate", "append", "check",
    "free", "from_dense", "init", "paged_decode_attention",
]
