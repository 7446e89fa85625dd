"""Draw the training curves of one or more run folders into one PNG.

    python train_gen/plot.py results/RUN_A results/RUN_B --out curves.png [--x images] [--smooth 0.6]

One panel per series: loss (smoothed, with the raw values faint behind it), mse, vb, grad norm,
steps/s, and every metric of the evaluations during training (fid, sfid, inception_score, precision,
recall, class_accuracy, ...), against optimizer steps (`--x steps`, with images seen on the top axis
when every run has the same global batch) or images seen (`--x images`). Several runs are overlaid,
one colour each, named by their folder (or `--names`). Reads `<run>/metrics.jsonl` (records with
"kind": "eval" are evaluations) and `<run>/config.json` (the global batch). Headless: matplotlib's
object API on the Agg canvas, no display and no pyplot state. The training loop calls `write_curves` to
redraw `<run>/curves.png` at each evaluation and at the end of training.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from fcdm_common.cli import UserError, float_in, int_in, run_main
from fcdm_common.io import atomic_path

TRAIN_SERIES = (  # (record key, panel title)
    ("loss", "loss"),
    ("mse", "mse"),
    ("vb", "vb"),
    ("grad_norm", "grad norm"),
    ("steps_per_sec", "steps/s"),
)
EVAL_ORDER = ("fid", "sfid", "inception_score", "precision", "recall", "class_accuracy")
NOT_METRICS = {"step", "kind", "nimg", "eval_samples", "eval_steps", "eval_cfg_scale", "eval_seed"}
SMOOTHED = ("loss",)  # drawn smoothed over faint raw values


@dataclass
class Run:
    """The records of one run folder."""
    name: str  # label in the legend
    path: Path  # the run folder
    global_batch_size: Optional[int]  # from config.json (None: unknown)
    train: List[dict] = field(default_factory=list)  # training log records, by step
    evals: List[dict] = field(default_factory=list)  # evaluation records, by step


def load_run(path, name: Optional[str] = None) -> Run:
    """Read <path>/metrics.jsonl (lines cut by a kill are skipped) and the global batch of config.json."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{path}: no metrics.jsonl; pass run folders written by train_gen/train.py")
    batch = None
    try:
        batch = int(json.loads((path / "config.json").read_text())["train"]["global_batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    run = Run(name=name or path.name, path=path, global_batch_size=batch)
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        (run.evals if rec.get("kind") == "eval" else run.train).append(rec)
    run.train.sort(key=lambda r: r["step"])
    run.evals.sort(key=lambda r: r["step"])
    return run


def smooth(values: Sequence[float], weight: float) -> List[float]:
    """TensorBoard's debiased exponential moving average: s_t = w s_{t-1} + (1 - w) v_t, divided by
    1 - w^t; non-finite values are skipped (they keep the previous smoothed value)."""
    out, acc, n = [], 0.0, 0
    for v in values:
        if v is not None and math.isfinite(v):
            acc = weight * acc + (1.0 - weight) * v
            n += 1
        out.append(acc / (1.0 - weight ** n) if n else float("nan"))
    return out


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def eval_metric_names(runs: Sequence[Run]) -> List[str]:
    """Every numeric metric of the evaluation records: the ADM ones first, then the rest alphabetically."""
    names = set()
    for run in runs:
        for rec in run.evals:
            names |= {k for k, v in rec.items() if _numeric(v) and k not in NOT_METRICS and not k.endswith("_seconds")}
    return [k for k in EVAL_ORDER if k in names] + sorted(names - set(EVAL_ORDER))


def _xs(run: Run, records: List[dict], x: str) -> List[float]:
    if x == "steps":
        return [r["step"] for r in records]
    return [r.get("nimg") if _numeric(r.get("nimg")) else r["step"] * run.global_batch_size for r in records]


def _series(records: List[dict], key: str):
    return [float(r[key]) if _numeric(r.get(key)) else float("nan") for r in records]


def make_figure(runs: Sequence[Run], x: str = "steps", smoothing: float = 0.6):
    """A matplotlib Figure (Agg canvas, no pyplot) with one panel per series; each line's label is its run's
    name (the faint raw loss lines are labelled `<name> (raw)`). Panels are the figure's axes, titled by
    series; panels without data are left out."""
    # deferred: drawing only, never on the training path
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x not in ("steps", "images"):
        raise UserError(f"--x must be steps or images, got {x!r}")
    if x == "images" and any(r.global_batch_size is None for r in runs):
        missing = [str(r.path) for r in runs if r.global_batch_size is None]
        raise UserError(f"--x images needs the global batch from config.json, missing in {', '.join(missing)}")
    panels = [(key, title, "train") for key, title in TRAIN_SERIES
              if any(_numeric(rec.get(key)) for r in runs for rec in r.train)]
    panels += [(key, f"eval: {key}", "eval") for key in eval_metric_names(runs)]
    if not panels:
        raise UserError("no numeric series in " + ", ".join(str(r.path) for r in runs))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.0 * cols, 3.4 * rows), dpi=100)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.06, top=0.94, wspace=0.22, hspace=0.75)
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    batches = {r.global_batch_size for r in runs}
    common_batch = batches.pop() if len(batches) == 1 else None  # None also when unknown
    xlabel = "images seen" if x == "images" else "steps"
    for i, (key, title, kind) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        for run, color in zip(runs, colors):
            records = run.train if kind == "train" else run.evals
            records = [r for r in records if _numeric(r.get(key))]
            if not records:
                continue
            xs, ys = _xs(run, records, x), _series(records, key)
            if key in SMOOTHED and len(ys) > 1:
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8, label=f"{run.name} (raw)")
                ax.plot(xs, smooth(ys, smoothing), color=color, linewidth=1.6, label=run.name)
            else:
                ax.plot(xs, ys, color=color, linewidth=1.4, marker="o" if kind == "eval" else None,
                        markersize=3, label=run.name)
        if key in ("loss", "mse") and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")
        if x == "steps" and common_batch is not None:
            b = common_batch
            top = ax.secondary_xaxis("top", functions=(lambda s, b=b: s * b, lambda n, b=b: n / b))
            top.set_xlabel("images seen", fontsize=8)
            top.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=8, handles=[h for h in ax.get_lines() if not h.get_label().endswith("(raw)")])
    xs_all = [v for ax in fig.axes for line in ax.get_lines() for v in line.get_xdata()]
    if xs_all and max(xs_all) > min(xs_all):  # one x range for every panel: evaluations line up with losses
        pad = 0.02 * (max(xs_all) - min(xs_all))
        for ax in fig.axes:
            if ax.get_title():
                ax.set_xlim(min(xs_all) - pad, max(xs_all) + pad)
    return fig


