"""Triton kernels for the low-bit GEMMs, installed as quantizer_plugin.kernels.

Importing this package registers its kernels with quantizer_plugin.ops (the dispatch seam). It must import
without a GPU; the Triton kernels themselves arrive with the kernels issue, until then every format runs on
the plain-PyTorch reference in quantizer_plugin.formats.
"""
