"""Every touch of another library's private names, in one place: transformers.py, peft.py and accelerate.py.

The rest of the package uses these libraries' public APIs only, and reaches their internals through the functions
here. README.md lists each name we touch, the versions it is tested with, and why no public seam serves; a rename
in one of those libraries then breaks one file here, and its tests say which.
"""
