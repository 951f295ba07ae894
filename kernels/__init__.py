"""Triton kernels for the low-bit GEMMs, installed as quantizer_plugin.kernels.

Importing this package registers its kernels with quantizer_plugin.ops (the dispatch seam), which imports it on
first need: on CUDA, or when QUANTIZER_PLUGIN_KERNELS=triton (on CPU, with TRITON_INTERPRET=1). Each module holds
one family of kernels and its launchers; nothing here needs a GPU to import.

Run from the repository's root (`python -m pytest`, `python -c`, a notebook), this folder is also found as a
top-level `kernels`: the name of Hugging Face's kernels library, which transformers >= 5.25 depends on and imports.
Under that name this file hands the import over to the installed library (shadow.py), so our folder never stands in
for it.
"""

if __name__ == "quantizer_plugin.kernels":
    from .tuning import interpreting

    # Whether these kernels were defined for Triton's interpreter (TRITON_INTERPRET=1 at import) rather than a GPU.
    INTERPRETED = interpreting()

    from . import layers  # noqa: F401  (registers the layer entry points of every kernel family)
else:  # imported as a top-level `kernels` because the repository's root is on sys.path
    import importlib.util as _util
    import os as _os

    # Loaded by file, not imported: under this name there is no package of ours to import it from.
    _spec = _util.spec_from_file_location("_quantizer_plugin_kernels_shadow", _os.path.join(__path__[0], "shadow.py"))
    _shadow = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_shadow)
    _shadow.hand_over(__name__, __path__[0])