def plot_runs(run_dirs: Sequence, out, names: Optional[Sequence[str]] = None, x: str = "steps",
              smoothing: float = 0.6, dpi: int = 100):
    """Load the runs, draw them, write `out` (PNG, atomically); returns the Figure."""
    if names is not None and len(names) != len(run_dirs):
        raise UserError(f"--names gives {len(names)} names for {len(run_dirs)} run folders")
    runs = [load_run(p, names[i] if names else None) for i, p in enumerate(run_dirs)]
    fig = make_figure(runs, x=x, smoothing=smoothing)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return fig


def write_curves(run_dir, log: Callable[[str], None] = print) -> Optional[Path]:
    """Redraw <run>/curves.png from its metrics.jsonl (matplotlib imported here, never on the training path)
    unless the PNG is already newer than the metrics (the end of a run that just evaluated its last step).
    A failure to draw is logged, never raised: a plot must not stop a run."""
    run_dir = Path(run_dir)
    metrics, out = run_dir / "metrics.jsonl", run_dir / "curves.png"
    if not metrics.is_file():
        return None
    if out.is_file() and out.stat().st_mtime_ns > metrics.stat().st_mtime_ns:
        return out
    try:
        plot_runs([run_dir], out)
        return out
    except Exception as e:  # noqa: BLE001 - matplotlib missing, odd records, full disk: log and go on
        log(f"WARNING: could not draw {run_dir / 'curves.png'} ({type(e).__name__}: {e})")
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders of train_gen/train.py")
    p.add_argument("--out", default="curves.png", help="output PNG (default curves.png)")
    p.add_argument("--names", default=None,
                   help="comma-separated legend names, one per RUN_DIR (default: folder names)")
    p.add_argument("--x", choices=("steps", "images"), default="steps", help="x axis: optimizer steps or images seen")
    p.add_argument("--smooth", type=float_in(0.0, 1.0, hi_open=True), default=0.6,
                   help="loss smoothing weight in [0, 1) (TensorBoard's debiased EMA; 0: none; default 0.6)")
    p.add_argument("--dpi", type=int_in(10, 1000), default=100, help="resolution of the PNG, 10..1000 (default 100)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    fig = plot_runs(args.run_dirs, args.out, names=names, x=args.x, smoothing=args.smooth, dpi=args.dpi)
    panels = [ax.get_title() for ax in fig.axes if ax.get_title()]  # secondary (top) axes have no title
    print(f"wrote {args.out}: {len(panels)} panels ({', '.join(panels)}), {len(args.run_dirs)} run(s)")


if __name__ == "__main__":
    run_main(main)
