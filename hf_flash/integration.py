"""Glue between transformers and ``hf_flash.ops``, through transformers' public registries only.

``register()`` puts hf_flash's attention function under the name ``"hf_flash"`` in ``AttentionInterface`` (and
``"paged|hf_flash"``, what continuous batching calls before transformers 5.23) and the 2-D mask function in
``AttentionMaskInterface`` (without a mask function every layer would silently get ``attention_mask=None``). The
attention function takes a ``PagedKV`` view from a ``PagedCache`` (the paged path) or contiguous states (no cache, a
``DynamicCache``: transformers' flash path, which unpads to the varlen kernel through the flash-attn-compatible
``flash_attn_func`` / ``flash_attn_varlen_func`` here, served by the ``hf_flash.patches.flash_loader`` patch).
"""
import torch
import transformers.modeling_flash_attention_utils as flash_utils
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.masking_utils import flash_attention_mask

from . import ops
from .cache import PagedKV

NAME = "hf_flash"  # the attn_implementation users ask for


def asks_for_hf_flash(implementation):
    """Whether an ``attn_implementation`` is ours; transformers before 5.23 prefixes "paged|" for continuous
    batching."""
    return isinstance(implementation, str) and implementation.removeprefix("paged|") == NAME


def _check_inference(dropout_p):
    if dropout_p:
        raise ValueError(f"hf_flash has no attention dropout (dropout_p={dropout_p}); call model.eval() first")


def _refuse_sinks(kwargs):
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("hf_flash does not implement attention sinks (s_aux) yet")


def _check_unsupported(dropout_p, alibi_slopes):
    _check_inference(dropout_p)
    if alibi_slopes is not None:
        raise NotImplementedError("hf_flash has no ALiBi (alibi_slopes); use attn_implementation='sdpa' or 'eager'")


def _flash_attn_result(result, return_attn_probs):
    # flash-attn returns (out, softmax_lse, S_dmask); S_dmask holds dropout's pattern, and hf_flash has no dropout.
    return (*result, None) if return_attn_probs else result


# The two functions below take flash-attn 2's arguments in flash-attn 2's order (callers pass them by position too).
# Rows that see no key give out 0 and lse -inf (flash-attn 2: +inf without splits).
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn.flash_attn_func`` on ``hf_flash.ops.attention`` (``deterministic``: always)."""
    _check_unsupported(dropout_p, alibi_slopes)
    return _flash_attn_result(ops.attention(q, k, v, softmax_scale=softmax_scale, causal=causal,
                                            window_size=tuple(window_size), softcap=softcap or 0.0,
                                            return_softmax_lse=return_attn_probs), return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """``flash_attn.flash_attn_varlen_func`` on ``hf_flash.ops.attention_varlen`` (``block_table``: K/V in pages)."""
    _check_unsupported(dropout_p, alibi_slopes)
    # transformers' collators and position-id helpers produce int64 offsets; the kernels index with int32.
    return _flash_attn_result(ops.attention_varlen(q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), max_seqlen_q,
                                                   max_seqlen_k, softmax_scale=softmax_scale, causal=causal,
                                                   window_size=tuple(window_size), softcap=softcap or 0.0,
                                                   block_table=block_table, return_softmax_lse=return_attn_probs),
                              return_attn_probs)


def hf_flash_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The attention function registered as ``"hf_flash"``: query ``[B, H, S, D]`` -> ``([B, S, H, D], None)``.

    ``key``/``value`` are contiguous states (no cache, ``DynamicCache``, ...: transformers' flash path, which
    unpads to our varlen kernel) or a ``PagedKV`` view from a ``PagedCache`` (our paged path).
    """
    if module.training and torch.is_grad_enabled():
        raise NotImplementedError("hf_flash is inference-only (no backward pass); use model.eval(), or "
                                  "attn_implementation='sdpa' for training")
    _refuse_sinks(kwargs)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2:
        # What transformers passes through untouched: a caller's own 4-D pattern, which the kernels (causal, window,
        # padding) cannot follow.
        raise ValueError(f"hf_flash attends with a 2-D [batch, length] padding mask, but this forward got "
                         f"attention_mask of shape {tuple(attention_mask.shape)}: an arbitrary attention pattern needs "
                         f"attn_implementation='sdpa' or 'eager'")
    if isinstance(key, PagedKV):
        return paged_attention_forward(module, query, key, attention_mask, **kwargs), None
    try:
        return flash_attention_forward(module, query, key, value, attention_mask, **kwargs)
    except StopIteration as e:  # escaping a forward, it would silently end a caller's loop over batches
        raise RuntimeError("transformers' flash path takes the dtype for fp32 inputs from an nn.Linear of the "
                           "attention module, and this one has none (GPT-2's Conv1D, say): run the model in fp16 or "
                           "bf16, or with attn_implementation='sdpa'") from e


