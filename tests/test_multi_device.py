"""hf_flash on a model spread over processes or devices, against transformers' sdpa, fp32, token for token.

* Tensor parallelism (``DistributedConfig(tp_plan="auto")`` under torchrun): each rank's attention computes its share
  of the heads, and its PagedCache holds that share. On CPU two ranks over gloo; on two GPUs over NCCL.
* accelerate's ``device_map``: on CPU a layer offloaded to disk (accelerate's hooks load its weights per forward); on
  two GPUs layers on cuda:0 and cuda:1, each layer's pages on its own GPU, decode steps eager (no CUDA graphs).

Run as a script, this file is the torchrun worker of the tensor-parallel test (``_tensor_parallel_worker``).
"""
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from test_cache import _generate, cache_of
from test_graphs import graphs_on_any_device  # noqa: F401  (a fixture)
from test_internals import fresh_warnings  # noqa: F401  (a fixture)
from test_models import left_padded_batch, tiny_model

from hf_flash import PagedCache, ops
from hf_flash.graphs import captured_graphs

TP_SIZE = 2
NEW = 12  # new tokens per greedy generate
LENGTHS = [9, 5, 2]  # left-padded prompts
PAGE_SIZE = 4
WORKER_TIMEOUT_S = 120  # two ranks importing torch and transformers on two shared cores take about 15 s

pytestmark = pytest.mark.usefixtures("torch_path_on_cpu")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def _pages_needed():
    """Pages the batch fills after ``NEW`` tokens (the last one is never fed back; padding is never stored)."""
    return sum(math.ceil((n + NEW - 1) / PAGE_SIZE) for n in LENGTHS)


def _bytes_per_page(config, kv_heads):
    """K + V of one page in every layer, fp32, for ``kv_heads`` heads per layer (computed from the config)."""
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * PAGE_SIZE * kv_heads * head_dim * 4


def _greedy(model, impl, ids, mask, **kwargs):
    return _generate(model, impl, ids, mask, new=NEW, do_sample=False, return_dict_in_generate=True, **kwargs)


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny random Llama (4 query heads, 2 KV heads, 2 layers) saved as from_pretrained reads it."""
    model, _ = tiny_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------- tensor parallelism


def _tensor_parallel_worker(checkpoint, work_dir, device):
    """One torchrun rank: load the checkpoint split over the ranks, generate with sdpa, with hf_flash's default cache
    and with a PagedCache sized by ``max_memory`` for this rank's heads; save the tokens and the pools' shapes."""
    from transformers.distributed import DistributedConfig

    inputs = torch.load(work_dir / "inputs.pt")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="sdpa",
        distributed_config=DistributedConfig(tp_plan="auto")).eval()
    ids, mask = inputs["ids"].to(model.device), inputs["mask"].to(model.device)
    local_kv_heads = model.config.num_key_value_heads // TP_SIZE
    # The budget holds exactly the pages the batch needs at this rank's heads: sized from the config's heads, the
    # cache would get half of them and run out (grow=False).
    explicit = PagedCache(model.config, page_size=PAGE_SIZE, grow=False,
                          max_memory=_pages_needed() * _bytes_per_page(model.config, local_kv_heads))
    # On CPU the torch path, as the torch_path_on_cpu fixture gives the tests in the parent process.
    with ops.use_backend("torch" if device == "cpu" else "triton"):
        result = {"sdpa": _greedy(model, "sdpa", ids, mask).sequences}
        default = _greedy(model, "hf_flash", ids, mask)
        result["hf_flash"] = default.sequences
        result["explicit"] = _greedy(model, "hf_flash", ids, mask, cache=explicit).sequences
    for name, cache in (("default", cache_of(default)), ("explicit", explicit)):
        result[f"{name}_pool_shapes"] = [tuple(layer.keys.shape) for layer in cache.layers]
        result[f"{name}_num_kv_heads"] = cache.num_kv_heads
    result["explicit_stats"] = explicit.memory_stats()
    result["local_kv_heads"] = local_kv_heads
    result = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in result.items()}
    torch.save(result, work_dir / f"rank{torch.distributed.get_rank()}.pt")
    torch.distributed.destroy_process_group()


def _run_workers(checkpoint, work_dir, device):
    """torchrun ``TP_SIZE`` workers of this file; on timeout the whole process group (torchrun and its workers) is
    killed, so no rank is left waiting on a collective."""
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # transformers then builds a CPU mesh on gloo
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={TP_SIZE}",
               __file__, str(checkpoint), str(work_dir), device]
    worker = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        output, _ = worker.communicate(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        output, _ = worker.communicate()
        pytest.fail(f"the torchrun workers did not finish in {WORKER_TIMEOUT_S} s:\n{output[-4000:]}")
    assert worker.returncode == 0, f"the torchrun workers failed:\n{output[-6000:]}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, two_gpus])])
def test_tensor_parallel_generate_matches_one_process(checkpoint, tmp_path, device):
    """Each rank generates the same tokens as one process holding the whole model (sdpa and hf_flash), with its
    default PagedCache and with one sized by max_memory; every pool holds the rank's share of the KV heads."""
    ids, mask = left_padded_batch(LENGTHS)
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    _run_workers(checkpoint, tmp_path, device)

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval().to(device)
    want = _greedy(model, "sdpa", ids.to(device), mask.to(device)).sequences.cpu()
    assert torch.equal(_greedy(model, "hf_flash", ids.to(device), mask.to(device)).sequences.cpu(), want)
    config = model.config
    local_kv_heads = config.num_key_value_heads // TP_SIZE
    head_dim = config.hidden_size // config.num_attention_heads
    for rank in range(TP_SIZE):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["local_kv_heads"] == local_kv_heads >= 1
        for name in ("sdpa", "hf_flash", "explicit"):
            assert torch.equal(got[name], want), (rank, name)
        for name in ("default", "explicit"):
            assert got[f"{name}_num_kv_heads"] == local_kv_heads
            assert all(shape[2:] == (local_kv_heads, head_dim) for shape in got[f"{name}_pool_shapes"])
        stats = got["explicit_stats"]
        assert stats["pages_total"] == stats["pages_used"] == _pages_needed()
        assert stats["bytes_allocated"] == _pages_needed() * _bytes_per_page(config, local_kv_heads)


