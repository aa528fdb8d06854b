"""Build script for fireflyer's C extensions (the metadata lives in pyproject.toml).

Each package that ships a C extension lists it in EXTENSIONS below; pip builds them with the
package (``pip install -e .`` builds them in place).

A C extension that fails to build does not fail the install when its package has a pure-Python
fallback (hfreduce falls back to numpy kernels and says so in ``hfreduce.info()``).
"""

import os
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_CFLAGS = ["-O3", "-std=gnu11", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function"]
if platform.machine() in ("x86_64", "AMD64"):
    # Baseline only: the kernels carry AVX2 / AVX-512 clones picked at run time (target_clones).
    _CFLAGS.append("-mtune=generic")

EXTENSIONS: list = [
    Extension("hfreduce._C", ["hfreduce/_kernels.c"], extra_compile_args=_CFLAGS),
]

#: Extensions whose package works without them (built when possible, skipped with a warning).
OPTIONAL = {"hfreduce._C"}


class BuildExt(build_ext):
    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - compiler errors come in many types
            if ext.name not in OPTIONAL:
                raise
            # an earlier build of it must not stay behind: the package would load stale code
            # (an in-place build leaves the old module next to the sources)
            for path in {self.get_ext_fullpath(ext.name),
                         os.path.join(os.path.dirname(__file__) or ".", self.get_ext_filename(ext.name))}:
                if os.path.exists(path):
                    os.remove(path)
            print(f"WARNING: optional extension {ext.name} failed to build ({exc}); "
                  "its package falls back to pure Python")


setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": BuildExt})
