"""fcdm_common.cpu: the glibc allocator setting that CPU runs use (Linux/glibc, like CI). The setting is
process-wide, so each case runs in a fresh interpreter."""
import json
import os
import subprocess
import sys

# Four 12.6 MB blocks (the size of a 16x32x32x192 float32 activation) written and freed, repeatedly;
# minor page faults per round once glibc has settled. glibc's defaults give these blocks back to the
# kernel (mmap/trim) and fault them in again every round; the tuned heap reuses them.
PROBE = r"""
import ctypes, json, resource, sys
from fcdm_common.cpu import cpu_allocator_state, tune_cpu_allocator
tuned = tune_cpu_allocator()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 16 * 32 * 32 * 192 * 4
def round_trip():
    blocks = [libc.malloc(size) for _ in range(4)]
    for b in blocks:
        libc.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
for _ in range(20):
    round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round_trip()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"tuned": tuned, "again": tune_cpu_allocator(), "state": cpu_allocator_state(), "faults": faults}))
"""


def probe(allocator_env=None):
    env = dict(os.environ)
    env.pop("FCDM_CPU_ALLOCATOR", None)
    if allocator_env:
        env["FCDM_CPU_ALLOCATOR"] = allocator_env
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_tuned_allocator_reuses_large_blocks_instead_of_faulting_them_in():
    tuned = probe()
    assert tuned["tuned"] and tuned["again"] and tuned["state"] == "tuned"
    assert tuned["faults"] < 100, tuned  # 4 x 3,072 pages per round would be faulted in without it
    default = probe("default")
    assert not default["tuned"] and default["state"] == "default"
    assert default["faults"] > 4000, default  # the behaviour the setting removes
