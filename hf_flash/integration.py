"""Glue between transformers and ``hf_flash.ops``.

transformers treats every ``attn_implementation`` whose name contains "flash" as a flash-attn request: it loads
that implementation's ``flash_attn_func`` / ``flash_attn_varlen_func`` through the private hook
``modeling_flash_attention_utils._lazy_imports`` and fails for any name it does not know. We answer that hook
for ``"hf_flash"`` with flash-attn-compatible functions built on ``hf_flash.ops``, so transformers' own flash
path (unpadding to varlen, packed sequences, sliding window, soft-cap) runs our kernels, and register an attention
function and the 2-D mask function under the same name (without a mask function every layer would silently get
``attention_mask=None``). Checked against transformers 5.17 and 5.23.
"""
import logging

import torch
import transformers.modeling_flash_attention_utils as flash_utils
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.masking_utils import flash_attention_mask

from . import ops
from .cache import PagedKV
from .patches import NAME, asks_for_hf_flash
from .patches import attn_implementation as attn_implementation_patch
from .patches import generate as generate_patch


def _check_inference(dropout_p):
    if dropout_p:
        raise ValueError(f"hf_flash has no attention dropout (dropout_p={dropout_p}); call model.eval() first")


def _refuse_sinks(kwargs):
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("hf_flash does not implement attention sinks (s_aux) yet")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    deterministic=False, return_attn_probs=False):
    """``flash_attn.flash_attn_func`` on ``hf_flash.ops.attention`` (``deterministic``: always)."""
    _check_inference(dropout_p)
    return ops.attention(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=tuple(window_size),
                         softcap=softcap or 0.0, return_softmax_lse=return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False,
                           return_attn_probs=False):
    """``flash_attn.flash_attn_varlen_func`` on ``hf_flash.ops.attention_varlen``."""
    _check_inference(dropout_p)
    # transformers' collators and position-id helpers produce int64 offsets; the kernels index with int32.
    return ops.attention_varlen(q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), max_seqlen_q, max_seqlen_k,
                                softmax_scale=softmax_scale, causal=causal, window_size=tuple(window_size),
                                softcap=softcap or 0.0, return_softmax_lse=return_attn_probs)


def _lazy_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
    """Serve hf_flash's functions for our name; defer to transformers for every other implementation."""
    if asks_for_hf_flash(implementation):
        # No flash_attn_with_kvcache: transformers only uses it for names matching "flash.*[23]".
        return flash_attn_func, flash_attn_varlen_func, None, flash_utils._pad_input, flash_utils._unpad_input
    return _transformers_lazy_imports(implementation, attention_wrapper, allow_all_kernels=allow_all_kernels)


