"""Quantizing on Ray workers: wall time against the number of workers, and the bytes against one process.

On the 12-layer random Llama checkpoint of bench/scale.py (about 1 B parameters, bfloat16 shards) and
on SmolLM2-135M (the default model), `pvq quantize --method M --bits 3.25` runs in its own process:
without Ray (torch's own threads), with `--workers 1` and `--workers 2` (one thread per worker), and
on a two-node Ray cluster on this machine (`ray start --head` and a second `ray start --address`, one
CPU each). Every output's files are hashed (sha256) and compared with the run without Ray. Results go
to bench/results/distributed.json under the method's name, rewritten after every run.

pvq-gptq runs every row with `--calib-shards 2` (the unit of parallel work, the same setting in every
row, so the bytes must agree), the default calibration (128 x 512 tokens) on SmolLM2 and 32 x 256
tokens on the random model (as bench/scale.py).

    python bench/distributed.py                                  # pvq, both models (about 15 minutes)
    python bench/distributed.py --methods pvq-gptq --models smollm2   # the others' results are kept
    python bench/distributed.py --project                        # only the 8B / 70B time projection
    python bench/distributed.py --methods pvq-gptq --models smollm2 --runs none,1,2 --asymmetric 0.25

The projection (`projection` in the JSON) times, with one thread, the pieces of one block of a Llama-3-8B
shape (random weights): the Hessian pass and the forward through the block per calibration token, the
solve of each linear (pvq-gptq) and the down_proj's solve again on 2 threads, the data-free quantization
of the block (pvq). A 70B block's pieces are scaled from those (forwards by the block's weights, a solve
by rows x cols^2, the data-free codec by weights). It then schedules a whole model on 1, 8 and 64 nodes
of 32 CPUs the way distributed.py runs it: data-free blocks as independent one-CPU tasks; for pvq-gptq
the blocks in order, each with its calibration shards (one per CPU, at most one per sample) and then
its 7 solves at once, each on as many threads as its share of the block's solving work
(distributed.solve_threads, at most a node's 32), a solve on T threads sped up by Amdahl's law with the
parallel fraction the 2-thread solve measured; so a block takes its shards' forwards plus its longest
solve. The result is divided by the parallel efficiency measured here with 2 workers against 1 (bench
rows above). Not modelled: reading the checkpoint, the network (Hessians and weights travel to the
workers once per block), writing.
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
from scale import commit, make_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))


def hashes(folder: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def method_options(method: str, model: str | None, asymmetric: float = 0.0) -> list[str]:
    """What a method's every row adds to the command line (the same in every row of one model)."""
    if method == "pvq":
        return []
    calib = [] if model is None else ["--nsamples", "32", "--seqlen", "256"]
    return ["--calib-shards", "2", *calib, *(["--asymmetric", f"{asymmetric:g}"] if asymmetric else [])]


def quantize(model: str | None, out: Path, extra: list[str], bits: float, env: dict = ENV, method: str = "pvq",
             asymmetric: float = 0.0) -> dict:
    cmd = [sys.executable, "-m", "pvq.cli", "quantize", *([model] if model else []), "--method", method,
           "--bits", str(bits), "-o", str(out), "--force", "--json", "--no-progress",
           *method_options(method, model, asymmetric), *extra]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-3:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    run = {"options": " ".join(extra) or "(no Ray)", "seconds": wall, "quantize_seconds": res["seconds"],
           "linear_weights": res["linear_weights"], "mweights_per_s": res["linear_weights"] / 1e6 / res["seconds"],
           "peak_rss_mib_driver": res["peak_rss_mib"], "sha256": hashes(out), "commit": commit()}
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


SHAPES = {"8B": dict(hidden=4096, inter=14336, heads=32, kv=8, layers=32),
          "70B": dict(hidden=8192, inter=28672, heads=64, kv=8, layers=80)}


