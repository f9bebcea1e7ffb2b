"""Only the optional C extension lives here; all metadata is in pyproject.toml.

``guardian._streamcopy`` (non-temporal copies into the staging arena, see the C file)
is built when a C compiler and the Python headers are present. ``optional=True``: a
failed build prints a warning and the install goes on; guardian then copies with
numpy (correct, ~25 % slower stalls on large states).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "guardian._streamcopy",
            sources=["guardian/_streamcopy.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
