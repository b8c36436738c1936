"""The benchmark scripts end to end on tiny shapes on the CPU (torch path): they run, write their JSON, and the plots
are drawn from it. A CPU's numbers mean nothing; this checks the scripts, the GPU runs measure."""
import json
import os
import subprocess
import sys

import matplotlib.image

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts")


def run(script, *args, cwd):
    # Without TRITON_INTERPRET the CPU runs the torch path: fast, and the kernels have their own tests.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *args], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_benchmarks_write_results_and_plots(tmp_path):
    kernels, generate = tmp_path / "kernels.json", tmp_path / "generate.json"
    for script, out, extra in (("bench_kernels.py", kernels, ["--backends", "flash,default", "--dtypes", "bf16,fp16"]),
                               ("bench_generate.py", generate, [])):
        done = run(script, "--device", "cpu", "--quick", "--out", str(out), *extra, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
    check_kernel_results(json.loads(kernels.read_text()))
    records = json.loads(generate.read_text())["generate"]
    assert [r["impl"] for r in records] == ["sdpa", "static", "hf_flash"]
    assert all("error" not in r and r["e2e_tok_s"] > 0 for r in records)

    plots = tmp_path / "plots"
    # One section in two files (bench_generate.py run once per model): one chart.
    done = run("plot_benchmarks.py", str(kernels), str(generate), str(generate), "--out-dir", str(plots), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("generate.png") == 1
    for name in ("prefill", "varlen", "append", "decode", "generate"):
        image = matplotlib.image.imread(plots / f"{name}.png")
        assert image.shape[0] >= 400 and image.std() > 0.05  # drawn, not blank


def test_prefill_rows_of_the_given_lengths_only(tmp_path):
    out = tmp_path / "kernels.json"
    done = run("bench_kernels.py", "--device", "cpu", "--quick", "--section", "prefill", "--backends", "flash",
               "--seqlens", "128", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())["prefill"]
    assert rows and {r["seqlen"] for r in rows} == {128}
    done = run("bench_kernels.py", "--device", "cpu", "--quick", "--seqlens", "1k", cwd=tmp_path)
    assert done.returncode == 2 and "--seqlens takes comma-separated integers" in done.stderr
    done = run("bench_kernels.py", "--device", "cpu", "--quick", "--seqlens", "128,100", cwd=tmp_path)
    assert done.returncode == 2 and "--seqlens 100: no prefill row has it" in done.stderr


# Outputs of magnitude ~1 against SDPA's: a few ulps (bf16 2^-8, fp16 2^-11) apart at most.
TOLERANCE = {"bf16": 2e-2, "fp16": 4e-3}


def check_kernel_results(data):
    """bench_kernels.py --quick --dtypes bf16,fp16 --backends flash,default: every section, row and dtype."""
    dtypes = ("bf16", "fp16")
    # MHA at head dims 64 and 128, GQA 4/2 at 128, head dim 256; each causal and not
    shapes = [(64, 4, 4, 64), (64, 4, 4, 128), (128, 2, 2, 64), (128, 2, 2, 128), (128, 4, 2, 64), (128, 4, 2, 128),
              (256, 1, 1, 64)]
    assert sorted((r["dtype"], r["head_dim"], r["heads"], r["kv_heads"], r["seqlen"], r["causal"])
                  for r in data["prefill"]) == sorted((t, *s, c) for t in dtypes for s in shapes for c in (False, True))
    for r in data["prefill"]:
        # SDPA's flash runs on the CPU too, GQA given to it as enable_gqa (not repeated K/V)
        assert r["tflops"]["ours"] > 0 and r["tflops"]["flash"] > 0 and r["repeated_kv"] == [], r
        assert r["max_abs_diff"] < TOLERANCE[r["dtype"]], r
        assert r["ours_host_us"] is None, r  # host time per call: measured on CUDA only
    assert sorted((r["dtype"], r["causal"]) for r in data["varlen"]) == [(t, c) for t in dtypes for c in (False, True)]
    for r in data["varlen"]:
        assert sum(r["lengths"]) == r["tokens"] and len(set(r["lengths"])) > 2, r  # ragged, packed without gaps
        assert r["tflops"]["ours"] > 0 and r["tflops"]["ours_padded"] > 0, r
        assert r["max_abs_diff"] < TOLERANCE[r["dtype"]], r
    assert sorted((r["dtype"], r["batch"], r["cached"], r["new"]) for r in data["append"]) == [
        (t, *shape) for t in dtypes for shape in ((1, 128, 64), (2, 96, 32))]
    for r in data["append"]:
        variants = ("ours_p16", "ours_p64", "ours_write")
        assert set(r["tflops"]) == {"ours_dense", *variants} and all(v > 0 for v in r["tflops"].values()), r
        assert set(r["over_dense"]) == set(variants) and all(v > 0 for v in r["over_dense"].values()), r
        # against SDPA with a bottom-right causal mask: a top-left one would be far off (the new tokens see L more)
        assert r["max_abs_diff"] < TOLERANCE[r["dtype"]], r
    assert sorted((r["dtype"], r["batch"], r["seqlen"]) for r in data["decode"]) == [
        (t, b, n) for t in dtypes for b, n in ((1, 256), (2, 128))]
    for r in data["decode"]:
        assert r["num_splits"] == 1, r  # the torch path attends each sequence whole
        assert r["tbps"]["ours_p16"] > 0 and r["tbps"]["ours_p64"] > 0, r
        assert r["max_abs_diff"] < TOLERANCE[r["dtype"]], r
    assert all(data[f"{section}_errors"].keys() <= {"flash", "flash with GQA", "default"}
               for section in ("prefill", "varlen", "append", "decode")), data  # anchors may refuse; ours never


def test_plot_says_when_there_is_nothing_to_draw(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"environment": {}}))
    done = run("plot_benchmarks.py", str(empty), "--out-dir", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 1
    assert "no prefill, varlen, append, decode, generate results" in done.stderr


def test_perplexity_refuses_windows_that_score_nothing(tmp_path):
    """Before the model loads: a window of one token, no windows at all, or a stride past the window."""
    for args, bad in ((["--window", "1"], "window=1"), (["--max-windows", "0"], "max_windows=0"),
                      (["--window", "8", "--stride", "9"], "stride=9")):
        done = run("perplexity.py", *args, cwd=tmp_path)
        assert done.returncode == 2 and bad in done.stderr, done.stderr