def test_pools_take_their_heads_from_the_first_key_states():
    """As under tensor parallelism: key states with fewer heads than the config (a rank's share) size the pools, also
    from max_memory; later states with other heads, or more heads than the config, are refused with nothing
    changed."""
    model, _ = tiny_model("llama")
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    local_kv_heads = config.num_key_value_heads // TP_SIZE
    cache = PagedCache(config, page_size=PAGE_SIZE, max_memory=5 * _bytes_per_page(config, local_kv_heads))
    assert cache.num_kv_heads is None
    states = torch.randn(2, local_kv_heads, 3, head_dim)
    cache.update(states, states, 0)
    assert (cache.num_kv_heads, cache.num_pages) == (local_kv_heads, 5)
    assert cache.layers[0].keys.shape == (5, PAGE_SIZE, local_kv_heads, head_dim)
    other = torch.randn(2, config.num_key_value_heads, 3, head_dim)
    with pytest.raises(ValueError, match=rf"layer 1's key_states .* have {config.num_key_value_heads} KV heads, but "
                                         rf"this PagedCache's pools hold {local_kv_heads}"):
        cache.update(other, other, 1)
    assert not cache.layers[1].is_initialized
    too_many = torch.randn(2, config.num_key_value_heads + 1, 3, head_dim)
    fresh = PagedCache(config, page_size=PAGE_SIZE)
    with pytest.raises(ValueError, match=rf"have {config.num_key_value_heads + 1} KV heads, but this PagedCache was "
                                         rf"made for a model with {config.num_key_value_heads}"):
        fresh.update(too_many, too_many, 0)
    assert fresh.num_kv_heads is None and not fresh.layers[0].is_initialized
    longer = torch.randn(2, local_kv_heads, 4, head_dim)
    differ = f"key_states {tuple(states.shape)} and value_states {tuple(longer.shape)} differ"
    with pytest.raises(ValueError, match=re.escape(differ)):
        fresh.update(states, longer, 0)


# ----------------------------------------------------------------------------------------- device_map


def _split_llama(first, second):
    """A device_map for the tiny Llama: embeddings and layer 0 on ``first``, layer 1 and the head on ``second``."""
    return {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first,
            "model.layers.1": second, "model.norm": second, "lm_head": second}


