"""benchmarks/gpu_suite.sh: the dry run (CPU, tiny sizes, the same scripts) writes one record per step,
and the budget stops a running command and skips the steps that no longer fit."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import bench_fused, gpu_stages, gpu_suite

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_writes_a_record_per_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # 2 test workers share the CPU
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "gpu_results.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in recs}
    assert [r["step"] for r in recs] == list(gpu_suite.STEP_ORDER)
    for name, r in by_step.items():
        assert r["status"] in (("skipped",) if name == "compile256" else ("ok",)), (name, r)
        assert r["elapsed_s"] >= 0
    # the end-to-end pass ran every real program, bf16 training under accelerate and sampling under torchrun
    e2e = by_step["e2e"]
    assert list(e2e["stages"]) == ["dataset", "assets", "extract", "reference", "train", "sample", "evaluate",
                                    "sample_autoguidance"]
    assert all(st["rc"] == 0 and st["seconds"] > 0 for st in e2e["stages"].values())
    assert "accelerate.commands.launch" in e2e["stages"]["train"]["command"]
    assert "--mixed-precision bf16" in e2e["stages"]["train"]["command"]
    assert "torch.distributed.run" in e2e["stages"]["sample"]["command"]
    assert e2e["grid_written"] and set(e2e["metrics"]) >= {"fid", "inception_score", "precision", "recall"}
    assert by_step["env"]["torch"] and by_step["env"]["bf16_matmul_tflops"] > 0
    assert by_step["cuda_tests"]["rc"] == 0 and "collected" in by_step["cuda_tests"]["summary"][0]
    # the training step: baseline and the three checkpointing modes timed in one process
    train = by_step["train256"]["checkpointing"]
    assert set(train["rows"]) == {"FCDM-S baseline", "FCDM-S optimized", "FCDM-S optimized, selective ckpt",
                                  "FCDM-S optimized, full ckpt"}
    assert ({"train_speedup_vs_baseline", "train_speedup_vs_baseline[FCDM-S optimized, full ckpt]"}
            <= set(train["ratios"]))
    row = train["rows"]["FCDM-S optimized, full ckpt"]
    assert row["checkpointing"] == "full" and row["train_steps_per_s"] > 0
    assert row["train_mfu_nominal_989"] == row["train_tflops"] / 989
    assert by_step["train512"]["selective"]["fits_batch"] == 2
    assert by_step["forward"]["bf16"]["ratios"]["forward_speedup_FCDM-S_vs_DiT-S/2"] > 0
    assert by_step["latents"]["vae_encode"]["fp32"]["img_per_s"] > 0
    # representation alignment's cost: both steps timed in one bench_repa.py process, the aligned one really aligned
    repa = by_step["repa"]
    assert repa["with_ms"] > 0 and repa["without_ms"] > 0 and repa["ratio_with_over_without"] > 0
    assert repa["ratio_with_over_without"] == repa["with_ms"] / repa["without_ms"]
    assert repa["checks"]["encoder_calls_per_step"] == {"with alignment": 1.0, "without alignment": 0.0}
    assert repa["checks"]["projector_max_change"] > 0 and repa["encoder"]["kind"] == "tiny"
    assert repa["batch"] == 2 and "--precision bf16" in repa["command"] and "bench_repa.py" in repa["command"]
    # the flow time schedules' cost: three schedules timed in one bench_flow_times.py process, really drawn apart
    flow = by_step["flow_times"]
    assert set(flow["ratios_to_uniform"]) == {"uniform", "logit-normal", "logit-normal + shift"} == set(flow["step_ms"])
    assert flow["ratios_to_uniform"]["uniform"] == 1.0 and all(v > 0 for v in flow["step_ms"].values())
    assert flow["checks"]["shift_closed_form_holds"] and flow["checks"]["logit_normal_differs_from_uniform"]
    assert flow["batch"] == 2 and "--precision bf16" in flow["command"] and "bench_flow_times.py" in flow["command"]
    # sampling through the real bench_model.py --mode sample: DPM++ at both batches, and the DDPM loop
    sampling = by_step["sampling"]
    assert set(sampling["eager"]["img_per_s"]) == {"rows.batch64.images_per_s", "rows.batch256.images_per_s"}
    assert set(sampling["ddpm3_eager"]["img_per_s"]) == {"rows.batch2.images_per_s"}
    assert all(v > 0 for v in sampling["ddpm3_eager"]["hours_for_50k"].values())
    assert by_step["latents"]["loader"]["best_latents_per_s"] > 0
    assert by_step["profile256"]["top_kernels"]
    # the fused block: numerics and block times per level (bench_fused.py), then triton against torch and DiT
    fused = by_step["fused"]
    assert [lv["level"] for lv in fused["blocks"]["levels"]] == [0, 1]  # TINY_FCDM: two levels
    for lv in fused["blocks"]["levels"]:
        assert lv["numerics"]["ok"] and lv["times"]["train_triton_ms"] > 0
        assert [r["kernel"] for r in lv["kernels"]][:10] == list(bench_fused.KERNEL_COST)
    assert (tmp_path / "gpu_fused_kernels.txt").read_text().startswith("FCDM-S blocks")
    ratios = fused["forward_bf16"]["ratios"]
    assert ratios["forward_speedup_FCDM-S_vs_DiT-S/2[FCDM-S optimized, none ckpt, triton kernels]"] > 0
    assert fused["forward_bf16"]["rows"]["FCDM-S optimized, none ckpt, triton kernels"]["kernels"] == "triton"
    assert set(fused["train"]["rows"]) == {"FCDM-S optimized", "FCDM-S optimized, none ckpt, triton kernels"}
    assert fused["train"]["fits_batch"] == 2 and fused["profile"]["top_kernels"]
    assert "triton kernels" in (tmp_path / "gpu_profile_fused.txt").read_text().splitlines()[0]
    assert fused["compiled"]["status"] == "skipped"
    assert (tmp_path / "gpu_profile.txt").read_text().startswith("one training step")
    log = (tmp_path / "gpu_log.txt").read_text()
    assert "== train256: ok in" in log
    assert "done in" in log and f": {len(gpu_suite.STEP_ORDER) - 1} ok, 0 failed, 1 skipped (compile256);" in log


def test_a_failed_step_fails_the_suite(tmp_path):
    """A step that fails makes the whole suite exit 1 with a summary naming it; a step skipped (for the
    budget, or because it cannot run here) is not a failure. The stand-in Python has no torch at all,
    so every step that imports it fails, and the suite must not exit 0."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "bare"], check=True, timeout=60)
    fake = tmp_path / "bare" / "bin" / "python"  # a Python with the standard library only
    assert subprocess.run([fake, "-c", "import torch"], capture_output=True).returncode != 0
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--steps", "compile256,env"],
                          env=dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(fake)), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 ok, 1 failed (env), 1 skipped (compile256)" in proc.stdout
    # --steps runs in the order given (most wanted first), not the default order
    recs = [json.loads(line) for line in (tmp_path / "out" / "gpu_results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == ["compile256", "env"]
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--steps", "env,env"],
                          env=dict(os.environ, OUT=str(tmp_path / "out3"), PYTHON=sys.executable), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "names a step twice" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--steps", "compile256"],
                          env=dict(os.environ, OUT=str(tmp_path / "out2"), PYTHON=sys.executable), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "0 ok, 0 failed, 1 skipped (compile256)" in proc.stdout, proc.stdout[-2000:]


def test_the_steps_come_from_the_stage_modules_registrations():
    """benchmarks/gpu_stages: each step of STEP_ORDER is registered by one stage module with its minimum budget,
    gpu_suite.py dispatches to those registrations, and a second registration of a name is refused."""
    import pytest

    assert list(gpu_suite.STEPS) == list(gpu_suite.STEP_ORDER) == list(gpu_suite.MIN_SECONDS)
    assert gpu_suite.STEPS["repa"].fn is gpu_suite.step_repa and gpu_suite.MIN_SECONDS["fused"] == 120
    assert gpu_suite.STEPS["train512"].fn.__module__ == "benchmarks.gpu_stages.training"
    assert set(gpu_suite.WORKERS) == {"env", "profile", "vae", "e2e_assets"}
    with pytest.raises(ValueError, match="registered twice"):
        gpu_stages.core.stage("env", min_s=0)(lambda suite: {})


def test_a_failed_part_fails_its_step(tmp_path):
    suite = gpu_suite.Suite(tmp_path, budget_s=60, sizes=gpu_suite.DRY, dry_run=True)
    suite.step("forward", lambda s: {"bf16": {"rows": {}}, "tf32": {"status": "timeout"}}, min_s=0)
    suite.step("sampling", lambda s: {"eager": {"img_per_s": {}}, "compiled": {"status": "skipped"}}, min_s=0)
    assert suite.statuses == {"forward": "failed", "sampling": "ok"} and suite.failed()
    assert suite.summary() == "1 ok, 1 failed (forward), 0 skipped"


def test_budget_stops_a_command_and_skips_what_does_not_fit(tmp_path):
    suite = gpu_suite.Suite(tmp_path, budget_s=6.0, sizes=gpu_suite.DRY, dry_run=True)
    t = time.perf_counter()
    res = suite.run([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"])
    assert res["timed_out"] and time.perf_counter() - t < 10 and "started" in res["tail"]
    # a launcher stopped at the limit takes the workers it started in sessions of their own with it
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], " \
            "start_new_session=True); print('worker started', flush=True); time.sleep(60)"
    suite.budget_s = time.perf_counter() - suite.t0 + 6.0
    res = suite.run([sys.executable, "-c", child])
    assert res["timed_out"] and "worker started" in res["tail"] and res["orphans_killed"] == 1
    suite.budget_s = time.perf_counter() - suite.t0 + 5.0
    suite.step("late", lambda s: {"never": True}, min_s=30)
    suite.step("broken", lambda s: 1 / 0, min_s=0)
    recs = [json.loads(line) for line in (tmp_path / "gpu_results.jsonl").read_text().splitlines()]
    assert recs[0]["step"] == "late" and recs[0]["status"] == "skipped" and "budget" in recs[0]["reason"]
    assert recs[1]["status"] == "failed" and "ZeroDivisionError" in recs[1]["error"]


FAKE_SAMPLE_BENCH = '''
import argparse, json
p = argparse.ArgumentParser()
p.add_argument("--mode", choices=("forward", "train", "both", "layers", "sample"))
p.add_argument("--compile", action="store_true")
p.add_argument("--json")
args, _ = p.parse_known_args()
rate = 20.0 if args.compile else 12.5
json.dump({"results": {"FCDM-S sample": {"sample_img_per_s": rate}}, "ratios": {}, "raw_times_s": {}},
          open(args.json, "w"))
'''


def test_sampling_step_calls_the_sample_mode_when_it_exists(tmp_path, monkeypatch):
    """A stand-in bench_model.py with --mode sample (the real one gains it in another change): eager and
    compiled runs, images/s found in its report, hours for 50K samples from them."""
    import dataclasses

    fake = tmp_path / "bench_model.py"
    fake.write_text(FAKE_SAMPLE_BENCH)
    monkeypatch.setattr(gpu_stages.core, "BENCH_MODEL", fake)
    assert gpu_suite.has_sample_mode()
    suite = gpu_suite.Suite(tmp_path / "out", budget_s=120, sizes=dataclasses.replace(gpu_suite.DRY, compile=True),
                            dry_run=True)
    out = gpu_suite.step_sampling(suite, ["--num-sampling-steps", "2"])
    assert out["eager"]["img_per_s"] == {"FCDM-S sample.sample_img_per_s": 12.5}
    assert out["compiled"]["hours_for_50k"]["FCDM-S sample.sample_img_per_s"] == 50_000 / 20.0 / 3600
    # the compiled loop last, at the one sampling batch (autotuning two shapes outlasted its cap on an H200)
    assert list(out) == ["eager", "ddpm3_eager", "compiled"]
    assert "--compile --sample-batches 2" in out["compiled"]["command"]
    assert "--num-sampling-steps 2" in out["eager"]["command"]


FAKE_REPA_BENCH = '''
import argparse, json, sys
p = argparse.ArgumentParser()
p.add_argument("--batch", type=int)
p.add_argument("--json")
args, _ = p.parse_known_args()
if args.batch > 8:
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB")
    sys.exit(1)
row = lambda ms: {"step_ms": ms, "peak_gib": 30.0, "step_gib": 6.0}
rows = {"with alignment": row(120.0), "without alignment": row(100.0), "encoder forward alone": {"ms": 6.0}}
json.dump({"results": rows, "ratio_with_over_without": 1.2, "extra_ms": 20.0, "encoder_share_of_aligned_step": 0.05,
           "encoder_share_of_extra": 0.3, "checks": {}, "encoder": {"kind": "dinov2-b"},
           "repa": {"site_shape": [1024, 16, 16]}, "projector_params_m": 8.0, "model": {"name": "FCDM-XL"},
           "environment": {}}, open(args.json, "w"))
'''


def test_repa_step_halves_the_batch_after_an_out_of_memory(tmp_path, monkeypatch):
    """The repa step against a stand-in bench_repa.py that runs out of memory above batch 8: 32 -> 16 -> 8."""
    import dataclasses

    fake = tmp_path / "bench_repa.py"
    fake.write_text(FAKE_REPA_BENCH)
    monkeypatch.setattr(gpu_stages.repa, "BENCH_REPA", fake)
    sizes = dataclasses.replace(gpu_suite.DRY, repa_batch=32)
    out = gpu_suite.step_repa(gpu_suite.Suite(tmp_path / "out", budget_s=120, sizes=sizes, dry_run=True))
    assert [(a["batch"], a["oom"]) for a in out["attempts"]] == [(32, True), (16, True), (8, False)]
    assert out["batch"] == 8 and out["ratio_with_over_without"] == 1.2 and out["with_peak_gib"] == 30.0
    assert out["encoder_forward_ms"] == 6.0 and "status" not in out
    # below a quarter of the batch it gives up, as a failure with the attempts
    sizes = dataclasses.replace(gpu_suite.DRY, repa_batch=64)
    out = gpu_suite.step_repa(gpu_suite.Suite(tmp_path / "out2", budget_s=120, sizes=sizes, dry_run=True))
    assert out["status"] == "failed" and [a["batch"] for a in out["attempts"]] == [64, 32, 16]


def test_repa_step_is_skipped_without_timm(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a))
    suite = gpu_suite.Suite(tmp_path, budget_s=60, sizes=gpu_suite.DRY, dry_run=True)
    suite.step("repa", gpu_suite.step_repa, min_s=0)
    rec = json.loads((tmp_path / "gpu_results.jsonl").read_text())
    assert rec["status"] == "skipped" and "timm not installed" in rec["reason"] and not suite.failed()


def test_extra_variants_flag():
    import pytest

    from benchmarks import bench_model

    args = bench_model.parse_args(["--extra-variants", "selective, none+compile,full+compile,none+triton+compile-net"])
    assert args.extra_variants == [("selective", "", "torch"), ("none", "blocks", "torch"), ("full", "blocks", "torch"),
                                   ("none", "net", "triton")]
    for bad in ("some", "none+fast", "none+triton+torch", "none+compile+compile", "none+compile+compile-net"):
        with pytest.raises(SystemExit):
            bench_model.parse_args(["--extra-variants", bad])


FAKE_OOM_BENCH = '''
import argparse, json, sys
p = argparse.ArgumentParser()
p.add_argument("--batch-size", type=int)
p.add_argument("--json")
args, _ = p.parse_known_args()
if args.batch_size > 64:
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB")
    sys.exit(1)
json.dump({"results": {"FCDM-S optimized": {"train_steps_per_s": 1.0, "train_tflops": 98.9}}, "ratios": {},
           "environment": {}}, open(args.json, "w"))
'''


def test_an_out_of_memory_retries_with_half_the_batch(tmp_path, monkeypatch):
    import dataclasses

    fake = tmp_path / "bench_model.py"
    fake.write_text(FAKE_OOM_BENCH)
    monkeypatch.setattr(gpu_stages.core, "BENCH_MODEL", fake)
    sizes = dataclasses.replace(gpu_suite.DRY, train_batch=256, ckpt512=("selective",))
    out = gpu_suite.step_train512(gpu_suite.Suite(tmp_path / "out", budget_s=120, sizes=sizes, dry_run=True))
    r = out["selective"]
    assert [a["oom"] for a in r["attempts"]] == [True, True, False] and r["fits_batch"] == 64
    assert r["rows"]["FCDM-S optimized"]["train_mfu_nominal_989"] == 98.9 / 989


def test_compile_step_measures_no_checkpointing_in_its_own_process_first(tmp_path, monkeypatch):
    """compile256 (left out of the dry run: no C++ code generation in CI) against a stand-in bench_model.py."""
    import dataclasses

    fake = tmp_path / "bench_model.py"
    fake.write_text(FAKE_OOM_BENCH)  # batch 2: writes a report
    monkeypatch.setattr(gpu_stages.core, "BENCH_MODEL", fake)
    suite = gpu_suite.Suite(tmp_path / "out", budget_s=300, sizes=dataclasses.replace(gpu_suite.DRY, compile=True),
                            dry_run=True)
    out = gpu_suite.step_compile256(suite)
    first, second = out["none"]["command"], out["checkpointed"]["command"]
    assert "--extra-variants none+compile" in first and "--checkpointing" not in first
    assert "--checkpointing selective --extra-variants selective+compile,full,full+compile" in second
    assert "status" not in out