def hf_flash_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The attention function registered as ``"hf_flash"``: query ``[B, H, S, D]`` -> ``([B, S, H, D], None)``.

    ``key``/``value`` are contiguous states (no cache, ``DynamicCache``, ...: transformers' flash path, which
    unpads to our varlen kernel) or a ``PagedKV`` view from a ``PagedCache`` (our paged path).
    """
    if module.training and torch.is_grad_enabled():
        raise NotImplementedError("hf_flash is inference-only (no backward pass); use model.eval(), or "
                                  "attn_implementation='sdpa' for training")
    _refuse_sinks(kwargs)
    if isinstance(key, PagedKV):
        return paged_attention_forward(module, query, key, attention_mask, **kwargs), None
    return flash_attention_forward(module, query, key, value, attention_mask, **kwargs)


def paged_attention_forward(module, query, kv, attention_mask, *, scaling=None, sliding_window=None, softcap=None,
                            is_causal=None, **kwargs):
    """Store this layer's new tokens in the cache's pages, then attend over the pages in place. If anything here
    raises, the step is aborted: the cache holds exactly what it held before the step."""
    cache, layer_idx = kv.cache, kv.layer_idx
    layers = getattr(getattr(module, "config", None), "num_hidden_layers", cache.num_layers)
    if layers != cache.num_layers:
        raise ValueError(f"this PagedCache was made for a model with {cache.num_layers} layers, but the model using it "
                         f"has {layers}: make one PagedCache per model")
    batch, _, q_len, _ = query.shape
    plan = cache.layer_plan(layer_idx, attention_mask, q_len, batch)
    try:
        out = _store_and_attend(module, query, kv, plan, scaling=scaling, sliding_window=sliding_window,
                                softcap=softcap, is_causal=is_causal)
    except BaseException:
        cache.abort_step()
        raise
    cache.layer_done(layer_idx)
    return out


def _store_and_attend(module, query, kv, plan, *, scaling, sliding_window, softcap, is_causal):
    layer = kv.cache.layers[kv.layer_idx]
    batch, heads, q_len, head_dim = query.shape
    tensors = plan.on(query.device)
    dtype = layer.keys.dtype
    q = query.transpose(1, 2).to(dtype)
    k, v = kv.key.transpose(1, 2).to(dtype), kv.value.transpose(1, 2).to(dtype)  # [B, S, H_kv, D]
    k_rows, v_rows = k.reshape(batch * q_len, -1, head_dim), v.reshape(batch * q_len, -1, head_dim)
    ops.write_kv_pages(k_rows, v_rows, layer.keys, layer.values, tensors["slots"], max_slot=plan.max_slot)
    options = {"softmax_scale": scaling, "causal": module.is_causal if is_causal is None else is_causal,
               "window_size": (sliding_window - 1, -1) if sliding_window else (-1, -1), "softcap": softcap or 0.0}
    if plan.first:  # nothing cached before: the new states are all the keys, contiguous (the faster kernel path)
        if not plan.padded:
            return ops.attention(q, k, v, **options).to(query.dtype)
        rows, cu = tensors["rows"], tensors["cu_seqlens_q"]
        packed = ops.attention_varlen(q.reshape(batch * q_len, heads, head_dim).index_select(0, rows),
                                      k_rows.index_select(0, rows), v_rows.index_select(0, rows), cu, cu, **options)
    elif not plan.padded:
        out = ops.attention_with_kvcache(q, layer.keys, layer.values, tensors["seqlens"], tensors["block_table"],
                                         max_seqlen_k=plan.max_seqlen_k, num_splits=plan.num_splits, **options)
        return out.to(query.dtype)
    else:
        rows = tensors["rows"]
        packed = ops.attention_with_kvcache(q.reshape(batch * q_len, heads, head_dim).index_select(0, rows),
                                            layer.keys, layer.values, tensors["seqlens"], tensors["block_table"],
                                            cu_seqlens_q=tensors["cu_seqlens_q"], max_seqlen_k=plan.max_seqlen_k,
                                            **options)
    # A padded step: the valid rows were attended packed; pads get zeros (finite, never stored).
    out = query.new_zeros((batch * q_len, heads, head_dim))
    out.index_copy_(0, rows, packed.to(query.dtype))
    return out.view(batch, q_len, heads, head_dim)


def continuous_batching_attention_forward(module, query, key, value, attention_mask, *, cache, cu_seq_lens_q,
                                          cu_seq_lens_k, max_seqlen_q, max_seqlen_k, sliding_window=None, softcap=None,
                                          read_index, write_index, **kwargs):
    """``"paged|hf_flash"``: what continuous batching (``generate_batch``) calls before transformers 5.23, with its own
    paged cache, where 5.23 calls ``"hf_flash"`` itself. Store the new states, read every key of the batch's
    sequences back packed, attend varlen. (transformers' ``flash_paged`` would do the same but takes the window from
    a module attribute that Mistral lacks: Mistral would attend past its window.)"""
    _refuse_sinks(kwargs)
    if isinstance(cu_seq_lens_k, dict):  # models with full and sliding layers keep one set of lengths per kind
        kind = "sliding_attention" if sliding_window else "full_attention"
        cu_seq_lens_k, max_seqlen_k = cu_seq_lens_k[kind], max_seqlen_k[kind]
    k, v = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, read_index=read_index,
                        write_index=write_index)
    out = flash_attn_varlen_func(query.transpose(1, 2).squeeze(0).to(k.dtype), k, v, cu_seq_lens_q, cu_seq_lens_k,
                                 max_seqlen_q, max_seqlen_k, softmax_scale=module.scaling, causal=True,
                                 window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1), softcap=softcap)
    return out[None].to(query.dtype), None


_transformers_lazy_imports = flash_utils._lazy_imports


class _NoOpCastMessage(logging.Filter):
    """transformers' flash path says "Casting fp32 inputs back to torch.float32 for flash-attn compatibility" for every
    fp32 model: a cast to the dtype the inputs already have, and hf_flash computes fp32 natively. Drop that line only."""

    def filter(self, record):
        return not record.getMessage().startswith("Casting fp32 inputs back to torch.float32")


_no_op_cast_message = _NoOpCastMessage()


def register():
    """Make ``attn_implementation="hf_flash"`` loadable (idempotent)."""
    if flash_utils._lazy_imports is not _lazy_imports:
        flash_utils._lazy_imports = _lazy_imports
    AttentionInterface.register(NAME, hf_flash_attention_forward)
    AttentionInterface.register(f"paged|{NAME}", continuous_batching_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    logging.getLogger(flash_utils.__name__).addFilter(_no_op_cast_message)  # a set: idempotent
    generate_patch.apply()
    attn_implementation_patch.apply()