def _check_split_generate(model, ids, mask):
    """Greedy tokens with hf_flash (generate's default cache, and a PagedCache with exactly the pages needed) equal
    sdpa's; returns the default cache."""
    want = _greedy(model, "sdpa", ids, mask).sequences
    default = _greedy(model, "hf_flash", ids, mask)
    assert type(cache_of(default)).__name__ == "PagedCache"
    assert torch.equal(default.sequences, want)
    explicit = PagedCache(model.config, page_size=PAGE_SIZE, num_pages=_pages_needed(), grow=False)
    assert torch.equal(_greedy(model, "hf_flash", ids, mask, cache=explicit).sequences, want)
    assert explicit.memory_stats()["pages_free"] == 0
    return cache_of(default)


def test_a_layer_offloaded_to_disk_matches_sdpa(checkpoint, tmp_path, graphs_on_any_device, caplog,
                                                fresh_warnings):  # noqa: F811  (the fixtures)
    """accelerate's hooks load the offloaded layer's weights for each forward and hand it the cache untouched; decode
    steps, handed to the graph runner, stay eager (a replay would not load the weights) and the log says why, once."""
    device_map = _split_llama("cpu", "disk")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, device_map=device_map, offload_folder=tmp_path / "offload")
    assert model.model.layers[1].self_attn.k_proj.weight.device.type == "meta"  # offloaded: loaded per forward
    ids, mask = left_padded_batch(LENGTHS)
    with caplog.at_level("WARNING", logger="hf_flash"):
        cache = _check_split_generate(model, ids, mask)
    assert [layer.keys.device.type for layer in cache.layers] == ["cpu", "cpu"]
    assert not captured_graphs(cache)
    reasons = [r.getMessage() for r in caplog.records if "decode steps run eagerly" in r.getMessage()]
    on_disk = ", ".join(sorted(name for name, where in device_map.items() if where == "disk"))
    assert len(reasons) == 1 and f"accelerate offloads {on_disk} to the CPU or disk" in reasons[0], reasons


@pytest.mark.cuda
@two_gpus
def test_layers_on_two_gpus_match_sdpa(checkpoint, caplog, fresh_warnings):  # noqa: F811  (the fixture)
    """Each layer's pages on its own GPU, the step plan copied to each, decode steps eager with the reason logged
    once (no CUDA graph captured), tokens equal to sdpa's."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                              device_map=_split_llama(0, 1))
    ids, mask = (t.to("cuda:0") for t in left_padded_batch(LENGTHS))
    with caplog.at_level("WARNING", logger="hf_flash"):
        cache = _check_split_generate(model, ids, mask)
    assert [str(layer.keys.device) for layer in cache.layers] == ["cuda:0", "cuda:1"]
    assert not captured_graphs(cache)
    reasons = [r.getMessage() for r in caplog.records if "decode steps run eagerly" in r.getMessage()]
    assert len(reasons) == 1 and "cuda:0, cuda:1" in reasons[0], reasons


def test_a_cache_stays_on_the_devices_its_layers_first_ran_on():
    """States on another device than a layer's pages (a model moved, or PagedCache(device=...) for a split model) are
    refused before anything changes. The meta device stands in for a second device here."""
    model, _ = tiny_model("llama")
    ids, mask = left_padded_batch(LENGTHS)
    cache = PagedCache(model.config, page_size=PAGE_SIZE)
    _generate(model, "hf_flash", ids, mask, new=2, do_sample=False, cache=cache)
    before = cache.snapshot()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    elsewhere = torch.empty(len(LENGTHS), model.config.num_key_value_heads, 1, head_dim, device="meta")
    with pytest.raises(ValueError, match="layer 0's key_states are on meta but its pages are on cpu"):
        cache.update(elsewhere, elsewhere, 0)
    assert cache.snapshot() == before
    pinned = PagedCache(model.config, page_size=PAGE_SIZE, device="meta")
    with pytest.raises(ValueError, match=r"PagedCache\(device='meta'\), but layer 0's key_states are on cpu"):
        _generate(model, "hf_flash", ids, mask, new=2, do_sample=False, cache=pinned)
    assert pinned.batch_size == 0 and not any(layer.is_initialized for layer in pinned.layers)


if __name__ == "__main__":  # a torchrun worker of test_tensor_parallel_generate_matches_one_process
    _tensor_parallel_worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
    # Its result is saved: leave without the interpreter's teardown, where a native thread left running (gloo's)
    # once aborted a rank with "terminate called without an active exception" after a passing run.
    sys.stdout.flush()
    os._exit(0)
