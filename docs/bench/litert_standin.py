"""SmolVLM-256M-shaped stand-in (random weights: timing and coverage only): its vision half
(SigLIP-B/16 at 512 px + the pixel-shuffle connector → 64 tokens of 576) through litert-torch,
float32 and int8 (calibrated on N random frames); op and MAC coverage, one-thread timing.

    PYTHONPATH=. python docs/bench/litert_standin.py 8 > docs/bench/litert_standin.json
(needs `pip install -e .[litert]`; about 2 minutes and 3 GB here)"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from progvlm.backends.random_hf import build_random_vlm
from edge_agent.litert_export import _convert, op_coverage
from edge_agent.litert_runtime import _interpreter, _run

model, proc = build_random_vlm("smolvlm-256m-shape")
model = model.float().eval()
class V(torch.nn.Module):
    def __init__(s, m): super().__init__(); s.m = m
    def forward(s, px):
        return s.m.model.get_image_features(pixel_values=px[:, None]).pooler_output if False else s._f(px)
    def _f(s, px):
        # the fixed-size case of Idefics3's vision transformer: every patch real, so the
        # position ids are 0..N-1 (its bucketize over a patch mask has no LiteRT lowering)
        vm = s.m.model.vision_model
        e = vm.embeddings
        h = e.patch_embedding(px).flatten(2).transpose(1, 2)
        h = h + e.position_embedding.weight[None, : h.shape[1]]
        h = vm.encoder(inputs_embeds=h, attention_mask=None).last_hidden_state
        return s.m.model.connector(vm.post_layernorm(h))
v = V(model).eval()
x = torch.randn(1, 3, 512, 512)
with torch.no_grad():
    ref = v(x); print("tokens", tuple(ref.shape), file=sys.stderr)
    hf = model.model.connector(model.model.vision_model(pixel_values=x).last_hidden_state)
    assert float((hf - ref).abs().max()) == 0.0  # the model's own vision half, exactly
    t = time.perf_counter(); torch_ms = []
    for _ in range(3):
        t0 = time.perf_counter(); v(x); torch_ms.append((time.perf_counter() - t0) * 1e3)
out = {"pytorch_vision_ms": [round(m, 1) for m in torch_ms]}
import tempfile
tmp = tempfile.mkdtemp()
calib = [torch.randn(1, 3, 512, 512) for _ in range(int(sys.argv[1]))]
for name, cal in (("fp32", None), ("int8", calib)):
    t0 = time.perf_counter()
    with torch.no_grad():
        _convert(v, x, cal).export(f"{tmp}/smol_{name}.tflite")
    conv_s = time.perf_counter() - t0
    cov = {k: v_ for k, v_ in op_coverage(f"{tmp}/smol_{name}.tflite").items() if k != "by_op"}
    it = _interpreter(f"{tmp}/smol_{name}.tflite", 1, None)
    ms = []
    for _ in range(4):
        t0 = time.perf_counter(); y = _run(it, x.numpy()); ms.append((time.perf_counter() - t0) * 1e3)
    err = float(np.abs(y - ref.numpy()).max())
    out[name] = {"convert_s": round(conv_s, 1), "vision_ms": [round(m, 1) for m in ms[1:]],
                 "max_abs_err_vs_torch": err, "token_abs_max": float(np.abs(ref.numpy()).max()), **cov}
print(json.dumps(out))