def _linears(hidden: int, inter: int, heads: int, kv: int) -> dict[str, tuple[int, int]]:
    d = hidden // heads
    return {"q": (hidden, hidden), "k": (kv * d, hidden), "v": (kv * d, hidden), "o": (hidden, hidden),
            "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}


def phase_costs(bits: float, tokens: int = 2048, seqlen: int = 512) -> dict:
    """Seconds, with one thread, of the pieces of one 8B-shaped block (random weights)."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from pvq import api
    from pvq.models.adapters import block_hessian_sums, run_block
    from pvq.settings import QuantConfig

    torch.set_num_threads(1)
    sh = SHAPES["8B"]
    cfg_m = LlamaConfig(hidden_size=sh["hidden"], intermediate_size=sh["inter"], num_attention_heads=sh["heads"],
                        num_key_value_heads=sh["kv"], num_hidden_layers=1, max_position_embeddings=seqlen)
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg_m, 0).eval()
    for p in block.parameters():
        p.data.normal_(0, 0.02) if p.dim() == 2 else p.data.fill_(1.0)
    hidden = torch.randn(tokens // seqlen, seqlen, sh["hidden"])
    pos = torch.arange(seqlen)[None]
    kwargs = {"position_embeddings": LlamaRotaryEmbedding(cfg_m)(hidden, pos), "attention_mask": None,
              "position_ids": pos, "use_cache": False}
    cfg = QuantConfig(method="pvq-gptq", bits=bits)
    out = {"threads": 1, "tokens": tokens, "calib_dtype": cfg.calib_dtype}
    with torch.no_grad():
        with api.calibration_precision(cfg, hidden):
            t0 = time.time()
            lead, accs, _ = block_hessian_sums(block, hidden, kwargs)
            out["hessian_s_per_token"] = (time.time() - t0) / tokens
            t0 = time.time()
            run_block(block, hidden, kwargs)
            out["forward_s_per_token"] = (time.time() - t0) / tokens
        hess = {name: accs[who].hessian() for name, who in lead.items()}
        del accs
        names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                 "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
        out["solve_s"], out["data_free_s"] = {}, {}
        for short, name in names.items():
            lin = block.get_submodule(name)
            t0 = time.time()
            api.quantize_linear(name, lin.weight.detach(), None, cfg, hess[name].clone(), owned=True)
            out["solve_s"][short] = time.time() - t0
            t0 = time.time()
            api.quantize_linear(name, lin.weight.detach(), None, QuantConfig(method="pvq", bits=bits))
            out["data_free_s"][short] = time.time() - t0
            print("phase", short, f"{out['solve_s'][short]:.1f} s", f"{out['data_free_s'][short]:.1f} s", flush=True)
        # how a solve speeds up with threads (distributed.solve_threads gives the longest most of a node)
        torch.set_num_threads(2)
        lin = block.get_submodule(names["down"])
        t0 = time.time()
        api.quantize_linear("down", lin.weight.detach(), None, cfg, hess[names["down"]].clone(), owned=True)
        out["solve_down_2_threads_s"] = time.time() - t0
        torch.set_num_threads(1)
        print("down solve on 2 threads", f"{out['solve_down_2_threads_s']:.1f} s", flush=True)
    return out


def thread_speedup(costs: dict, threads: int) -> float:
    """Amdahl's law with the parallel fraction the 2-thread solve of the 8B down_proj measured."""
    s2 = costs["solve_s"]["down"] / costs["solve_down_2_threads_s"]
    par = min(max(2 * (1 - 1 / s2), 0.0), 1.0)
    return 1 / ((1 - par) + par / threads)


def project(costs: dict, efficiency: dict, nsamples: int = 128, seqlen: int = 512) -> dict:
    """Hours to quantize 8B and 70B models on 1, 8 and 64 nodes of 32 workers, from `costs` (phase_costs)."""
    from pvq.distributed import solve_cost, solve_threads
    base = _linears(**{k: v for k, v in SHAPES["8B"].items() if k != "layers"})
    base_weights = sum(r * c for r, c in base.values())
    tokens = nsamples * seqlen
    table = {}
    for model, sh in SHAPES.items():
        lin = _linears(**{k: v for k, v in sh.items() if k != "layers"})
        weights = sum(r * c for r, c in lin.values())
        grow = weights / base_weights
        solve = {k: costs["solve_s"][k] * (r * c * c) / (base[k][0] * base[k][1] ** 2) for k, (r, c) in lin.items()}
        free_block = sum(costs["data_free_s"].values()) * grow
        per_token = (costs["hessian_s_per_token"] + costs["forward_s_per_token"]) * grow
        row = {}
        for nodes in (1, 8, 64):
            workers = 32 * nodes
            # data-free: every block a task, `workers` at a time
            pvq = -(-sh["layers"] // workers) * free_block / efficiency["pvq"]
            # pvq-gptq: blocks in order; shards and linears of a block in parallel (longest solve first)
            shards = min(workers, nsamples)
            threads = solve_threads({k: solve_cost(r, c) for k, (r, c) in lin.items()}, workers, 32)
            solves = max(t / thread_speedup(costs, threads[k]) for k, t in solve.items())
            block = tokens * per_token / shards + solves
            gptq = sh["layers"] * block / efficiency["pvq-gptq"]
            row[f"{nodes} node{'s' if nodes > 1 else ''}"] = {"pvq_hours": pvq / 3600, "pvq_gptq_hours": gptq / 3600}
        table[model] = row
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="random12,smollm2")
    ap.add_argument("--methods", default="pvq", help="comma-separated: pvq, pvq-gptq")
    ap.add_argument("--runs", default="none,1,2,two-nodes",
                    help="comma-separated rows: none (no Ray), 1 and 2 (--workers), two-nodes")
    ap.add_argument("--bits", type=float, default=3.25)
    ap.add_argument("--asymmetric", type=float, default=0.0,
                    help="pvq-gptq rows with --asymmetric S, kept under 'pvq-gptq --asymmetric S'")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pvq-distributed"))
    ap.add_argument("--project", action="store_true", help="only time the pieces of an 8B block and project")
    args = ap.parse_args()
    out_json = RESULTS / "distributed.json"
    old = json.loads(out_json.read_text()) if out_json.is_file() else {}
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
               "bits": args.bits, "command": "python bench/distributed.py " + " ".join(sys.argv[1:]),
               "methods": old.get("methods", {}), **({"projection": old["projection"]} if "projection" in old else {})}
    if args.project:
        costs = phase_costs(args.bits)
        eff = {m: min(r["speedup_2_over_1_workers"] for r in results["methods"][m]["models"].values()) / 2
               for m in ("pvq", "pvq-gptq")}
        results["projection"] = {"costs_8b_block": costs, "efficiency_2_workers": eff,
                                 "calibration": "128 x 512 tokens", "hours": project(costs, eff), "commit": commit(),
                                 "assumptions": __doc__.split("The projection", 1)[1].strip()}
        write_json(out_json, results)
        print(json.dumps(results["projection"]["hours"], indent=1))
        return
    for method in args.methods.split(","):
        asym = args.asymmetric if method != "pvq" else 0.0
        key = method + (f" --asymmetric {asym:g}" if asym else "")
        mres = results["methods"].setdefault(key, {"models": {}})
        for name in args.models.split(","):
            if name == "random12":
                model = args.workdir / "llama-12"
                make_checkpoint(model, 12)
                model = str(model)
            else:
                model = None  # the default model, SmolLM2-135M (a GGUF file each worker loads whole)
            runs = []
            entry = mres["models"][name] = {"options_every_row": " ".join(method_options(method, model, asym)),
                                            "runs": runs}
            rows = {"none": [], "1": ["--workers", "1"], "2": ["--workers", "2"], "two-nodes": "two-nodes"}
            for extra in (rows[r] for r in args.runs.split(",")):
                if extra == "two-nodes":
                    with TwoNodes() as cluster:
                        run = quantize(model, args.workdir / "out", ["--ray-address", cluster.address], args.bits,
                                       cluster.env, method, asym)
                    run["options"] = "two nodes on this machine, one CPU each (--ray-address)"
                else:
                    run = quantize(model, args.workdir / "out", extra, args.bits, method=method, asymmetric=asym)
                run["same_bytes_as_one_process"] = run["sha256"] == runs[0]["sha256"] if runs else True
                runs.append(run)
                print(method, name, run["options"], f"{run['seconds']:.0f} s", run["same_bytes_as_one_process"], flush=True)
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
