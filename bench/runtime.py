"""Runtime benchmark: file size, memory and speed of SmolLM2-135M unquantized and pvq-gptq, on this CPU.

For the unquantized model (fp32 and bf16) and pvq-gptq at 3.25 and 2.25 bits in both decode modes
("once": decoded at load and kept; "on-the-fly": only the packed codes resident), each in its own
process (`pvq bench-run --json`): peak RSS while generating 64 tokens after a 512-token prompt,
prompt tokens/s, generated tokens/s, file size, and the memory the quantized linears keep resident
against their packed size. Then the perplexity (quick protocol) of the loaded 3.25-bit model in
both modes, next to the one measured right after quantizing it (`pvq quantize --ppl`, same process
as the quantization, kept in <work>/pvq-gptq-3.25.quantize.json). Writes bench/results/runtime.json.

The quantized directories come from bench/quality.py (default /tmp/pvq-quality/pvq-gptq-{3.25,2.25});
missing ones are quantized first (about 7 minutes each; 3.25 again, with --ppl, when its quantize record
is missing: the same command gives the same file). Run on a quiet machine: timings are
wall-clock and every other process on the 2 cores shows up in them.

With --fast it also measures pvq-gptq at 2.25 bits with `--layout fast` (settings whose shapes all
fit one small table: faster on-the-fly decoding, lower quality). Runs already in runtime.json are
kept (pass --fresh to measure everything again).

Run:  python bench/runtime.py [--work /tmp/pvq-quality] [--skip-ppl] [--fast] [--fresh]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import write_json  # noqa: E402


def cli_json(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pvq.cli", *args, "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/pvq-quality", help="where the quantized directories are (or go)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--skip-ppl", action="store_true", help="skip the perplexity check of the loaded model")
    ap.add_argument("--fast", action="store_true", help="also pvq-gptq 2.25 with --layout fast")
    ap.add_argument("--fresh", action="store_true", help="ignore runs already in runtime.json")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    run = ["--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
    prior = json.loads((out / "runtime.json").read_text()) if (out / "runtime.json").exists() else {}
    old = {} if args.fresh else prior
    res: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                 "protocol": f"{args.prompt_tokens}-token prompt (fixed text), then {args.gen_tokens} greedy tokens "
                             "with the KV cache; peak RSS from the reset high-water mark before the prompt",
                 "runs": []}
    # kept for comparison: the other machine's table, and with --fresh the run this one replaces
    if "previous_machine" in prior:
        res["previous_machine"] = prior["previous_machine"]
    if args.fresh and prior.get("runs"):
        res["previous_run"] = {k: prior[k] for k in ("machine", "runs", "summary", "ppl_3.25") if k in prior}
    elif "previous_run" in prior:
        res["previous_run"] = prior["previous_run"]
    done = {r["label"]: r for r in old.get("runs", [])}
    if "ppl_3.25" in old:
        res["ppl_3.25"] = old["ppl_3.25"]
    runs = [("unquantized", None, "float32", None), ("unquantized", None, "bfloat16", None)]
    for bits, layout in [(3.25, "compact"), (2.25, "compact")] + ([(2.25, "fast")] if args.fast else []):
        d = work / f"pvq-gptq-{bits}" if layout == "compact" else work / f"pvq-gptq-{bits}-{layout}"
        record = d.with_name(d.name + ".quantize.json")
        ppl_after = bits == 3.25 and layout == "compact" and not args.skip_ppl
        if not (d / "model.safetensors").is_file() or (ppl_after and not record.is_file()):
            print(f"quantizing {d} ...", flush=True)
            q = cli_json(["quantize", "--method", "pvq-gptq", "--bits", str(bits), "--layout", layout, "-o", str(d),
                          "--force", "--no-progress", *(["--ppl"] if ppl_after else [])])
            write_json(record, q)
        runs += [("pvq-gptq", d, "float32", "once"), ("pvq-gptq", d, "float32", "on-the-fly")]
    for method, d, dtype, decode in runs:
        label = f"{method} {'' if d is None else d.name.removeprefix(method + '-') + ' bits '}{dtype}{'' if decode is None else ', decode ' + decode}"
        if label in done:
            res["runs"].append(done[label])
            continue
        t = time.time()
        r = cli_json(["bench-run", *([str(d)] if d else []), "--dtype", dtype, *run,
                      *(["--decode", decode] if decode else [])])
        r["label"] = label
        r["wall_seconds"] = time.time() - t
        res["runs"].append(r)
        print(f"{r['label']}: prompt {r['prompt_tokens_per_s']:.1f} tok/s, generate {r['gen_tokens_per_s']:.2f} tok/s, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        write_json(out / "runtime.json", res)
    by = {r["label"]: r for r in res["runs"]}
    bf16 = by["unquantized bfloat16"]
    bf16_bytes = bf16["checkpoint_bytes"]
    summary = {"bf16_checkpoint_bytes": bf16_bytes}
    for bits in ("3.25", "2.25") + (("2.25-fast",) if args.fast else ()):
        fly, once = by[f"pvq-gptq {bits} bits float32, decode on-the-fly"], by[f"pvq-gptq {bits} bits float32, decode once"]
        summary[bits] = {
            "file_bytes": fly["file_bytes"], "file_over_bf16_checkpoint": fly["file_bytes"] / bf16_bytes,
            "on_the_fly_resident_over_packed": fly["resident_over_packed"],
            "on_the_fly_gen_speed_over_bf16": fly["gen_tokens_per_s"] / bf16["gen_tokens_per_s"],
            "once_gen_speed_over_bf16": once["gen_tokens_per_s"] / bf16["gen_tokens_per_s"],
            "on_the_fly_prompt_speed_over_bf16": fly["prompt_tokens_per_s"] / bf16["prompt_tokens_per_s"],
        }
    res["summary"] = summary
    write_json(out / "runtime.json", res)
    if not args.skip_ppl and "ppl_3.25" not in res:
        d = work / "pvq-gptq-3.25"
        ref = json.loads(d.with_name(d.name + ".quantize.json").read_text())["ppl"]
        res["ppl_3.25"] = {"after_quantize": ref}
        for decode in ("once", "on-the-fly"):
            e = cli_json(["eval", str(d), "--ppl", "--decode", decode, "--no-progress"])
            res["ppl_3.25"][decode] = e["ppl"]
            print(f"ppl 3.25 decode {decode}: {e['ppl']:.4f} (right after quantizing: {ref:.4f})", flush=True)
            write_json(out / "runtime.json", res)
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
