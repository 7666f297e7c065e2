"""Builds neuslice._C by driving CMake (CMakeLists.txt is the one build description).

Environment:
  NEUSLICE_CUDA=auto|ON|OFF   compile the CUDA sources (auto: when nvcc is found)
  NEUSLICE_BUILD_TYPE=Release|Debug|RelWithDebInfo
  NEUSLICE_SKIP_EXT=1         build no extension (the reference backend serves)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("NEUSLICE_BUILD_TYPE", "Release")
        args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DNEUSLICE_CUDA={os.environ.get('NEUSLICE_CUDA', 'auto')}",
            f"-DNEUSLICE_OUTPUT_DIR={out.parent}",
            f"-DNEUSLICE_OUTPUT_NAME={out.name}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        subprocess.run(args, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", str(build_dir), "--config", cfg, "-j", jobs], check=True)
        if not out.exists():
            raise RuntimeError(f"setup.py: CMake finished but {out} was not produced")


ext_modules = [] if os.environ.get("NEUSLICE_SKIP_EXT") == "1" else [CMakeExtension("neuslice._C")]
setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
