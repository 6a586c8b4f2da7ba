"""Memory-efficient causal attention over packed sequences (flash-attention's online softmax, in plain JAX).

Rows are packed: one row of length T holds several sequences back to back, told apart by `segment_ids`
(padding has its own segment). A token attends to earlier tokens of its own segment only. The row is cut
into blocks of `block` tokens; for each query block we walk only the key blocks that can matter -- from the
block holding the start of the earliest sequence in the query block up to the diagonal -- keeping a running
max and sum per query (online softmax). Nothing bigger than block x block scores is ever live, so a single
32,768-token sequence needs memory linear in its length, and packed short sequences cost what they would
cost alone.

Options for the families that need them (at their defaults the compiled program is the one without them):
`window` (sliding-window attention: a query at position q sees keys k of its own sequence with
q - k < window, transformers' `sliding_window_overlay`: `kv_idx > q_idx - sliding_window`; the loop then
starts at the first key block inside the window, so time and memory stay linear in the row's length),
`softcap` (Gemma 2's logit soft-capping: scores -> tanh(scores / cap) * cap, after the scale and before the
mask, as transformers' eager attention) and `scale` (the scores' factor; default head_dim ** -0.5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked key blocks never make NaNs (exp(NEG_INF - m) == 0)


def _pick_block(t: int, block: int) -> int:
    block = min(block, t)
    while t % block:
        block //= 2
    return max(block, 1)


def _scores(s, softcap):
    """Soft-capped scores (Gemma 2), or the scores untouched."""
    return s if softcap is None else jnp.tanh(s / softcap) * softcap


def attention(
    q,
    k,
    v,
    segment_ids,
    positions,
    *,
    block: int = 512,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
):
    """Causal, segment-masked attention.

    q: [B, T, H, hd]; k, v: [B, T, KVH, hd] (H a multiple of KVH: grouped-query attention);
    segment_ids, positions: int32 [B, T], positions counting from 0 at each segment's start.
    window: each query sees at most the `window` latest positions of its sequence (itself included);
    softcap: tanh soft-capping of the scaled scores; scale: the scores' factor (default hd ** -0.5).
    Returns [B, T, H, hd] in q's dtype. Scores and softmax are float32.
    """
    b, t, h, hd = q.shape
    kvh = k.shape[2]
    g = h // kvh
    blk = _pick_block(t, block)
    nb = t // blk
    scale = hd**-0.5 if scale is None else scale
    if window is not None and window < 1:
        raise ValueError(f"attention window {window}: must be at least 1")

    if nb == 1:  # rows no longer than one block: nothing to skip, so no loop (on an H200 the loop cost 30%)
        return _one_block(q.reshape(b, t, kvh, g, hd), k, v, segment_ids, scale, window, softcap).reshape(b, t, h, hd)

    qb = q.reshape(b, nb, blk, kvh, g, hd)
    kb = k.reshape(b, nb, blk, kvh, hd)
    vb = v.reshape(b, nb, blk, kvh, hd)
    segb = segment_ids.reshape(b, nb, blk)
    # The earliest key any query of block i can see: the start of the sequence its first token belongs to.
    seq_start = jnp.arange(t, dtype=jnp.int32)[None, :] - positions
    first_kv_block = (seq_start.reshape(b, nb, blk)[:, :, 0] // blk).clip(0, nb - 1)
    if window is not None:  # nor anything before the window of the block's first query
        in_window = (jnp.arange(nb, dtype=jnp.int32) * blk - (window - 1)).clip(0) // blk
        first_kv_block = jnp.maximum(first_kv_block, in_window[None, :])

    def one_row(qr, kr, vr, segr, first):
        def one_query_block(i):
            qi = qr[i]  # [blk, kvh, g, hd]
            qseg = segr[i]
            qpos = i * blk + jnp.arange(blk)

            def step(j, carry):
                m, denom, acc = carry
                kj, vj = kr[j], vr[j]
                # Products in the inputs' dtype, accumulated in float32 (flash attention's recipe: bfloat16
                # inputs use the matrix units); scores, softmax and the running sums stay float32.
                s = _scores(jnp.einsum("qkgd,skd->kgqs", qi, kj, preferred_element_type=jnp.float32) * scale, softcap)
                kpos = j * blk + jnp.arange(blk)
                mask = (kpos[None, :] <= qpos[:, None]) & (segr[j][None, :] == qseg[:, None])
                if window is not None:
                    mask &= qpos[:, None] - kpos[None, :] < window
                s = jnp.where(mask, s, NEG_INF)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                denom = denom * corr + p.sum(-1)
                acc = acc * corr[..., None] + jnp.einsum(
                    "kgqs,skd->kgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
                )
                return m_new, denom, acc

            init = (
                jnp.full((kvh, g, blk), NEG_INF, jnp.float32),
                jnp.zeros((kvh, g, blk), jnp.float32),
                jnp.zeros((kvh, g, blk, hd), jnp.float32),
            )
            _, denom, acc = jax.lax.fori_loop(first[i], i + 1, step, init)
            out = acc / denom[..., None]  # the diagonal is always unmasked, so denom > 0
            return out.transpose(2, 0, 1, 3)  # [blk, kvh, g, hd]

        return jax.lax.map(one_query_block, jnp.arange(nb))  # [nb, blk, kvh, g, hd]

    out = jax.vmap(one_row)(qb, kb, vb, segb, first_kv_block)
    return out.reshape(b, t, h, hd).astype(q.dtype)


def _one_block(q, k, v, segment_ids, scale, window=None, softcap=None):
    """The masked T x T product for a whole row at once, with the blockwise loop's numerics.
    q: [B, T, KVH, G, hd]; k, v: [B, T, KVH, hd]. Memory: what one step of the loop holds (T <= block)."""
    t = q.shape[1]
    s = _scores(jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale, softcap)
    idx = jnp.arange(t)
    causal = idx[None, :] <= idx[:, None]
    if window is not None:
        causal &= idx[:, None] - idx[None, :] < window
    mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [B,T,T]
    s = jnp.where(mask[:, None, None], s, NEG_INF)
    p = jnp.exp(s - s.max(-1, keepdims=True))  # the diagonal is always unmasked, so every row has a 1
    out = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / p.sum(-1).transpose(0, 3, 1, 2)[..., None]).astype(q.dtype)
