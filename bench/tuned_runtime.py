"""Does a tuned file run exactly as its untuned twin? Same tensors, same codes, same kernel, same speed.

Takes a file quantized with `--finetune model` (DIR) and the options that made it, quantizes its untuned
twin with the same options and `--finetune none` (the codes are chosen before the whole-model tuning, so they are the same;
only the fp16 values stored beside them differ), then:
- compares the two files tensor by tensor: names, dtypes and shapes, and which tensors' bytes differ;
- runs `pvq bench-run --decode on-the-fly --json` on each, alternating, --repeats times (512-token prompt,
  64 generated tokens): prompt and generation tokens/s, peak RSS.
Writes bench/results/tuned_runtime.json. Run on a quiet machine: timings are wall-clock.

Run:  python bench/tuned_runtime.py /tmp/pvq-finetune/3.25-allocate --options "--method pvq-gptq --bits 3.25
          --allocate --allocate-factor-samples 32 --allocate-draws 0 --finetune model --finetune-tokens 65536
          --finetune-model-steps 180 --scale row --damp 0.1 --asymmetric 0.25"      (the twin goes to /tmp/pvq-twin)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import write_json  # noqa: E402
from quality import run_json  # noqa: E402
from runtime import cli_json  # noqa: E402
from scale import commit  # noqa: E402


def twin_command(options: str) -> list[str]:
    """The `pvq quantize` options that made the tuned file, its --finetune* options replaced by --finetune none."""
    words, out = options.split(), []
    while words:
        w = words.pop(0)
        if w.startswith("--finetune") or w == "--lr":
            words.pop(0)  # each tuning option takes one value
        else:
            out.append(w)
    return [*out, "--finetune", "none"]


def compare(a: Path, b: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb:
        names = sorted(fa.keys())
        if names != sorted(fb.keys()):
            return {"same_names": False}
        differ, layout = {}, True
        for n in names:
            x, y = fa.get_tensor(n), fb.get_tensor(n)
            layout &= x.dtype == y.dtype and x.shape == y.shape
            if layout and not x.equal(y):
                kind = n.rsplit(".", 1)[-1]  # codes, scales, seeds, weight (norms), bias
                differ[kind] = differ.get(kind, 0) + 1
    return {"same_names": True, "same_dtypes_and_shapes": layout, "tensors": len(names), "differ_by_kind": differ}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tuned", type=Path)
    ap.add_argument("--options", required=True, help="the `pvq quantize` options the tuned file was made with")
    ap.add_argument("--twin", type=Path, default=Path("/tmp/pvq-twin"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep-twin", action="store_true", help="reuse the twin an earlier run of this script wrote")
    args = ap.parse_args()
    opts = twin_command(args.options)
    reuse = args.keep_twin and (args.twin / "model.safetensors").exists()
    q = {"seconds": None} if reuse else run_json(["quantize", *opts, "-o", str(args.twin), "--force"])
    result = {"tuned": str(args.tuned), "twin_options": " ".join(opts), "twin_quantize_seconds": q["seconds"],
              "tensors": compare(args.tuned, args.twin), "runs": [], "commit": commit()}
    for i in range(args.repeats):
        for name, d in (("untuned", args.twin), ("tuned", args.tuned)):
            r = cli_json(["bench-run", str(d), "--decode", "on-the-fly"])
            result["runs"].append({"file": name, "repeat": i, **{k: v for k, v in r.items() if not isinstance(v, (dict, list))}})
            print(name, {k: v for k, v in r.items() if "tok" in k or "rss" in k}, flush=True)
    path = ROOT / "bench" / "results" / "tuned_runtime.json"
    write_json(path, result)
    print(json.dumps(result["tensors"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
