"""Activation benchmark: WikiText-2 perplexity with the inputs of every linear quantized too.

Takes the 4-bit weight model (pvq-gptq at 4.25 bits per weight; quantized here unless --w4 names
a directory that exists) and evaluates it with its activations at 8, 6 and 4 bits per activation
(plus the per-token fp16 scale), per token, with rtn and with pvq, after the layer's input rotation
and without it (quick protocol: 16 windows of 2048 tokens). The unquantized model is measured the
same way at 8 and 4 bits, with and without rotation. Every run is `pvq eval ... --abits B --json`
in its own process. Results are written after each run to bench/results/activations.json (runs
already there are skipped) and the plot to bench/results/activations.png.

Run:  python bench/activations.py --w4 out/smollm2-pvq-gptq-4.25
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import save_figure, write_json  # noqa: E402
from quality import run_json  # noqa: E402


def runs(w4: str) -> list[tuple[str, list[str]]]:
    """(name, pvq arguments), the runs the issue's bar needs first."""
    def w4a(bits, method, rot):
        return (f"W4A{bits}-{method}-{'rot' if rot else 'norot'}",
                ["eval", w4, "--ppl", "--abits", str(bits), "--act-method", method, *([] if rot else ["--no-act-rotate"])])

    def w16a(bits, rot):
        return (f"W16A{bits}-rtn-{'rot' if rot else 'norot'}",
                ["eval", "--ppl", "--abits", str(bits), *([] if rot else ["--no-act-rotate"])])

    return [("W4", ["eval", w4, "--ppl"]), w4a(8, "rtn", True), w4a(4, "rtn", True), w4a(4, "rtn", False),
            w4a(4, "pvq", True), w4a(4, "pvq", False), w4a(8, "rtn", False), w4a(6, "rtn", True), w4a(6, "rtn", False),
            w4a(6, "pvq", True), w4a(8, "pvq", True), ("W16", ["eval", "--ppl"]), w16a(8, True), w16a(4, True),
            w16a(4, False), w4a(6, "pvq", False), w4a(8, "pvq", False), w16a(8, False)]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    r = results["runs"]
    for i, (method, rot) in enumerate([("rtn", True), ("rtn", False), ("pvq", True), ("pvq", False)]):
        pts = sorted((v["bits_per_activation"], v["ppl"]) for k, v in r.items()
                     if k.startswith("W4A") and k.endswith(f"-{method}-{'rot' if rot else 'norot'}"))
        if pts:
            ax.plot(*zip(*pts), "o-" if rot else "x--", color=f"C{i // 2 * 2 + (not rot)}",
                    label=f"W4 + {method} activations, {'rotated' if rot else 'not rotated'}")
    for name, style in (("W4", "k--"), ("W16", "k:")):
        if name in r:
            ax.axhline(r[name]["ppl"], ls=style[1:], color="k",
                       label=f"{'4-bit weights (pvq-gptq 4.25)' if name == 'W4' else 'unquantized'}, float activations")
    ax.set_yscale("log")
    ax.set_xlabel("bits per activation (per-token fp16 scale included)")
    ax.set_ylabel("WikiText-2 perplexity (quick protocol)")
    ax.set_title("SmolLM2-135M: quantized activations on top of 4-bit PVQ weights")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--w4", default=str(ROOT / "out" / "smollm2-pvq-gptq-4.25"),
                    help="pvq-gptq 4.25 directory (quantized there first if missing)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--only", default=None, help="comma-separated run names")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "activations.json"
    results = json.loads(path.read_text()) if path.is_file() else {
        "protocol": "WikiText-2 test, 16 windows of 2048 tokens; activations per token (fp16 scale each)",
        "runs": {}}
    if not (Path(args.w4) / "config.json").is_file():
        q = run_json(["quantize", "--method", "pvq-gptq", "--bits", "4.25", "-o", args.w4, "--force"])
        results["w4_quantize"] = {k: q[k] for k in ("bits_per_weight", "seconds", "peak_rss_mib") if k in q}
    only = set(args.only.split(",")) if args.only else None
    for name, cmd in runs(args.w4):
        if name in results["runs"] or (only and name not in only):
            continue
        print(f"{name}: pvq {' '.join(cmd)}", flush=True)
        r = run_json(cmd)
        results["runs"][name] = {k: r[k] for k in ("ppl", "bits_per_weight", "bits_per_activation", "act_method",
                                                   "act_rotate", "wall_seconds") if k in r}
        results["runs"][name]["command"] = "pvq " + " ".join(cmd)
        print(f"  ppl {r['ppl']:.3f}  bpa {r.get('bits_per_activation')}", flush=True)
        write_json(path, results)
        try:
            plot(results, out / "activations.png")
        except Exception as exc:  # a plot must never lose measured numbers
            print(f"plot failed: {exc}", flush=True)
    r = results["runs"]
    if "W4" in r and "W4A8-rtn-rot" in r:
        results["w4a8_vs_w4"] = r["W4A8-rtn-rot"]["ppl"] / r["W4"]["ppl"]
        write_json(path, results)
        print(f"W4A8 (rtn, rotated) / W4 perplexity: {results['w4a8_vs_w4']:.4f} (bar: <= 1.03)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
