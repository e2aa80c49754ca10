"""Diagnostic (issue 5): rehearse a plan with the codec's own error shape instead of Gaussian noise.

For every layer: D = fake_quantize(W', spec) - W' of the data-free codec on the rotated weights W',
scaled to the plan's effective relative error (GPTQ shrinks the energy, the shape is the codec's),
rotated back and added (one-sided: the error is a deterministic function of W). Prints the loss
increase next to the Gaussian rehearsal of the same plan and the measured one.

Run: python bench/diagnostics/codec_shaped.py out/alloc/pvq-gptq-2.25-alloc/allocation.json MEASURED_PPL
"""
import json, math, sys
import torch
torch.set_grad_enabled(False)
from pvq.models.loading import load_model
from pvq.data import calibration_batches, resolve_text
from pvq.models.adapters import capture_block_inputs
from pvq.config import spec_from_dict
from pvq.api import layer_seeds
from pvq.nn import rotate_weight, rotations
from pvq.codec.gainshape import fake_quantize
from pvq import allocation

model, tok = load_model(None)
ids = calibration_batches(tok, resolve_text("wikitext2", "calib"), 8, 256, 1)
rep = json.load(open(sys.argv[1]))
cfg = json.load(open(sys.argv[1].replace("allocation.json", "config.json")))["quantization_config"]
hidden, kw = capture_block_inputs(model, ids)
base = allocation._loss_from(model, 0, hidden, kw, ids)
out = {}
for name, v in rep["layers"].items():
    mod = model.get_submodule(name)
    w = mod.weight.detach().float()
    seeds = layer_seeds(0, name, True)
    spec = spec_from_dict(cfg["layers"][name])
    wr = rotate_weight(w, seeds)
    d = (fake_quantize(wr, spec) - wr).double()
    d *= math.sqrt(v["effective_err"] * float(wr.double().pow(2).sum()) / float(d.pow(2).sum()))
    r_in, r_out = rotations(*w.shape, seeds)
    d = r_in.apply_inverse(r_out.apply_inverse(d.T).T)
    mod.weight.copy_((w.double() + d).to(mod.weight.dtype))
out["codec_shaped_dloss"] = allocation._loss_from(model, 0, hidden, kw, ids) - base
out["gaussian_rehearsal_dloss"] = rep["joint_predicted_dloss"]
if len(sys.argv) > 2:
    out["measured_dloss"] = math.log(float(sys.argv[2]) / 20.713326604953092)
print(json.dumps(out))
