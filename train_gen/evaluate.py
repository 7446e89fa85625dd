r"""Evaluate a sample batch against a reference batch: Inception Score, FID, sFID, Precision, Recall.

The numbers are those of OpenAI's ADM evaluation suite (guided-diffusion `evaluations/evaluator.py`),
computed by our own code in `evaluations/` (see docs/evaluation.md):

    python train_gen/evaluate.py --sample-batch samples.npz \
        --ref-batch VIRTUAL_imagenet256_labeled.npz --output_fid out.txt \
        --inception-pb classify_image_graph_def.pb

writes the metrics to out.txt (ADM's `Name: value` lines) and out.json (metrics, file hashes,
versions). Backends: `tf` (ADM's graph, exact), `torch` (approximate port), `digits` (the demo).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from evaluations.evaluator import add_backend_args, evaluate, format_metrics
from fcdm_common.cli import HelpFormatter, alias_help, positive_int, run_main
from fcdm_common.io import atomic_write_text, check_writable, remove_stale_temps


def _json_ready(obj):
    """NaN/inf -> null so the JSON is standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    return obj


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--sample-batch", required=True, help="samples .npz: arr_0 uint8 (N,H,W,3), optional arr_1 labels")
    p.add_argument("--ref-batch", required=True,
                   help="reference .npz: arr_0 uint8 images, optional mu/sigma/mu_s/sigma_s")
    p.add_argument("--output-fid", "--output_fid", dest="output_fid", default=None,
                   help=alias_help("text file for the metrics (ADM's 'Name: value' lines); default: print only",
                                   "--output_fid"))
    p.add_argument("--output-json", default=None,
                   help="JSON with metrics, file hashes and versions; default: beside --output_fid with "
                        "suffix .json, or printed when --output_fid is not given")
    add_backend_args(p)
    p.add_argument("--device", default=None, help="torch backend: device (default cuda if available, else cpu)")
    p.add_argument("--forward-batch", "--batch-size", dest="forward_batch", type=positive_int, default=64,
                   help=alias_help("images per feature-network call (ADM: 64)", "--batch-size"))
    return p


def output_paths(args) -> tuple:
    """(--output-fid or None, the JSON path or None: --output-json, else beside --output-fid)."""
    json_path = args.output_json
    if json_path is None and args.output_fid is not None:
        json_path = str(Path(args.output_fid).with_suffix(".json"))
        if json_path == str(Path(args.output_fid)):
            json_path = args.output_fid + ".json"
    return args.output_fid, json_path


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    fid_path, json_path = output_paths(args)
    for path in filter(None, (fid_path, json_path)):
        check_writable(path)  # a read-only folder fails now, not after the features are computed
        remove_stale_temps(Path(path).parent, names=[Path(path).name])  # `.<name>.XXXXXXXX.tmp` of a killed write
    result = evaluate(args.sample_batch, args.ref_batch, backend=args.backend, inception_pb=args.inception_pb,
                      inception_weights=args.inception_weights, tf_python=args.tf_python, device=args.device,
                      batch_size=args.forward_batch)
    text = format_metrics(result)
    print(text, end="", flush=True)
    payload = json.dumps(_json_ready(result), indent=2, sort_keys=False) + "\n"
    if args.output_fid is not None:
        atomic_write_text(args.output_fid, text)
        print(f"wrote {args.output_fid}")
    if json_path is not None:
        atomic_write_text(json_path, payload)
        print(f"wrote {json_path}")
    else:
        print(payload, end="")
    return result


if __name__ == "__main__":
    run_main(main)
