"""Quality benchmark: WikiText-2 perplexity, KL divergence and top-1 agreement against bits per weight
for rtn, hqq, gptq, pvq, pvq-gptq.

Quantizes the default model (SmolLM2-135M-Instruct) with each method at about 2.25, 3.25 and 4.25
bits per weight through the `pvq` command line (calibration: 128 x 512 tokens of the WikiText-2
validation text), evaluates the quick protocol (16 windows of 2048 tokens of the test text: perplexity,
and `--kl`: the mean KL divergence from the unquantized model per token and the share of tokens whose
top prediction agrees with it), and
ARC-Easy 0-shot for the unquantized model and pvq-gptq at 3.25 bits. Every run is a separate
process, so its time and peak memory are its own. Results are written after every run to
bench/results/quality.json, and the plot to bench/results/pareto.png.

`--flags` adds variants of the methods instead (stored under "variants", keyed by method, rate and
flags): `--methods gptq --flags=--rotate` measures rotated GPTQ, the baseline that separates what the
rotation buys from what PVQ buys.

Run:  python bench/quality.py                          (all 15 runs; hours on a 2-core CPU)
      python bench/quality.py --rates 3.25 --methods gptq,rtn --flags=--rotate --calib-dtype float32
      python bench/quality.py --rates 3.25 --methods pvq,pvq-gptq --arc-limit 300
      python bench/quality.py --rates 3.25 --redo    (measure those rows again, replacing them)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import row_line, save_figure, write_json  # noqa: E402
METHODS = ("rtn", "hqq", "gptq", "pvq", "pvq-gptq")


def run_json(args: list[str]) -> dict:
    """Run `python -m pvq.cli ARGS --json` and return its last output line as JSON."""
    cmd = [sys.executable, "-m", "pvq.cli", *args, "--json", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = time.time() - t
    return out


def save(results: dict, out: Path) -> None:
    write_json(out / "quality.json", results)
    try:
        plot(results, out / "pareto.png")
    except Exception as exc:  # a plot must never lose measured numbers
        print(f"plot failed: {exc}", flush=True)


def plot(results: dict, path: Path) -> None:
    """The quality-per-bit curves of results["runs"], and the tuned curve of finetune.json beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    base = results.get("unquantized", {}).get("ppl")
    for i, m in enumerate(METHODS):
        pts = sorted((r["bits_per_weight"], r["ppl"]) for r in results["runs"] if r["method"] == m and "ppl" in r)
        if pts:
            ax.plot(*zip(*pts), "o-", label=m, color=f"C{i}")
        for j, flags in enumerate(sorted({r["flags"] for r in results.get("variants", []) if r["method"] == m})):
            pts = sorted((r["bits_per_weight"], r["ppl"]) for r in results["variants"]
                         if r["method"] == m and r["flags"] == flags and "ppl" in r)
            ax.plot(*zip(*pts), "x^v<>s"[j % 6] + "--", label=f"{m} {flags}", color=f"C{i}", alpha=0.7)
    tuned = path.parent / "finetune.json"
    if tuned.exists() and json.loads(tuned.read_text()).get("curve"):
        ax.plot(*zip(*json.loads(tuned.read_text())["curve"]), "s--", label="pvq-gptq --finetune blocks",
                color=f"C{len(METHODS)}")
    if base:
        ax.axhline(base, color="k", ls="--", label=f"unquantized ({base:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the quantized linears (every stored bit)")
    ax.set_ylabel("WikiText-2 perplexity (quick protocol, log scale)")
    ax.set_title("SmolLM2-135M-Instruct")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="2.25,3.25,4.25")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--arc-limit", type=int, default=None, help="ARC-Easy questions (default: all 2376)")
    ap.add_argument("--work", default="/tmp/pvq-quality", help="where the quantized directories go")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--fresh", action="store_true", help="ignore runs already in quality.json")
    ap.add_argument("--redo", action="store_true", help="measure the chosen rates and methods again, replacing their rows")
    ap.add_argument("--calib-dtype", default=None, choices=["auto", "float32", "bfloat16"],
                    help="passed to `pvq quantize` (rows measured on one CPU compare with another's float32 rows)")
    ap.add_argument("--flags", default="", help="more `pvq quantize` options, e.g. --flags=--rotate (with the =: the value starts with a dash); the rows are variants")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    path = out / "quality.json"
    results = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    results.setdefault("runs", [])
    results["protocol"] = {"ppl": "WikiText-2 test, 16 windows x 2048 tokens", "calib": "wikitext2 validation, 128 x 512",
                           "arc_easy": f"test, 0-shot, limit {args.arc_limit}", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)"}
    arc = ["--arc-easy"] + (["--limit", str(args.arc_limit)] if args.arc_limit else [])
    if "unquantized" not in results:
        print("unquantized ...", flush=True)
        results["unquantized"] = run_json(["eval", "--ppl", *arc])
        save(results, out)
    print(f"unquantized: {results['unquantized']}", flush=True)
    flags = args.flags.split()
    table = "variants" if flags else "runs"
    results.setdefault(table, [])

    def key(r):
        return r["method"], r["target_bits"], r.get("flags", "")

    done = set() if args.redo else {key(r) for r in results[table] if "kl" in r}
    for rate in [float(r) for r in args.rates.split(",")]:
        for m in args.methods.split(","):
            if (m, rate, " ".join(flags)) in done:
                continue
            d = work / "".join([m, *flags, f"-{rate}"])
            dtype = ["--calib-dtype", args.calib_dtype] if args.calib_dtype else []
            q = run_json(["quantize", "--method", m, "--bits", str(rate), "-o", str(d), "--force", *dtype, *flags])
            extra = arc if (m == "pvq-gptq" and rate == 3.25 and not flags) else []
            e = run_json(["eval", str(d), "--ppl", "--kl", *extra])
            r = {"method": m, "target_bits": rate, **({"flags": " ".join(flags)} if flags else {}),
                 **({"calib_dtype": args.calib_dtype} if args.calib_dtype else {}), "bits_per_weight": q["bits_per_weight"], "file_bytes": q["file_bytes"],
                 "quantize_seconds": q["seconds"], "quantize_peak_rss_mib": q["peak_rss_mib"], **e}
            results[table] = [x for x in results[table] if key(x) != key(r)] + [r]
            save(results, out)
            print(row_line(" ".join([m, *flags, f"@ {rate}"]), r), flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
