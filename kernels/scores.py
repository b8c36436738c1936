"""The scores of a tile, shared by the prefill and decode kernels: ``q @ k^T`` in fp32 and the logit soft-cap."""
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^2x + 1): saturates to +-1 without NaN (exp2 overflows to inf, underflows to 0).
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)  # 2 * log2(e)


@triton.jit
def tile_scores(q, k, cap_scale, cap_log2, HAS_SOFTCAP: tl.constexpr, UPCAST_DOT: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """``q [M, D] @ k [N, D]^T`` in fp32. Soft-capped (``softcap * tanh(s * scale / softcap)``, in log2 units) when
    HAS_SOFTCAP; otherwise still unscaled, so each kernel folds the scale in where it costs least. UPCAST_DOT: fp32
    operands (the interpreter's bf16 dot is wrong)."""
    if UPCAST_DOT:
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=DOT_PREC)
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if HAS_SOFTCAP:
        qk = cap_log2 * _tanh(qk * cap_scale)
    return qk
