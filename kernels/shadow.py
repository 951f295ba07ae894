"""Hand a top-level `import kernels` that found this folder over to the package it shadows.

The repository keeps its Triton kernels in a top-level folder named `kernels/` (installed as
quantizer_plugin.kernels). Python puts the working directory first on sys.path for `python -m pytest`, `python -c`
and notebooks, so from the repository's root `import kernels` finds this folder before Hugging Face's `kernels`
library in site-packages; transformers >= 5.25 imports that library unconditionally.

`hand_over` finds `kernels` on sys.path without this folder's parent. If it is there, that module is executed and put
in sys.modules in our place (the import system returns whatever sys.modules holds once the package's __init__ has
run), so `import kernels` gives the installed library. If it is not, the module becomes what an empty PEP 420
namespace package would be (no file, no version, no submodules): transformers' availability probe reads that as
"not installed", and none of our kernel modules is importable under the wrong name.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _other_path_entries(own_root: str) -> list[str]:
    own = os.path.realpath(own_root)
    entries = []
    for entry in sys.path:
        directory = os.path.realpath(entry or os.getcwd()) if isinstance(entry, str) else None
        if directory != own:
            entries.append(entry)
    return entries


def hand_over(name: str, folder: str) -> None:
    shadowed = sys.modules[name]
    spec = importlib.machinery.PathFinder.find_spec(name, _other_path_entries(os.path.dirname(folder)))
    if spec is None or spec.loader is None:
        shadowed.__file__ = None
        shadowed.__path__ = []
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules[name] = shadowed
        raise
