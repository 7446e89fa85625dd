"""benchmarks/bench_flow_times.py on a tiny CPU config: the three schedules timed in one process with their ratios
to the uniform step, the schedules' times checked against an independent computation of SD3's logit-normal draw
and the resolution shift, and bad flags refused (exit 2, no report)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_flow_times
from helpers import one_thread  # noqa: F401  (fixture, used through pytestmark)
from train_gen.step_draws import BatchPlan, StepDraws, step_seed

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_flow_times.py"
TINY = ["--model-kwargs", '{"hidden_size": 16, "depths": [1, 1, 1], "num_classes": 10}', "--latent-size", "8",
        "--batch", "2", "--threads", "1", "--cpu-allocator", "default", "--quiet"]
LABELS = ("uniform", "logit-normal", "logit-normal + shift")


def test_tiny_run_times_the_three_schedules_and_their_draws(tmp_path, capsys):
    out = tmp_path / "r" / "flow.json"
    report = bench_flow_times.main(TINY + ["--repeats", "3", "--warmup", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    rows = data["results"]
    assert set(rows) == set(LABELS) == set(data["ratios_to_uniform"])
    for label in LABELS:
        r = rows[label]
        assert r["step_ms"] > 0 and len(r["times_s"]) == 3 and all(t > 0 for t in r["times_s"])
        assert r["steps_per_s"] == pytest.approx(1e3 / r["step_ms"]) and r["draw_us"] > 0
        assert r["draw_us"] < r["step_ms"] * 1e3  # a draw is part of the iteration
        assert math.isfinite(r["loss_last"]) and r["loss_last"] > 0
        assert data["ratios_to_uniform"][label] == pytest.approx(r["step_ms"] / rows["uniform"]["step_ms"])
    assert data["ratios_to_uniform"]["uniform"] == 1.0
    # each variant trained with the schedule it is named after
    assert rows["uniform"]["objective_kwargs"] == {"time_distribution": "uniform", "logit_mean": 0.0,
                                                   "logit_std": 1.0, "time_shift": 1.0}
    assert rows["logit-normal"]["objective_kwargs"]["time_distribution"] == "logit-normal"
    assert rows["logit-normal"]["objective_kwargs"]["time_shift"] == 1.0
    assert rows["logit-normal + shift"]["objective_kwargs"]["time_shift"] == 3.0
    c = data["checks"]
    assert c["logit_normal_differs_from_uniform"] and c["logit_mean_near_m"] and c["uniform_in_unit_interval"]
    assert c["shifted_logit_mean_near_m_plus_ln_a"] and c["shifted_logit_mean_expected"] == pytest.approx(math.log(3))
    assert c["shift_closed_form_holds"] and c["shift_closed_form_max_err"] < 1e-6
    assert c["shift_direction"] == ">=" and c["shift_direction_holds"]
    assert data["model"]["params_m"] > 0 and data["environment"]["torch"]
    assert report["ratios_to_uniform"] == data["ratios_to_uniform"]
    assert "| logit-normal + shift |" in capsys.readouterr().out


def test_drawn_times_match_an_independent_computation():
    """The variants' times for a seeded step equal SD3's definitions computed here from the same generator: U[0, 1],
    sigmoid(m + s n), and a t / (1 + (a - 1) t) of the latter (a < 1 here: shifted times lie below)."""
    m, s, a, seed, n = 0.5, 0.8, 0.5, 7, 256
    args = bench_flow_times.build_parser().parse_args(["--logit-mean", str(m), "--logit-std", str(s),
                                                       "--shift", str(a), "--seed", str(seed)])
    draws = {label: StepDraws(seed, BatchPlan(n), (4, 2, 2), "cpu", obj.sample_timesteps)
             for label, obj in bench_flow_times.variant_objectives(args).items()}
    for step in (0, 5):
        def gen():
            return torch.Generator().manual_seed(step_seed(seed, step, "timesteps"))
        u = torch.rand(n, generator=gen()).double()  # float32 draws (the stream), the formulas in float64
        t = 1 / (1 + torch.exp(-(m + s * torch.randn(n, generator=gen()).double())))
        torch.testing.assert_close(draws["uniform"].draw(step)["t"].double(), u, rtol=0, atol=1e-7)
        torch.testing.assert_close(draws["logit-normal"].draw(step)["t"].double(), t, rtol=0, atol=1e-6)
        torch.testing.assert_close(draws["logit-normal + shift"].draw(step)["t"].double(), a * t / (1 + (a - 1) * t),
                                   rtol=0, atol=1e-6)
    c = bench_flow_times.schedule_checks(draws, args)
    assert c["draws_pooled"] == bench_flow_times.STAT_DRAWS * n
    assert c["logit_mean_near_m"] and c["logit_std_sample"] == pytest.approx(s, rel=0.05)
    assert c["shifted_logit_mean_expected"] == pytest.approx(m + math.log(a))
    assert c["shifted_logit_mean_near_m_plus_ln_a"]
    assert c["shift_direction"] == "<=" and c["shift_direction_holds"] and c["shift_closed_form_holds"]


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        bench_flow_times.main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--model", "--model-kwargs", "--latent-size", "--batch", "--precision", "--grad-checkpointing",
                 "--device", "--shift", "--logit-mean", "--logit-std", "--repeats", "--warmup", "--threads",
                 "--cpu-allocator", "--seed", "--quiet", "--json"):
        assert flag in text, flag


@pytest.mark.parametrize("flags", [["--shift", "0"], ["--shift", "nan"], ["--logit-std", "-1"], ["--logit-std", "0"],
                                   ["--logit-mean", "inf"], ["--batch", "0"], ["--repeats", "0"], ["--warmup", "-1"],
                                   ["--seed", "-1"], ["--precision", "fp16"], ["--model", "DiT-XL/2"]])
def test_bad_flags_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as e:
        bench_flow_times.build_parser().parse_args(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flags[0]}" in err and "error:" in err


def test_script_refuses_bad_flags_and_settings_without_writing(tmp_path):
    out = tmp_path / "never.json"
    for extra, needle in ((["--shift", "0"], "argument --shift: expected a finite number in [0.001, 1000]"),
                          (["--logit-std", "-1"], "argument --logit-std: expected a finite number in [0.001, 10]"),
                          (["--batch", "0"], "argument --batch"),
                          (["--latent-size", "7"], "error: --latent-size 7 is not divisible by 2")):
        proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, *extra, "--json", str(out)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists()
