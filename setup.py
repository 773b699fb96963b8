"""fastpeft: one build for the pure-Python package plus, when nvcc is found, fastpeft._C.

fastpeft._C (csrc/) links no libtorch: nvcc compiles the kernels, the host C++ compiler the
pybind11 bindings, and the module links the static CUDA runtime, so it builds on any machine
with nvcc, GPU or not. The build writes a ninja file under build/ and runs ninja.

  FASTPEFT_BUILD_CUDA=1    build fastpeft._C; fail without nvcc (CI sets it where nvcc is: csrc/
                           must compile)
  FASTPEFT_BUILD_CUDA=0    skip it (pure-Python install)
  unset                    build it where it can run: an NVIDIA GPU visible and nvcc on PATH or in
                           $CUDA_HOME/bin (a machine with nvcc but no GPU skips several minutes of
                           nvcc for an extension it could not load)
  FASTPEFT_CUDA_ARCHS      sm_XX targets, default "80;90" (>= 80: the kernels use TF32/bf16
                           tensor cores); PTX for the highest is embedded too
  CUDA_HOME / CUDA_PATH    the toolkit, when nvcc or libcudart_static.a are not found otherwise
  CXX                      host C++ compiler (default c++), also passed to nvcc as -ccbin
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CUDA_SOURCES = ["csrc/lora.cu", "csrc/int8.cu", "csrc/quant.cu", "csrc/nf4.cu", "csrc/bottleneck.cu"]
CXX_SOURCES = ["csrc/bindings.cpp"]
CUDA_HEADERS = ["csrc/common.cuh", "csrc/fastpeft.h"]


def _cuda_home_env() -> str | None:
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, else from PATH."""
    home = _cuda_home_env()
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def find_cudart_dir(nvcc: str) -> str:
    """The directory holding libcudart_static.a: $CUDA_HOME, nvcc's own library dirs, nvcc's toolkit."""
    roots = [_cuda_home_env(), str(Path(os.path.realpath(nvcc)).parent.parent)]
    dirs: list[str] = []
    try:  # nvcc may be a wrapper script: ask it where its toolkit and libraries are
        out = subprocess.run([nvcc, "--dryrun", "x.cu"], capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
        dirs += [d for d in re.findall(r'-L"?([^"\s]+)"?', text) if not d.rstrip("/").endswith("stubs")]
        roots += re.findall(r"^#\$ TOP=(.+)$", text, re.M)
    except (OSError, subprocess.SubprocessError):
        pass
    for root in filter(None, roots):
        dirs += [os.path.join(root, "lib64"), os.path.join(root, "lib")]
        dirs += sorted(glob.glob(os.path.join(root, "targets", "*", "lib")))
    for d in dirs:
        if os.path.isfile(os.path.join(d, "libcudart_static.a")):
            return os.path.normpath(d)
    raise RuntimeError("fastpeft._C: libcudart_static.a not found (looked in: " + ", ".join(dict.fromkeys(dirs))
                       + "); set CUDA_HOME to the CUDA toolkit, or FASTPEFT_BUILD_CUDA=0 to skip the extension")


def gpu_visible() -> bool:
    """Whether the NVIDIA driver lists a GPU on this machine (where fastpeft._C can run)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return out.lstrip().startswith("GPU")


def cuda_archs() -> list[int]:
    spec = os.environ.get("FASTPEFT_CUDA_ARCHS", "80;90")
    items = [a.strip() for a in re.split(r"[;,\s]+", spec) if a.strip()]
    if not items or not all(a.isdigit() for a in items):
        raise RuntimeError(f"FASTPEFT_CUDA_ARCHS={spec!r}: expected compute capabilities like '80;90'")
    archs = sorted({int(a) for a in items})
    if archs[0] < 80:
        raise RuntimeError(f"FASTPEFT_CUDA_ARCHS={spec!r}: the kernels need sm_80 or newer (TF32/bf16 tensor cores)")
    return archs


def find_ninja() -> str:
    exe = shutil.which("ninja")
    if exe:
        return exe
    try:
        import ninja
        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        raise RuntimeError("fastpeft._C needs ninja to build: pip install ninja") from None


def _q(s: str) -> str:
    """Quote for a ninja command line (run by /bin/sh)."""
    return "'" + s.replace("'", "'\\''") + "'" if re.search(r"[^\w@%+=:,./-]", s) else s


def _ninja_path(s: str) -> str:
    return s.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


class NinjaCUDAExtension(Extension):
    """fastpeft._C: built by NinjaBuildExt, not by setuptools' compiler."""


class NinjaBuildExt(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, NinjaCUDAExtension):
            return super().build_extension(ext)
        import pybind11

        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("fastpeft._C: nvcc not found on PATH or in $CUDA_HOME/bin")
        cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
        archs = cuda_archs()
        cudart_dir = find_cudart_dir(nvcc)
        build_dir = Path(self.build_temp).resolve() / "fastpeft_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)

        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        nvcc_flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                      "--threads", "0", *gencode]
        if os.environ.get("CXX"):
            nvcc_flags += ["-ccbin", cxx]
        includes = {pybind11.get_include(), sysconfig.get_paths()["include"], sysconfig.get_paths()["platinclude"]}
        cxx_flags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden",
                     *(f"-I{d}" for d in sorted(includes))]
        # --exclude-libs hides the static runtime's symbols, so they never bind to the
        # libcudart.so torch loads globally (nor the other way round).
        ldflags = [f"-L{cudart_dir}", "-lcudart_static", "-ldl", "-lrt", "-lpthread", "-Wl,--exclude-libs,ALL"]

        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {_q(nvcc)}",
            f"cxx = {_q(cxx)}",
            "nvcc_flags = " + " ".join(map(_q, nvcc_flags)),
            "cxx_flags = " + " ".join(map(_q, cxx_flags)),
            "ldflags = " + " ".join(map(_q, ldflags)),
            "rule nvcc",
            "  command = $nvcc $nvcc_flags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $name",
            "rule cxx",
            "  command = $cxx $cxx_flags -MMD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = c++ $name",
            "rule link",
            "  command = $cxx -shared $in -o $out $ldflags",
            "  description = link fastpeft._C",
        ]
        objects = []
        for src in ext.sources:
            obj = str(build_dir / (Path(src).name + ".o"))
            rule = "nvcc" if src.endswith(".cu") else "cxx"
            lines.append(f"build {_ninja_path(obj)}: {rule} {_ninja_path(str(ROOT / src))}")
            lines.append(f"  name = {_ninja_path(src)}")
            objects.append(obj)
        lines.append(f"build {_ninja_path(str(target))}: link " + " ".join(map(_ninja_path, objects)))
        lines.append(f"default {_ninja_path(str(target))}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")

        cmd = [find_ninja(), "-C", str(build_dir)]
        if os.environ.get("FASTPEFT_BUILD_VERBOSE"):  # the whole commands (else a line per file)
            cmd.append("-v")
        print(f"building fastpeft._C for sm_{', sm_'.join(map(str, archs))} with {nvcc} "
              f"(cudart static from {cudart_dir})", flush=True)
        subprocess.run(cmd, check=True)


