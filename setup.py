"""Build the relay's compiled step (pooler/pooling/_relaystep.pyx) when Cython and a C
compiler are there; without them the package installs and uses relaystep_py."""
from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from Cython.Build import cythonize
    ext_modules = cythonize(["pooler/pooling/_relaystep.pyx"], language_level=3, quiet=True)
except ImportError:           # no Cython: the pure-Python step is used
    ext_modules = []
for ext in ext_modules:
    ext.optional = True       # a failed compile leaves the pure-Python step, not a failed install
    ext.extra_compile_args = ["-O2"]


class OptionalBuildExt(build_ext):
    """A missing compiler is a warning, not a failed install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:            # e.g. distutils' CCompilerError, no gcc at all
            print(f"warning: compiled relay step not built ({exc}); the pure-Python one is used")


setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
