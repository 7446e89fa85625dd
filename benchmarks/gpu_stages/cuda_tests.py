"""Step cuda_tests: `pytest -m cuda` over tests/test_cuda.py and tests/test_kernels.py, each case's outcome kept
from the JUnit report (the dry run only collects: the ordinary test suite runs the CPU cases)."""
from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from benchmarks.gpu_stages.core import REPO, Suite, stage


@stage("cuda_tests", min_s=30)
def step_cuda_tests(suite: Suite) -> dict:
    junit = suite.work / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda",
           str(REPO / "tests" / "test_cuda.py"), str(REPO / "tests" / "test_kernels.py"), f"--junitxml={junit}"]
    if suite.dry_run:  # collection only: the CPU cases run in the ordinary test suite
        cmd.insert(4, "--collect-only")
    res = suite.run(cmd, timeout_s=suite.sizes.test_timeout_s)
    out = {"command": " ".join(cmd), "rc": res["rc"], "summary": res["tail"].splitlines()[-1:] or [""]}
    if junit.is_file():
        out["tests"] = _junit_cases(junit)
    if res["timed_out"]:
        out["status"] = "timeout"
    elif res["rc"] not in (0, 5):  # 5: no test collected
        out["status"] = "failed"
    return out


def _junit_cases(path: Path) -> dict:
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, (child.get("message") or "")[:400]
        cases[case.get("name")] = {"outcome": outcome, "seconds": float(case.get("time") or 0), "message": message}
    return cases
