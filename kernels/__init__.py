"""Triton kernels for the low-bit GEMMs, installed as quantizer_plugin.kernels.

Importing this package registers its kernels with quantizer_plugin.ops (the dispatch seam), which imports it on
first need: on CUDA, or when QUANTIZER_PLUGIN_KERNELS=triton (on CPU, with TRITON_INTERPRET=1). Each module holds
one family of kernels and its launchers; nothing here needs a GPU to import.

Run from the repository's root, this folder is also importable as a top-level `kernels`, the name of Hugging Face's
kernels library, which transformers probes for (and imports, finding no version metadata). Under that name nothing
is imported: a second copy of every kernel would register itself over the first, and import Triton with it.
"""

if __name__ == "quantizer_plugin.kernels":
    from .tuning import interpreting

    # Whether these kernels were defined for Triton's interpreter (TRITON_INTERPRET=1 at import) rather than a GPU.
    INTERPRETED = interpreting()

    from . import layers  # noqa: F401  (registers the layer entry points of every kernel family)
