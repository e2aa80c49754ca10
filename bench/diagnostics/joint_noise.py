"""Diagnostic (issue 5): does joint noise injection (all layers at once, planned relative energies) predict the quantized loss?"""
import json, math, sys, time
from pathlib import Path
import torch
from pvq.models.loading import load_model
from pvq.data import calibration_batches, resolve_text
from pvq.models.adapters import blocks, LINEARS
from pvq.config import QuantConfig, choose_spec, _proxy_sqnr
from pvq import allocation
torch.set_num_threads(2); torch.set_grad_enabled(False)
model, tok = load_model(None)
text = resolve_text("wikitext2", "calib")
ids = calibration_batches(tok, text, 8, 256, 1)
t = time.time()
cfg = QuantConfig(method="pvq-gptq", bits=2.25)
calib = calibration_batches(tok, text, 128, 512, 0)
fac = allocation.error_factors(model, cfg, calib, progress=False)
print("factors", time.time() - t, flush=True)

names = [f"model.layers.{i}.{n}" for i in range(len(blocks(model))) for n in LINEARS]
from pvq.models.adapters import capture_block_inputs
hidden0, kw = capture_block_inputs(model, ids)
def L():
    return allocation._loss_from(model, 0, hidden0, kw, ids)
base = L()
ws = {n: model.get_submodule(n).weight for n in names}
keep = {n: w.detach().clone() for n, w in ws.items()}
def joint(rel, draws=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    vals = []
    for d in range(draws):
        noise = {}
        for n in names:
            z = torch.randn(keep[n].shape, generator=g)
            z *= math.sqrt(rel[n] * float(keep[n].pow(2).sum()) / float(z.pow(2).sum()))
            noise[n] = z
        for sgn in (1, -1):
            for n in names: ws[n].copy_(keep[n] + sgn * noise[n])
            vals.append(L() - base)
    for n in names: ws[n].copy_(keep[n])
    return sum(vals) / len(vals), vals
sens = json.load(open(Path(__file__).resolve().parents[1] / "results" / "sensitivities.json"))
a = {n: max(sens[n]["a"], 0) for n in names}
e = {2.25: 10 ** (-_proxy_sqnr(choose_spec(QuantConfig(method="pvq", bits=2.25), 576, 576)) / 10),
     3.25: 10 ** (-_proxy_sqnr(choose_spec(QuantConfig(method="pvq", bits=3.25), 576, 576)) / 10)}
n_of = {2.25: "12", 3.25: "16"}
q = json.load(open(Path(__file__).resolve().parents[1] / "results" / "quality.json"))
base_ppl = q["unquantized"]["ppl"]
measured = {(r["method"], r["target_bits"]): math.log(r["ppl"] / base_ppl) for r in q["runs"]
            if r["method"] in ("pvq", "pvq-gptq") and r["target_bits"] in (2.25, 3.25) and "ppl" in r}
for (m, b), meas in measured.items():
    rel = {n: e[b] * (fac[n][n_of[b]] if m == "pvq-gptq" else 1.0) for n in names}
    lin = sum(a[n] * rel[n] for n in names)
    t = time.time()
    j, vals = joint(rel)
    print(json.dumps(dict(method=m, bits=b, linear=lin, joint=j, draws=vals, measured=meas, secs=time.time() - t)), flush=True)

# Run: python bench/diagnostics/joint_noise.py > bench/diagnostics/joint_noise.jsonl (about 10 minutes)
