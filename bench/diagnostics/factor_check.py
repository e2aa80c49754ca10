"""Diagnostic (issue 5): actual pvq-gptq effective relative error vs allocation's proxy (f_n * e)."""
import json, math, sys, time
import torch
from dataclasses import replace
from pvq.models.loading import load_model
from pvq.data import calibration_batches, resolve_text
from pvq.models.adapters import blocks, capture_block_inputs, block_hessians
from pvq.config import QuantConfig, choose_spec, _proxy_sqnr
from pvq.api import layer_seeds
from pvq.nn import rotate_weight, rotate_hessian
from pvq.solvers.gptq import gptq, error_factors
from pvq.solvers.steppers import PVQStepper
from pvq import codec
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
want = [int(x) for x in sys.argv[1].split(",")]
model, tok = load_model(None)
ids = calibration_batches(tok, resolve_text("wikitext2", "calib"), 64, 512, 0)
hidden, kw = capture_block_inputs(model, ids)
res = []
proxy = {}
for i, block in enumerate(blocks(model)):
    if i > max(want): break
    hess, hidden = block_hessians(block, hidden, kw, keep=True)
    if i not in want: continue
    for name, h in hess.items():
        mod = block.get_submodule(name)
        full = f"model.layers.{i}.{name}"
        w = mod.weight.detach().float()
        rows, cols = w.shape
        seeds = layer_seeds(0, full, True)
        wr = rotate_weight(w, seeds); hr = rotate_hessian(h, seeds[0])
        for bits in (2.25, 3.25):
            cfg = QuantConfig(method="pvq-gptq", bits=bits)
            spec = choose_spec(cfg, rows, cols)
            if spec not in proxy: proxy[spec] = 10 ** (-_proxy_sqnr(spec) / 10)
            f = error_factors(hr, [spec.n], 0.01)[spec.n]
            t = time.time()
            what, _ = gptq(wr, hr, PVQStepper(spec), damp=0.01)
            d = (wr - what).double()
            hh = hr.double()
            eff = float(torch.einsum("ij,jk,ik->", d, hh, d)) * cols / (float(wr.double().pow(2).sum()) * float(hh.diagonal().sum()))
            df = codec.quantize(wr, spec).dequantize()
            e_real = float((wr - df).pow(2).sum() / wr.pow(2).sum())
            r = dict(layer=full, bits=bits, spec=spec.name, n=spec.n, e_proxy=proxy[spec], e_real=e_real, f=f,
                     pred=f * proxy[spec], actual=eff, ratio=eff / (f * proxy[spec]), secs=time.time() - t)
            print(json.dumps(r), flush=True)
            res.append(r)
# Run: python bench/diagnostics/factor_check.py 0,10,20,29 2 > bench/diagnostics/factor_check.jsonl
