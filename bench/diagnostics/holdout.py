"""Diagnostic (issue 5): GPTQ error factors in the metric of held-out calibration windows, and the rehearsal with them.

Run: python bench/diagnostics/holdout.py out/alloc/pvq-gptq-2.25-alloc/allocation.json
"""
import json, math, sys, time, torch
from pathlib import Path
torch.set_grad_enabled(False)
from pvq.models.loading import load_model
from pvq.data import calibration_batches, resolve_text
from pvq.models.adapters import blocks, capture_block_inputs, block_hessians, block_linears
from pvq.api import layer_seeds
from pvq.nn import rotate_hessian
from pvq.solvers.gptq import inverse_cholesky, group_metrics
from pvq import allocation
model, tok = load_model(None)
text = resolve_text("wikitext2", "calib")
rep = json.load(open(sys.argv[1]))
L = rep["layers"]
n_of = {name: int(v["setting"].split("-")[1][1:].split("k")[0]) for name, v in L.items()}
cal = calibration_batches(tok, text, 128, 512, 0)
hold = calibration_batches(tok, text, 32, 512, 7)
hc, kw = capture_block_inputs(model, cal)
hh, kw2 = capture_block_inputs(model, hold)
out = {}
t = time.time()
for i, block in enumerate(blocks(model)):
    Hc, hc = block_hessians(block, hc, kw, keep=True)
    Hh, hh = block_hessians(block, hh, kw2, keep=True)
    for name in block_linears(block):
        full = f"model.layers.{i}.{name}"
        seeds = layer_seeds(0, full, True)
        a = rotate_hessian(Hc[name], seeds[0]).double(); b = rotate_hessian(Hh[name], seeds[0]).double()
        dead = a.diagonal() == 0; a.diagonal()[dead] = 1.0
        lam = 0.01 * float(a.diagonal()[~dead].mean())
        U = inverse_cholesky(a, lam)
        n = n_of[full]
        u_inv, metric = group_metrics(U, n)
        M = U @ b @ U.T
        g = M.shape[0] // n
        Mb = M.reshape(g, n, g, n).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        cov = u_inv.mT @ u_inv
        f_hold = float((Mb * cov.mT).sum()) / float(b.diagonal().sum())
        f_cal = float(metric.diagonal(dim1=1, dim2=2).sum()) / (float(a.diagonal().sum()) + lam * a.shape[0])
        out[full] = {"f_cal": f_cal, "f_hold": f_hold}
print("factors", time.time() - t, flush=True)
json.dump(out, open(Path(__file__).with_name("holdout_factors.json"), "w"))
ids = calibration_batches(tok, text, 8, 256, 1)
rel_cal = {n: L[n]["err"] * out[n]["f_cal"] for n in L}
rel_hold = {n: L[n]["err"] * out[n]["f_hold"] for n in L}
r1 = allocation.rehearse(model, ids, rel_cal, 3, 0, progress=False)
r2 = allocation.rehearse(model, ids, rel_hold, 3, 0, progress=False)
print(json.dumps({"cal": r1["dloss"], "hold": r2["dloss"], "report_joint": rep["joint_predicted_dloss"],
                  "ratio_hold_cal_median": sorted(out[n]["f_hold"] / out[n]["f_cal"] for n in out)[105]}))
