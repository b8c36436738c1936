"""The online-softmax steps that the prefill and decode kernels share, as ``@triton.jit`` helpers inlined into both.

Both kernels stream key tiles through the same running state of a tile of query rows: the row maxima ``m`` and sums
``l`` of the exponentials, and the output accumulator ``acc``, all float32 and in the log2 domain (scores carry a
factor log2(e), folded into the scales on the host, so every exponential is an ``exp2``). The steps of one key tile
are the scores (``qk_scores``: the dot, its scale or soft-cap), the kernel's own mask, the fold of the tile into the
state (``online_softmax_fold``) and the value product (``pv_accumulate``); ``softmax_output`` turns the state into
out and lse at the end. They live here once so that the two kernels' numerics (the -inf guard, the interpreter's
upcast dots, the soft-cap) cannot drift apart. Merging finished (out, lse) states is ``merge``'s business: natural-log
weights over whole states, not a running tile loop.

Flags are ``tl.constexpr``: each kernel compiles only the branch it asks for, and no runtime test is added."""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E); the launchers fold it into the scales
TWO_LOG2E = tl.constexpr(2 * LOG2E)  # exp(2x) == exp2(x * TWO_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log2 back to log_e


@triton.jit
def tanh(x):
    # 1 - 2 / (e^2x + 1): saturates to +-1 without NaN (exp2 overflows to inf, underflows to 0).
    return 1.0 - 2.0 / (tl.math.exp2(x * TWO_LOG2E) + 1.0)


@triton.jit
def qk_scores(q, k, qk_scale, cap_scale, cap_log2, SOFTCAP: tl.constexpr, DEFER_SCALE: tl.constexpr,
              UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scores of the query tile ``q`` [M, D] against the key tile ``k`` [N, D]: float32 [M, N] in log2 units.
    SOFTCAP: ``softcap * tanh(s * scale / softcap)`` (``cap_scale = scale / softcap``, ``cap_log2 = softcap *
    log2(e)``); otherwise ``s * qk_scale`` (``qk_scale = scale * log2(e)``), or, DEFER_SCALE, the raw ``s``: the
    fold then applies qk_scale inside its exponent, where it fuses with the subtraction of the maximum."""
    tl.static_assert(q.shape[1] == k.shape[1], "q and k tiles must have the same (padded) head dim")
    tl.static_assert(not (SOFTCAP and DEFER_SCALE), "soft-capped scores are scaled inside the tanh")
    if UPCAST_DOT:  # the interpreter's bf16 dot is wrong (see hf_flash.kernels.INTERPRET)
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=DOT_PREC)
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if SOFTCAP:
        qk = cap_log2 * tanh(qk * cap_scale)
    elif not DEFER_SCALE:
        qk = qk * qk_scale
    return qk


@triton.jit
def online_softmax_fold(acc, l_i, m_i, qk, qk_scale, DEFER_SCALE: tl.constexpr, GUARD_EMPTY: tl.constexpr):
    """Folds the scores ``qk`` [M, N] of one key tile (from ``qk_scores``, masked keys at -inf) into the state:
    returns ``(acc, l_i, m_i, p)`` with ``acc`` [M, D] already rescaled to the new maxima and ``p`` the tile's float32
    weights, for ``pv_accumulate``. DEFER_SCALE: ``qk`` is unscaled and ``exp2(qk * qk_scale - m)`` is one fma per
    score. GUARD_EMPTY: a row may have seen no key yet (every score so far -inf, so m stays -inf)."""
    tl.static_assert(qk.shape[0] == m_i.shape[0] and qk.shape[0] == acc.shape[0], "one state row per query row")
    tl.static_assert(not (DEFER_SCALE and GUARD_EMPTY), "deferred scaling is for tiles without masked keys")
    if DEFER_SCALE:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        m_sub = m_new
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = m_new
        if GUARD_EMPTY:  # subtract 0 instead of -inf, so p and alpha are 0, not NaN
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return acc, l_i, m_new, p


@triton.jit
def pv_accumulate(acc, p, v, UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr):
    """``acc + p @ v`` for the weights ``p`` [M, N] and the value tile ``v`` [N, D]. ``p`` is rounded to the values'
    dtype first, as the tensor cores take it (the interpreter's upcast dot sees the same rounded weights)."""
    p = p.to(v.dtype)
    if UPCAST_DOT:
        acc = tl.dot(p.to(tl.float32), v.to(tl.float32), acc, input_precision=DOT_PREC)
    else:
        acc = tl.dot(p, v, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def softmax_output(acc, l_i, m_i):
    """The state's ``(out, lse)``: ``acc / l`` and the natural-log lse. Rows that saw no key (sum exactly 0) give out
    0 and lse -inf, whatever their tiles' hidden values held. NaN or inf in what a row sees makes its sum NaN or inf,
    and reaches its out and lse."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    return out, lse
