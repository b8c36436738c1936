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
    for script, out, extra in (("bench_kernels.py", kernels, ["--backends", "flash,default"]),
                               ("bench_generate.py", generate, [])):
        done = run(script, "--device", "cpu", "--quick", "--out", str(out), *extra, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(kernels.read_text())
    assert {(r["head_dim"], r["seqlen"], r["causal"]) for r in data["prefill"]} == {
        (d, s, c) for d in (64, 128) for s in (64, 128) for c in (False, True)}
    # bf16 outputs of magnitude ~1 against SDPA's: a few bf16 ulps (2^-8) apart at most.
    assert all(r["tflops"]["ours"] > 0 and r["max_abs_diff"] < 2e-2 for r in data["prefill"])
    assert all(r["tbps"]["ours_p16"] > 0 and r["max_abs_diff"] < 2e-2 for r in data["decode"])
    records = json.loads(generate.read_text())["generate"]
    assert [r["impl"] for r in records] == ["sdpa", "static", "hf_flash"]
    assert all("error" not in r and r["e2e_tok_s"] > 0 for r in records)

    plots = tmp_path / "plots"
    # One section in two files (bench_generate.py run once per model): one chart.
    done = run("plot_benchmarks.py", str(kernels), str(generate), str(generate), "--out-dir", str(plots), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("generate.png") == 1
    for name in ("prefill", "decode", "generate"):
        image = matplotlib.image.imread(plots / f"{name}.png")
        assert image.shape[0] >= 400 and image.std() > 0.05  # drawn, not blank


def test_plot_says_when_there_is_nothing_to_draw(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"environment": {}}))
    done = run("plot_benchmarks.py", str(empty), "--out-dir", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 1
    assert "no prefill, decode or generate results" in done.stderr
