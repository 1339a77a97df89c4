"""The C extension of the project (the decontamination filter kernel); everything else is in pyproject.toml.

TULU_NO_EXTENSIONS=1 leaves it out: the vLLM interpreter's editable install (Makefile) shares the source tree with
the main one, which builds the kernel in place; two builds side by side would write the same .so.
"""

import os

from setuptools import Extension, setup

setup(
    ext_modules=[] if os.environ.get("TULU_NO_EXTENSIONS") else [
        Extension(
            "tulu_pipeline.curation._decon_kernel",
            sources=["tulu_pipeline/curation/_decon_kernel.c"],
            extra_compile_args=["-O3", "-std=c11"],
        )
    ]
)
