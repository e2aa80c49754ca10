"""Quantizing on Ray workers: wall time against the number of workers, and the bytes against one process.

On the 12-layer random Llama checkpoint of bench/scale.py (about 1 B parameters, bfloat16 shards) and
on SmolLM2-135M (the default model), `pvq quantize --method pvq --bits 3.25` runs in its own process:
without Ray (torch's own threads), with `--workers 1` and `--workers 2` (one thread per worker), and
on a two-node Ray cluster on this machine (`ray start --head` and a second `ray start --address`, one
CPU each). Every output's files are hashed (sha256) and compared with the run without Ray. Results go
to bench/results/distributed.json, rewritten after every run.

    python bench/distributed.py                     # both models (about 15 minutes on 2 cores)
    python bench/distributed.py --models smollm2    # the small one only (the other's results are kept)

Only the data-free methods run on workers so far; gptq and pvq-gptq are recorded as not measured.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import write_json  # noqa: E402
from scale import make_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))


def hashes(folder: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def quantize(model: str | None, out: Path, extra: list[str], bits: float, env: dict = ENV) -> dict:
    cmd = [sys.executable, "-m", "pvq.cli", "quantize", *([model] if model else []), "--method", "pvq",
           "--bits", str(bits), "-o", str(out), "--force", "--json", "--no-progress", *extra]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-3:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    run = {"options": " ".join(extra) or "(no Ray)", "seconds": wall, "quantize_seconds": res["seconds"],
           "linear_weights": res["linear_weights"], "mweights_per_s": res["linear_weights"] / 1e6 / res["seconds"],
           "peak_rss_mib_driver": res["peak_rss_mib"], "sha256": hashes(out)}
    shutil.rmtree(out, ignore_errors=True)
    return run


class TwoNodes:
    """A head node and a second node on this machine, one CPU each (`ray start`). Ray 2.5x wants a
    token for a node to join a head (RAY_AUTH_MODE=token, the token in ~/.ray/auth_token), and the
    driver then needs the same environment."""

    def __init__(self, port: int = 6391):
        self.address = f"127.0.0.1:{port}"
        self.env = dict(ENV, RAY_AUTH_MODE="token")
        ray = [sys.executable, "-m", "ray.scripts.scripts"]
        run = lambda *a: subprocess.run([*ray, *a], check=True, capture_output=True, env=self.env)  # noqa: E731
        if not (Path.home() / ".ray" / "auth_token").is_file():
            run("get-auth-token", "--generate")
        run("start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats")
        run("start", f"--address={self.address}", "--num-cpus=1", "--disable-usage-stats")
        self.stop = lambda: subprocess.run([*ray, "stop", "--force"], capture_output=True, env=self.env)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="random12,smollm2")
    ap.add_argument("--bits", type=float, default=3.25)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pvq-distributed"))
    args = ap.parse_args()
    out_json = RESULTS / "distributed.json"
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
               "method": "pvq", "bits": args.bits, "command": "python bench/distributed.py " + " ".join(sys.argv[1:]),
               "hessian_methods": "not measured: gptq and pvq-gptq do not run on workers yet",
               "models": json.loads(out_json.read_text()).get("models", {}) if out_json.is_file() else {}}
    for name in args.models.split(","):
        if name == "random12":
            model = args.workdir / "llama-12"
            make_checkpoint(model, 12)
            model = str(model)
        else:
            model = None  # the default model, SmolLM2-135M (a GGUF file each worker loads whole)
        runs = []
        entry = results["models"][name] = {"runs": runs}
        for extra in ([], ["--workers", "1"], ["--workers", "2"], "two-nodes"):
            if extra == "two-nodes":
                with TwoNodes() as cluster:
                    run = quantize(model, args.workdir / "out", ["--ray-address", cluster.address], args.bits,
                                   cluster.env)
                run["options"] = "two nodes on this machine, one CPU each (--ray-address)"
            else:
                run = quantize(model, args.workdir / "out", extra, args.bits)
            run["same_bytes_as_one_process"] = run["sha256"] == runs[0]["sha256"] if runs else True
            runs.append(run)
            print(name, run["options"], f"{run['seconds']:.0f} s", run["same_bytes_as_one_process"], flush=True)
            one = next((r for r in runs if r["options"] == "--workers 1"), None)
            two = next((r for r in runs if r["options"] == "--workers 2"), None)
            if one and two:
                entry["speedup_2_over_1_workers"] = one["seconds"] / two["seconds"]
                entry["speedup_2_over_1_workers_quantize"] = one["quantize_seconds"] / two["quantize_seconds"]
            entry["all_same_bytes"] = all(r["same_bytes_as_one_process"] for r in runs)
            write_json(out_json, results)
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
