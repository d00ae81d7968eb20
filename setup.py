"""Builds the compiled CPU ops (neighbour search and grouping; the activation fake quant forward and
the conv+BN division backward of QAT),
`models/csrc/*.cpp` → `models._C` (see `models/_kernels.py`).

Package metadata lives in pyproject.toml; this file only declares the extension, so both
`pip install --no-build-isolation -e .` and `python setup.py build_ext --inplace` build it.
-g0 keeps the library small (it is copied beside kernel-mode artifacts).
-ffp-contract=off: the kernels must round every multiply and add separately, as the
pure-PyTorch reference does, or FPS ties and radius tests could resolve differently.
"""
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[
        CppExtension(
            "models._C",
            ["models/csrc/neighbors.cpp", "models/csrc/fake_quant.cpp", "models/csrc/bn_fold.cpp"],
            depends=["models/csrc/vector_clones.h"],
            extra_compile_args=["-O3", "-g0", "-ffp-contract=off", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
