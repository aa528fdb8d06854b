"""Build script for fireflyer's C extensions (the metadata lives in pyproject.toml).

Each package that ships a C extension lists it in EXTENSIONS below; pip builds them with the
package (``pip install -e .`` builds them in place).
"""

from setuptools import setup

EXTENSIONS: list = []

setup(ext_modules=EXTENSIONS)
