"""The C extension of the project (the decontamination filter kernel); everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tulu_pipeline.curation._decon_kernel",
            sources=["tulu_pipeline/curation/_decon_kernel.c"],
            extra_compile_args=["-O3", "-std=c11"],
        )
    ]
)
