"""Codec benchmark: SQNR against total bits per weight, PVQ vs uniform RTN vs the Shannon bound.

Writes bench/results/codec.json and bench/results/codec.png. Two sources:
  - i.i.d. Gaussian weights (a 2048 x 2304 matrix, seed 0);
  - the real SmolLM2-135M-Instruct linear weights (every linear of the chosen blocks), rotated
    on both sides by seeded randomized Hadamard transforms (R_out^T W R_in), as pvq stores them.
Bits per weight count every stored bit: packed codes, scales, stored codebooks, rotation seeds.
SQNR = 10 log10(|w|^2 / |w - w_hat|^2) over all weights of a source.

Run:  python bench/codec.py            (about 10 minutes on a 2-core CPU)
      python bench/codec.py --quick    (fewer layers and configurations, for a smoke test)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import save_figure, write_json  # noqa: E402
sys.path.insert(0, str(ROOT / "src"))

from pvq import codec  # noqa: E402
from pvq.codec import bitpack, enumeration, gainshape  # noqa: E402
from pvq.codec.search import search  # noqa: E402
from pvq.transforms.hadamard import RandomHadamard  # noqa: E402

RATES = (2.25, 3.25, 4.25)


def rotate(w: torch.Tensor, seed: int) -> torch.Tensor:
    """R_out^T W R_in with independent seeded randomized Hadamards on both sides."""
    rows, cols = w.shape
    w = RandomHadamard(cols, 2 * seed).apply(w.double())
    return RandomHadamard(rows, 2 * seed + 1).apply(w.T).T.float()


def real_weights(layers: list[int]) -> list[tuple[str, torch.Tensor]]:
    from pvq.models.adapters import block_linears, blocks
    from pvq.models.loading import load_model

    model, _ = load_model(None)
    out = []
    for i, block in enumerate(blocks(model)):
        if i not in layers:
            continue
        for name, mod in block_linears(block).items():  # q, k, v, o, gate, up, down
            out.append((f"layers.{i}.{name.rpartition('.')[2]}", mod.weight.detach().float().clone()))
    del model
    return out


def measure(mats: list[torch.Tensor], spec, seeds: int) -> dict:
    """Quantize every matrix with spec; aggregate SQNR and exact bits."""
    err = energy = bits = weights = 0.0
    for w in mats:
        packed = codec.quantize(w, spec)
        w_hat = packed.dequantize()
        err += float(((w.double() - w_hat.double()) ** 2).sum())
        energy += float((w.double() ** 2).sum())
        rep = codec.bits_per_weight(spec, *w.shape, rotation_seeds=seeds)
        assert rep.total == packed.nbits + 64 * seeds  # the report is what is really stored
        bits += rep.total
        weights += w.numel()
    return {
        "config": spec.name, "bits_per_weight": bits / weights, "sqnr_db": 10 * math.log10(energy / err),
        "waste_bits_per_weight": spec.waste_bits_per_weight,
    }


def pvq_candidates(n: int, rate: float, scale: str, kmax: int = 200) -> list[codec.PVQSpec]:
    """Every (k, L) that fills a code of floor(n * rate) bits with 2 to 512 gain levels."""
    code_bits = int(math.floor(n * rate + 1e-9))
    out = []
    if code_bits > bitpack.MAX_WIDTH:  # beyond the 63-bit codes of the codec
        return out
    for k in range(1, kmax):
        if codec.index_bits(n, k) > code_bits - 1:
            break
        spec = codec.PVQSpec.for_code_bits(n, k, code_bits, scale=scale)
        if 2 <= spec.gain_levels <= 512 and spec.waste_bits_per_weight < 0.01:
            out.append(spec)
    return out


def gain_comparison(results: dict) -> dict:
    """SQNR of each rate's best configuration with its gain quantized by the Beta-law Lloyd-Max
    codebook (nothing stored), a uniform min..max grid (ends stored) and Lloyd-Max fitted to the
    data (levels stored), same levels, on both sources."""
    real = real_weights(results["smollm2_layers"])
    sources = {"gaussian": ([torch.randn(2048, 2304, generator=torch.Generator().manual_seed(0))], 0),
               "smollm2": ([rotate(w, seed=i) for i, (_, w) in enumerate(real)], 2)}
    out = {}
    for src, (mats, seeds) in sources.items():
        out[src] = {}
        for rate, m in results["sources"]["smollm2"]["pvq_best"].items():
            base = spec_from_name(m["config"])
            out[src][rate] = {g: measure(mats, codec.PVQSpec(base.n, base.k, base.gain_levels, g, base.scale), seeds)
                              for g in ("beta", "uniform", "empirical")}
            print(src, rate, {g: round(v["sqnr_db"], 2) for g, v in out[src][rate].items()}, flush=True)
    return out


def spec_from_name(name: str) -> codec.PVQSpec:
    """Inverse of PVQSpec.name: 'pvq-n16k29L7-beta-tensor'."""
    _, nkl, gain, scale = name.split("-")
    n, rest = nkl[1:].split("k")
    k, L = rest.split("L")
    return codec.PVQSpec(int(n), int(k), int(L), gain, scale)


def throughput(spec: codec.PVQSpec, reps: int = 3) -> dict:
    """Million weights per second on a 4.7M-weight Gaussian matrix (wall clock, all threads)."""
    w = torch.randn(2048, 2304, generator=torch.Generator().manual_seed(1))
    x = w.reshape(2048, 2304 // spec.n, spec.n)

    def best(f):
        f()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return w.numel() / min(ts) / 1e6

    y = search(x, spec.k)
    idx = enumeration.encode(y, spec.k)
    packed = codec.quantize(w, spec)
    return {
        "config": spec.name,
        "search_encode_mw_s": best(lambda: enumeration.encode(search(x, spec.k), spec.k)),
        "quantize_full_mw_s": best(lambda: codec.quantize(w, spec)),
        "decode_index_mw_s": best(lambda: enumeration.decode(idx, spec.n, spec.k)),
        "decode_full_mw_s": best(lambda: packed.dequantize()),
        "threads": torch.get_num_threads(),
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, (src, title) in zip(axes, [("gaussian", "i.i.d. Gaussian"), ("smollm2", "SmolLM2-135M linears, rotated")]):
        r = results["sources"][src]
        xs = [1.9, 4.6]
        ax.plot(xs, [6.02 * x for x in xs], "k--", label="Shannon bound 6.02 R")
        for key, style, label in [("rtn", "s-", "RTN g128 (rotated)"), ("rtn_unrotated", "^:", "RTN g128 (original)")]:
            if r.get(key):
                pts = sorted(r[key], key=lambda d: d["bits_per_weight"])
                ax.plot([p["bits_per_weight"] for p in pts], [p["sqnr_db"] for p in pts], style, label=label)
        allp = r["pvq_all"]
        ax.scatter([p["bits_per_weight"] for p in allp], [p["sqnr_db"] for p in allp], s=8, c="0.7", label="PVQ configs")
        best = sorted(r["pvq_best"].values(), key=lambda d: d["bits_per_weight"])
        ax.plot([p["bits_per_weight"] for p in best], [p["sqnr_db"] for p in best], "o-", c="C3", label="PVQ (best per rate)")
        ax.set_title(title)
        ax.set_xlabel("total bits per weight (every stored bit)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("SQNR (dB)")
    axes[1].legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="0,4,8,12,16,20,24,29", help="SmolLM2 blocks to take linears from")
    ap.add_argument("--quick", action="store_true", help="two blocks, fewer configurations: a smoke test")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output folder")
    ap.add_argument("--throughput-only", action="store_true",
                    help="re-measure only the throughput of the best configurations in an existing codec.json")
    ap.add_argument("--gains-only", action="store_true",
                    help="add to an existing codec.json the gain-quantizer comparison (beta vs uniform vs empirical)")
    args = ap.parse_args()
    if args.gains_only:
        path = Path(args.out) / "codec.json"
        results = json.loads(path.read_text())
        results["gain_quantizers"] = gain_comparison(results)
        write_json(path, results)
        return
    if args.throughput_only:
        path = Path(args.out) / "codec.json"
        results = json.loads(path.read_text())
        results["throughput"] = {rate: throughput(spec_from_name(m["config"]))
                                 for rate, m in results["sources"]["smollm2"]["pvq_best"].items()}
        for rate, t in results["throughput"].items():
            print(f"  throughput {rate}: {t}", flush=True)
        write_json(path, results)
        return
    layers = [0, 29] if args.quick else [int(s) for s in args.layers.split(",")]
    ns = (8, 12, 16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    gauss = [torch.randn(2048, 2304, generator=torch.Generator().manual_seed(0))]
    real = real_weights(layers)
    real_rot = [rotate(w, seed=i) for i, (_, w) in enumerate(real)]
    sources = {"gaussian": (gauss, gauss, 0), "smollm2": (real_rot, [w for _, w in real], 2)}
    results = {
        "command": "python bench/codec.py" + (" --quick" if args.quick else ""),
        "machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "platform": platform.platform()},
        "smollm2_layers": layers,
        "smollm2_matrices": len(real),
        "smollm2_weights": sum(w.numel() for _, w in real),
        "rates": RATES,
        "sources": {},
    }
    for src, (mats, originals, seeds) in sources.items():
        print(f"[{src}] {sum(w.numel() for w in mats) / 1e6:.1f} M weights", flush=True)
        r = {"rtn": [], "rtn_unrotated": [], "pvq_all": [], "pvq_best": {}, "shannon_db": {}}
        for rate in RATES:
            spec = codec.UniformSpec(int(rate), 128)
            r["rtn"].append(measure(mats, spec, seeds))
            if src != "gaussian":
                r["rtn_unrotated"].append(measure(originals, spec, 0))
            r["shannon_db"][str(rate)] = 6.02 * rate
            cands = [s for n in ns for scale in ("row", "tensor") for s in pvq_candidates(n, rate, scale)]
            # pick the best few k on a 1M-weight Gaussian proxy (data-free), then measure them here
            proxy = [torch.randn(512, 2304, generator=torch.Generator().manual_seed(2))]
            scored = sorted(cands, key=lambda s: -measure(proxy, s, 0)["sqnr_db"])
            keep = scored[:3] if args.quick else scored[:6]
            for spec in keep:
                m = measure(mats, spec, seeds)
                r["pvq_all"].append(m)
                print(f"  {rate:.2f}: {m['config']:<34} {m['bits_per_weight']:.4f} bpw  {m['sqnr_db']:.2f} dB", flush=True)
            # the best configuration that does not spend more bits than RTN at this rate
            rtn_bpw = r["rtn"][-1]["bits_per_weight"]
            ok = [m for m in r["pvq_all"] if abs(m["bits_per_weight"] - rate) < 0.1 and m["bits_per_weight"] <= rtn_bpw + 1e-3]
            r["pvq_best"][str(rate)] = max(ok, key=lambda m: m["sqnr_db"])
            best = r["pvq_best"][str(rate)]
            print(f"  {rate:.2f}: RTN {r['rtn'][-1]['sqnr_db']:.2f} dB; best PVQ {best['config']} {best['sqnr_db']:.2f} dB"
                  f" (+{best['sqnr_db'] - r['rtn'][-1]['sqnr_db']:.2f})", flush=True)
        results["sources"][src] = r
    results["throughput"] = {rate: throughput(spec_from_name(m["config"]))
                             for rate, m in results["sources"]["smollm2"]["pvq_best"].items()}
    for rate, t in results["throughput"].items():
        print(f"  throughput {rate}: {t}", flush=True)
    results["seconds"] = time.time() - t0

    write_json(out / "codec.json", results)
    plot(results, out / "codec.png")
    print(f"wrote {out / 'codec.json'} and {out / 'codec.png'} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
