"""llama.cpp for the GGUF tests, built from the sources vendored in llama-cpp-python's sdist.

PyPI is the one place this machine reaches, and the sdist carries a pinned copy of llama.cpp, so
the tests check our GGUF against a fixed llama.cpp, not whatever a user has installed. The build
(a few tools, CPU only) takes a while, so it is cached outside the repository and reused once its
marker file, written last, is there. `python -m tests.llamacpp` builds it ahead of a test run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is what gets built
TOOLS = ("llama-completion", "llama-tokenize", "llama-perplexity", "llama-quantize")
# Static, CPU only, no network code, none of the server / examples / tests targets. Not -march=native:
# on a CPU with AMX, 0.3.36's AMX int8 kernel crashes on small q8_0 matrices (llama-quantize's own
# files too), and a portable build stays valid when the cache moves to another machine.
FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DLLAMA_BUILD_APP=OFF", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF")


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llama2zh" / f"llama.cpp-{VERSION}"


def cmake() -> str | None:
    return shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))


def build() -> Path:
    """The directory holding the TOOLS binaries, building them first when the cache lacks them."""
    root = cache_dir()
    bin_dir, marker = root / "build" / "bin", root / "complete"
    stamp = " ".join((VERSION, *TOOLS, *FLAGS)) + "\n"
    if marker.exists() and marker.read_text() == stamp:
        return bin_dir
    marker.unlink(missing_ok=True)
    shutil.rmtree(root / "build", ignore_errors=True)  # a build made otherwise is redone from scratch
    cmake_exe = cmake()
    if cmake_exe is None or shutil.which("c++") is None:
        raise RuntimeError("cmake or a C++ compiler is missing")
    root.mkdir(parents=True, exist_ok=True)
    source = root / "llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={VERSION}", "-d", tmp], check=True)
            (sdist,) = Path(tmp).glob("*.tar.gz")
            prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
                for m in members:
                    m.name = m.name.removeprefix(prefix)
                tar.extractall(Path(tmp) / "src", members=members, filter="data")
            shutil.rmtree(source, ignore_errors=True)
            os.replace(Path(tmp) / "src", source)
    with open(root / "build.log", "w") as log:  # the compiler's warnings are many; kept for a failure
        for step in (["-S", str(source), "-B", str(root / "build"), *FLAGS],
                     ["--build", str(root / "build"), "-j2", "--target", *TOOLS]):
            subprocess.run([cmake_exe, *step], check=True, stdout=log, stderr=subprocess.STDOUT)
    marker.write_text(stamp)
    return bin_dir


@pytest.fixture(scope="session")
def llamacpp() -> Path:
    """llama.cpp's bin directory; a skip only when it cannot be built here."""
    try:
        return build()
    except (RuntimeError, subprocess.CalledProcessError, ValueError) as e:
        pytest.skip(f"llama.cpp {VERSION} (llama-cpp-python sdist) could not be built: {e} (see {cache_dir()})")


if __name__ == "__main__":
    print(build())