def build_decision() -> tuple[bool, str]:
    """Whether this install builds fastpeft._C, and why (FASTPEFT_BUILD_CUDA, a GPU, nvcc)."""
    mode = os.environ.get("FASTPEFT_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise RuntimeError(f"FASTPEFT_BUILD_CUDA={mode!r}: expected 0, 1 or unset")
    if mode == "0":
        return False, "FASTPEFT_BUILD_CUDA=0"
    if mode == "" and not gpu_visible():
        return False, "no NVIDIA GPU visible (FASTPEFT_BUILD_CUDA=1 builds it anyway)"
    if find_nvcc() is None:
        if mode == "1":
            raise RuntimeError("FASTPEFT_BUILD_CUDA=1 but nvcc was not found on PATH or in $CUDA_HOME/bin")
        return False, "nvcc not found"
    why = "FASTPEFT_BUILD_CUDA=1" if mode == "1" else "a GPU is visible and nvcc found"
    return True, f"{why}; FASTPEFT_BUILD_CUDA=0 skips it"


def cuda_plan() -> str:
    """One line for the installer to print before pip runs: what happens to fastpeft._C."""
    build, why = build_decision()
    if not build:
        return f"fastpeft._C (the CUDA C++ extension): not built: {why}"
    return (f"fastpeft._C (the CUDA C++ extension): building with nvcc for sm_{', sm_'.join(map(str, cuda_archs()))} "
            f"({why}): several minutes of nvcc (about 5 on 2 cores); a line per compiled file follows")


def _extensions() -> list[Extension]:
    build, why = build_decision()
    if not build:
        print(f"fastpeft: installing without the CUDA C++ extension fastpeft._C: {why}", file=sys.stderr)
        return []
    return [NinjaCUDAExtension("fastpeft._C", sources=CUDA_SOURCES + CXX_SOURCES, depends=CUDA_HEADERS)]


if __name__ == "__main__" and sys.argv[1:] == ["--cuda-plan"]:
    print(cuda_plan())
    sys.exit(0)

setup(
    name="fastpeft",
    version="0.1.0",
    description="Fused Triton and CUDA C++ kernels for parameter-efficient fine-tuning and efficient LLM inference",
    python_requires=">=3.10",
    packages=["fastpeft", "fastpeft.reference", "fastpeft.ops", "fastpeft.nn", "fastpeft.kernels"],
    package_dir={"fastpeft.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'", "numpy", "safetensors"],
    extras_require={
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "safetensors", "peft", "transformers",
                 "bitsandbytes"],
        "bench": ["matplotlib", "safetensors", "peft"],
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": NinjaBuildExt},
)
