"""llama.cpp, built from the sources vendored in llama-cpp-python's sdist, for the GGUF tests and the bench.

PyPI is the one place this machine reaches, and the sdist carries a pinned copy of llama.cpp, so
the tests check our GGUF against a fixed llama.cpp, not whatever a user has installed. Two flavours,
each cached in its own folder outside the repository and reused once its marker file, written last,
is there:

  portable  the tests' tools; not -march=native: on a CPU with AMX, 0.3.36's AMX int8 kernel crashes
            on small q8_0 matrices (llama-quantize's own files too), and a portable build stays valid
            when the cache moves to another machine;
  native    llama-bench for `make bench`: -march=native, as a user building llama.cpp for speed gets,
            but with AMX off for that crash (with GGML_NATIVE=ON ggml ignores its GGML_AMX_* switches:
            -march=native turns AMX on where the CPU has it, so the compiler is told -mno-amx-*).

`python -m llama2zh.interop.llamacpp [portable|native]` builds one ahead of a test or bench run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is what gets built
# Static, CPU only, no network code, none of the server / examples / tests targets.
COMMON = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
          "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
          "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF")
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
FLAVOURS = {  # flavour -> (cache folder suffix, tools, cmake flags)
    "portable": ("", ("llama-completion", "llama-tokenize", "llama-perplexity", "llama-quantize"),
                 (*COMMON, "-DGGML_NATIVE=OFF")),
    "native": ("-native", ("llama-bench",),
               (*COMMON, "-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")),
}


def cache_dir(flavour: str = "portable") -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llama2zh" / f"llama.cpp-{VERSION}{FLAVOURS[flavour][0]}"


def cmake() -> str | None:
    return shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))


def progress(flavour: str, message: str) -> None:
    print(f"llama.cpp {VERSION} ({flavour}): {message}", file=sys.stderr, flush=True)


def source() -> Path:
    """llama.cpp's source tree, extracted from the sdist once (into the portable folder) for both flavours."""
    root = cache_dir()
    tree = root / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        # only llama-cpp-python itself from source: its build requirements (cmake...) stay wheels
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                 "--no-binary", "llama-cpp-python", f"llama-cpp-python=={VERSION}", "-d", tmp],
                                capture_output=True, text=True)
        if result.returncode != 0:
            reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise RuntimeError(f"pip could not download llama-cpp-python=={VERSION}'s sdist ({reason})")
        (sdist,) = Path(tmp).glob("*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name.removeprefix(prefix)
            tar.extractall(Path(tmp) / "src", members=members, filter="data")
        shutil.rmtree(tree, ignore_errors=True)
        os.replace(Path(tmp) / "src", tree)
    return tree


def build(flavour: str = "portable") -> Path:
    """The directory holding the flavour's tools, building them first when the cache lacks them.
    RuntimeError, with the reason in one line, where they cannot be built here."""
    _, tools, flags = FLAVOURS[flavour]
    root = cache_dir(flavour)
    bin_dir, marker = root / "build" / "bin", root / "complete"
    stamp = " ".join((VERSION, *tools, *flags)) + "\n"
    if marker.exists() and marker.read_text() == stamp:
        return bin_dir
    marker.unlink(missing_ok=True)
    shutil.rmtree(root / "build", ignore_errors=True)  # a build made otherwise is redone from scratch
    cmake_exe = cmake()
    if cmake_exe is None or shutil.which("c++") is None:
        raise RuntimeError("cmake or a C++ compiler is missing")
    progress(flavour, f"building {', '.join(tools)} in {root} (minutes on a few cores)")
    tree = source()
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "build.log"
    with open(log_path, "w") as log:  # the compiler's warnings are many: kept in the log, for a failure
        for step in (["-S", str(tree), "-B", str(root / "build"), *flags],
                     ["--build", str(root / "build"), f"-j{os.cpu_count() or 1}", "--target", *tools]):
            process = subprocess.Popen([cmake_exe, *step], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            shown = -10
            for line in process.stdout:
                log.write(line)
                if (found := re.match(r"\[\s*(\d+)%\]", line)) and int(found.group(1)) >= shown + 10:
                    shown = int(found.group(1))
                    progress(flavour, f"{shown}%")
            if process.wait() != 0:
                raise RuntimeError(f"cmake {step[0]} failed: see {log_path}")
    marker.write_text(stamp)
    progress(flavour, "built")
    return bin_dir


if __name__ == "__main__":
    print(build(*sys.argv[1:2]))
