"""The package's seams, checked on its source: other libraries' private names only in integrations/, safetensors files
opened only in checkpoints/, and kernels that never reach back into the layer (modules.py).

These read the code (its syntax tree), not comments or docstrings, which may name what they explain.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "quantizer_plugin"
# The names integrations/README.md lists: what transformers, PEFT and accelerate do not publish, and the import system.
PRIVATE_NAMES = {
    "AUTO_QUANTIZATION_CONFIG_MAPPING", "AUTO_QUANTIZER_MAPPING", "merge_quantization_configs",
    "_upload_modified_files", "_keep_in_fp32_modules", "_from_config", "_name_or_path",
    "_maybe_include_all_linear_layers", "_register_custom_module", "_custom_modules", "get_nb_trainable_parameters",
    "meta_path", "_hf_hook", "weights_map", "OffloadedWeightsLoader", "PrefixedDataset", "save_folder",
}  # fmt: skip


def sources(folder: Path, *, outside: tuple[str, ...] = ()) -> list[Path]:
    return [p for p in sorted(folder.rglob("*.py")) if not any(part in outside for part in p.relative_to(folder).parts)]


def names_used(path: Path) -> set[str]:
    """Attribute and variable names, imported names, and strings that are identifiers (as getattr is given)."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.Name):
            used.add(node.id)
        elif isinstance(node, ast.ImportFrom):
            used.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            used.add(node.value)  # getattr(module, "_hf_hook"), a method name held in a constant
    return used


def runtime_imports(path: Path) -> set[str]:
    """The modules a file imports when it runs (imports under `if TYPE_CHECKING:` left out), as written."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
                 "TYPE_CHECKING" for n in ast.walk(node)}  # fmt: skip
    imported = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
            imported.update(f"{'.' * node.level}{node.module + '.' if node.module else ''}{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    return imported


@pytest.mark.parametrize("path", sources(PACKAGE, outside=("integrations",)), ids=lambda p: str(p.relative_to(ROOT)))
def test_other_libraries_private_names_are_touched_only_in_the_integrations_wing(path):
    touched = names_used(path) & PRIVATE_NAMES
    assert not touched, f"{path.relative_to(ROOT)} uses {sorted(touched)}: move it to quantizer_plugin/integrations/"


def test_the_wing_is_where_those_names_are_used():
    """The check above means something: each listed name is used in integrations/ (or the list is stale)."""
    used = set().union(*(names_used(p) for p in sources(PACKAGE / "integrations")))
    assert PRIVATE_NAMES - {"_from_config", "_name_or_path"} <= used, PRIVATE_NAMES - used


@pytest.mark.parametrize("path", sources(PACKAGE, outside=("checkpoints",)), ids=lambda p: str(p.relative_to(ROOT)))
def test_safetensors_files_are_opened_only_in_the_checkpoint_wing(path):
    assert "safe_open" not in names_used(path), f"{path.relative_to(ROOT)}: read headers through checkpoints/headers.py"


KERNEL_SOURCES = [PACKAGE / "ops.py", *sources(PACKAGE / "cpu"), *sources(ROOT / "kernels")]


@pytest.mark.parametrize("path", KERNEL_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_and_the_dispatch_seam_never_import_the_layer(path):
    """Kernels are handed typed records (formats/records.py); importing modules.py would bring the import circle back."""
    assert not {name for name in runtime_imports(path) if name.split(".")[-1] == "modules"}, path.relative_to(ROOT)