def paged_attention_forward(module, query, kv, attention_mask, *, scaling=None, sliding_window=None, softcap=None,
                            is_causal=None, dropout=0.0, **kwargs):
    """Store this layer's new tokens in the cache's pages, then attend over the pages in place. If anything here
    raises, the step is aborted: the cache holds exactly what it held before the step."""
    _check_inference(dropout)  # the flash path's flash_attn_func refuses it too
    cache, layer_idx = kv.cache, kv.layer_idx
    layers = getattr(getattr(module, "config", None), "num_hidden_layers", cache.num_layers)
    if layers != cache.num_layers:
        raise ValueError(f"this PagedCache was made for a model with {cache.num_layers} layers, but the model using it "
                         f"has {layers}: make one PagedCache per model")
    batch, _, q_len, _ = query.shape
    if layer_idx == 0:  # once a forward, before anything is planned or stored
        _refuse_packed_rows(kwargs, attention_mask, batch, q_len)
    plan = cache.layer_plan(layer_idx, attention_mask, q_len, batch)
    try:
        out = _store_and_attend(module, query, kv, plan, scaling=scaling, sliding_window=sliding_window,
                                softcap=softcap, is_causal=is_causal)
    except BaseException:
        cache.abort_step()
        raise
    cache.layer_done(layer_idx)
    return out


def _refuse_packed_rows(kwargs, attention_mask, batch, q_len):
    """The paged path attends each row of the batch as one sequence. Rows packing several documents back to back
    (transformers' flash path attends them apart: told by ``cu_seq_lens_*``, or by positions that restart in a single
    unmasked row) would see each other's tokens there."""
    positions = kwargs.get("position_ids")
    packed = kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None
    if (not packed and positions is not None and attention_mask is None and batch == 1 and q_len > 1
            and not ops._host_reads_forbidden(positions.device)):
        packed = bool((positions[..., 1:] - positions[..., :-1] != 1).any())  # one host read a forward
    if packed:
        raise NotImplementedError("hf_flash's PagedCache holds one sequence per row, but this row packs several "
                                  "(cu_seq_lens_* given, or positions that restart): run packed rows without a cache, "
                                  "or give the sequences as a padded batch")


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
                                          cu_seq_lens_k, max_seqlen_q, max_seqlen_k, scaling=None, sliding_window=None,
                                          softcap=None, dropout=0.0, read_index, write_index, **kwargs):
    """``"paged|hf_flash"``: what continuous batching (``generate_batch``) calls before transformers 5.23, with its own
    paged cache, where 5.23 calls ``"hf_flash"`` itself. Store the new states, read every key of the batch's
    sequences back packed, attend varlen. (transformers' ``flash_paged`` would do the same but takes the window from
    a module attribute that Mistral lacks: Mistral would attend past its window.)"""
    _check_inference(dropout)
    _refuse_sinks(kwargs)
    if kwargs.get("block_table") is not None:  # transformers' decode fast path, which leaves the indices unset
        raise NotImplementedError("hf_flash's continuous-batching attention reads the cache through read_index and "
                                  "write_index, but transformers passed a block table (its decode fast path): set "
                                  "ContinuousBatchingConfig(max_blocks_per_request=0)")
    if isinstance(cu_seq_lens_k, dict):  # models with full and sliding layers keep one set of lengths per kind
        kind = "sliding_attention" if sliding_window else "full_attention"
        cu_seq_lens_k, max_seqlen_k = cu_seq_lens_k[kind], max_seqlen_k[kind]
    k, v = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, read_index=read_index,
                        write_index=write_index)
    out = flash_attn_varlen_func(query.transpose(1, 2).squeeze(0).to(k.dtype), k, v, cu_seq_lens_q, cu_seq_lens_k,
                                 max_seqlen_q, max_seqlen_k, softmax_scale=scaling, causal=True,
                                 window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1), softcap=softcap)
    return out[None].to(query.dtype), None


def attention_mask(*args, mask_function=None, config=None, **kwargs):
    """transformers' flash mask function (the 2-D padding mask, or None when there is no padding), refusing the masks
    it would drop: spans a causal model's own mask opens both ways (image tokens, blocks), which transformers ORs onto
    the causal mask. A model whose attention is bidirectional (EmbeddingGemma) is attended so by the flash path."""
    bidirectional = getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True)
    if getattr(mask_function, "__name__", None) == "or_mask" and not bidirectional:
        raise ValueError("this model's attention mask is not causal (tokens attending both ways, such as image "
                         "tokens, or a mask function of its own), and hf_flash's kernels attend causally, by sliding "
                         "window or bidirectionally only: use attn_implementation='sdpa' or 'eager'")
    return flash_attention_mask(*args, **kwargs, **({} if mask_function is None else {"mask_function": mask_function}),
                                **({} if config is None else {"config": config}))


def register():
    """Register the attention functions and the mask function under hf_flash's names (idempotent)."""
    AttentionInterface.register(NAME, hf_flash_attention_forward)
    AttentionInterface.register(f"paged|{NAME}", continuous_batching_attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask)
