"""CI compile check of the CUDA code: no GPU needed, only nvcc (CUDA 13 on the project's machines).

* every ``csrc/cuda/*.cu`` is compiled (``-c``) for each shipped architecture, sm_80/86/89/90
  (sm_90 also emitting PTX), with the flags setup.py uses: a compile error fails CI;
* the op glue ``csrc/cuda/ops.cpp`` is compiled with g++ against the installed torch: it uses
  only device-generic torch headers, so the CPU build of torch is enough;
* the sm_80 objects and the glue are linked into a library that a fresh Python process loads:
  its ``TORCH_LIBRARY_IMPL(spqr_hf, CUDA, ...)`` must register against the schema of
  ``spqr_hf.ops._schema`` (a signature mismatch fails at load time).

About 2 minutes on 2 cores (the compile jobs run in parallel, one per core).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = (80, 86, 89, 90)
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)
INCLUDES = [f"-I{ROOT / 'csrc' / 'include'}", f"-I{CUDA_DIR}"]

pytestmark = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC),
                                reason="nvcc (CUDA toolkit) not found: the CUDA sources cannot be compiled here")


def _gencode(arch: int) -> str:
    code = f"[sm_{arch},compute_{arch}]" if arch == max(ARCHS) else f"sm_{arch}"
    return f"-gencode=arch=compute_{arch},code={code}"


def _run(cmd: list[str]) -> tuple[int, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def _glue_command(obj: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("g++") or shutil.which("c++") or "g++"
    torch_includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    return [compiler, "-std=c++20", "-O1", "-fPIC", "-c", *torch_includes, *INCLUDES, str(CUDA_DIR / "ops.cpp"),
            "-o", str(obj)]


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    """Runs every compile job once, in parallel; maps job name to (returncode, output, object)."""
    out = tmp_path_factory.mktemp("cuda_objects")
    jobs = {}
    for arch in ARCHS:
        for cu in CU_FILES:
            obj = out / f"{cu.stem}_sm{arch}.o"
            jobs[f"{cu.name}:sm_{arch}"] = ([NVCC, "-c", "-O3", "-std=c++20", *INCLUDES, _gencode(arch), str(cu),
                                             "-o", str(obj)], obj)
    jobs["ops.cpp"] = (_glue_command(out / "ops.o"), out / "ops.o")
    # Longest jobs first (matvec is the heaviest file) keeps both cores busy to the end.
    order = sorted(jobs, key=lambda name: (not name.startswith("matvec"), name))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = dict(zip(order, pool.map(lambda name: _run(jobs[name][0]), order), strict=True))
    return {name: (*results[name], jobs[name][1]) for name in jobs}


def test_there_are_cuda_sources():
    assert {p.name for p in CU_FILES} >= {"matvec.cu", "dequantize.cu"}
    assert (CUDA_DIR / "ops.cpp").exists()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [p.name for p in CU_FILES])
def test_cu_file_compiles(builds, source, arch):
    code, output, obj = builds[f"{source}:sm_{arch}"]
    assert code == 0, f"nvcc failed for {source} on sm_{arch}:\n{output}"
    assert obj.stat().st_size > 0


def test_op_glue_compiles_against_installed_torch(builds):
    code, output, _ = builds["ops.cpp"]
    assert code == 0, f"g++ failed for csrc/cuda/ops.cpp:\n{output}"


def test_linked_extension_registers_cuda_kernel_for_the_schema(builds, tmp_path):
    import torch

    objects = [builds[f"{cu.name}:sm_80"][2] for cu in CU_FILES] + [builds["ops.cpp"][2]]
    if any(builds[name][0] for name in builds if name.endswith("sm_80") or name == "ops.cpp"):
        pytest.fail("compile step failed (see the other tests)")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    library = tmp_path / "_C_cuda.so"
    code, output = _run([NVCC, "-shared", "-o", str(library), *map(str, objects), f"-L{torch_lib}", "-lc10",
                         "-ltorch", "-ltorch_cpu", f"-Xlinker=-rpath,{torch_lib}"])
    assert code == 0, f"link failed:\n{output}"
    script = (
        "import torch, spqr_hf.ops\n"
        "assert not torch._C._dispatch_has_kernel_for_dispatch_key('spqr_hf::spqr_linear', 'CUDA')\n"
        f"torch.ops.load_library({str(library)!r})\n"
        "assert torch._C._dispatch_has_kernel_for_dispatch_key('spqr_hf::spqr_linear', 'CUDA')\n"
        "print('registered')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0 and "registered" in proc.stdout, proc.stdout + proc.stderr
