"""The repository's top-level kernels/ folder (installed as quantizer_plugin.kernels) never stands in for Hugging
Face's `kernels` library, which transformers >= 5.25 imports, when Python runs from the repository's root."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def hub_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not hub_kernels_installed(), reason="Hugging Face's kernels is not installed (transformers < 5.25)")
def test_python_c_from_the_root_imports_transformers_and_the_installed_kernels():
    script = (
        "import transformers, quantizer_plugin; transformers.LlamaConfig(); "
        "import kernels, quantizer_plugin.kernels as ours; print(kernels.__file__); print(ours.__file__)"
    )
    result = run_from_root("-c", script)
    assert result.returncode == 0, result.stderr[-3000:]
    hub_file, our_file = result.stdout.split()
    assert Path(hub_file).resolve().parent.parent != ROOT, hub_file
    assert Path(our_file).resolve() == ROOT / "kernels" / "__init__.py"


def test_without_the_hub_library_the_folder_is_an_empty_name_from_the_root():
    # -S leaves site-packages off sys.path: there is no other `kernels`. The name then looks like an empty namespace
    # package (what transformers' probe reads as "not installed"), and none of our kernel modules is reachable by it.
    script = "import kernels; print(kernels.__file__, list(kernels.__path__))\ntry:\n import kernels.layers\nexcept ImportError: print('no layers')"
    result = run_from_root("-S", "-c", script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["None []", "no layers"]


def test_the_readme_test_command_collects_and_runs_from_the_root():
    result = run_from_root("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_config.py", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_transformers_probe_from_the_root_finds_only_the_installed_library():
    # transformers probes for (and may import) `kernels`; a second copy of our kernels would register over the first
    probe = (
        "import sys; from transformers.utils import is_kernels_available; available = is_kernels_available(); "
        "ours = [m for m, mod in sys.modules.items() if m.split('.')[0] == 'kernels' "
        "and str(getattr(mod, '__file__', '') or '').startswith(sys.argv[1])]; "
        "print(available, ours, 'quantizer_plugin.kernels' in sys.modules)"
    )
    result = run_from_root("-c", probe, str(ROOT / "kernels"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(hub_kernels_installed()), "[]", "False"]
