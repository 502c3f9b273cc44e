"""Builds the package and its compiled extension ``sslam_fast._C``.

The C++ (CPU, OpenMP) sources in csrc/ are always built; they need no GPU. The CUDA sources (csrc/cuda/*.cu) are
compiled only when ``SSLAM_FAST_BUILD_CUDA=1`` and a CUDA toolkit is found (``CUDA_HOME``); otherwise they are left
out and the CUDA backend reports itself unavailable. Triton kernels in kernels/ are installed as ``sslam_fast.kernels``.
"""

import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_dir = os.path.join("csrc", "cuda")
    cu = sorted(glob.glob(os.path.join(cuda_dir, "*.cu"))) + sorted(glob.glob(os.path.join(cuda_dir, "*.cpp")))
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-std=c++20", *openmp]
    want_cuda = os.environ.get("SSLAM_FAST_BUILD_CUDA", "0") == "1"
    if want_cuda and CUDA_HOME is not None and cu:
        return CUDAExtension(
            "sslam_fast._C",
            cpp + cu,
            define_macros=[("WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            extra_link_args=openmp,
            py_limited_api=True,
        )
    if want_cuda:
        print("SSLAM_FAST_BUILD_CUDA=1 but no CUDA toolkit or no .cu sources: building the CPU extension only")
    return CppExtension(
        "sslam_fast._C",
        cpp,
        extra_compile_args={"cxx": cxx},
        extra_link_args=openmp,
        py_limited_api=True,
    )


setup(
    packages=find_packages(include=["sslam_fast", "sslam_fast.*"]) + ["sslam_fast.kernels"],
    package_dir={"sslam_fast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
