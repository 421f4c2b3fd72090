"""GPTQ checkpoints from other tools come in exactly: a fixture written to the published layout (AutoGPTQ /
GPTQModel: int32 words along the inputs, zeros along the outputs, v1's zero-minus-one, g_idx for activation
order), packed here with numpy, independently of shrink's reader."""

import json

import numpy as np
import pytest
import torch
from helpers import tiny_llama
from safetensors.torch import save_file

import shrink
from shrink.quant import QuantLinear


def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """[in, out] codes -> int32 [in*bits/32, out]: word r holds inputs r*per ... , lowest bits first."""
    per = 32 // bits
    q = q.astype(np.uint32).reshape(q.shape[0] // per, per, q.shape[1])
    words = np.zeros((q.shape[0], q.shape[2]), dtype=np.uint32)
    for k in range(per):
        words |= q[:, k, :] << np.uint32(bits * k)
    return words.view(np.int32)


def pack_cols(z: np.ndarray, bits: int) -> np.ndarray:
    return pack_rows(z.T, bits).T.copy()


def quantize_gptq(w: torch.Tensor, bits: int, gs: int, g_idx: np.ndarray, sym: bool):
    """GPTQ-style codes of `w` [out, in] with groups given by g_idx: (q [in, out], scales [G, out] fp16,
    zeros [G, out]), and the weight they stand for."""
    out_f, in_f = w.shape
    groups = in_f // gs
    w = w.double().numpy()
    q = np.zeros((in_f, out_f), dtype=np.int64)
    scales = np.zeros((groups, out_f), dtype=np.float16)
    zeros = np.zeros((groups, out_f), dtype=np.int64)
    top = (1 << bits) - 1
    for g in range(groups):
        cols = np.nonzero(g_idx == g)[0]
        block = w[:, cols]
        if sym:
            s = (np.abs(block).max(1) / ((top + 1) // 2 - 1)).astype(np.float16)
            z = np.full(out_f, (top + 1) // 2)
        else:
            lo, hi = np.minimum(block.min(1), 0), np.maximum(block.max(1), 0)
            s = ((hi - lo) / top).astype(np.float16)
            z = np.clip(np.round(-lo / s.astype(np.float64)), 0, top).astype(np.int64)
        q[cols] = np.clip(np.round(block / s.astype(np.float64)[:, None]) + z[:, None], 0, top).T
        scales[g], zeros[g] = s, z
    deq = scales.astype(np.float32)[g_idx].T * (q.T - zeros[g_idx].T).astype(np.float32)
    return q, scales, zeros, torch.from_numpy(deq.astype(np.float32))


def write_gptq(folder, bits=4, gs=32, desc_act=False, sym=True, fmt="gptq", seed=0, where="config"):
    """A tiny Llama as a GPTQ checkpoint; returns the float model whose Linear weights are what the codes
    stand for (the reference)."""
    model = tiny_llama(seed=seed)
    rng = np.random.default_rng(seed)
    state = {}
    for name, lin in model.named_modules():
        if not isinstance(lin, torch.nn.Linear) or name == "lm_head":
            continue
        in_f = lin.in_features
        g = in_f if gs == -1 else gs
        order = rng.permutation(in_f) if desc_act else np.arange(in_f)
        g_idx = np.empty(in_f, dtype=np.int64)
        g_idx[order] = np.arange(in_f) // g  # input order[j] is the j-th in activation order
        q, scales, zeros, deq = quantize_gptq(lin.weight.detach(), bits, g, g_idx, sym)
        stored = (zeros - 1) % (1 << bits) if fmt == "gptq" else zeros
        state[f"{name}.qweight"] = torch.from_numpy(pack_rows(q, bits))
        state[f"{name}.qzeros"] = torch.from_numpy(pack_cols(stored, bits))
        state[f"{name}.scales"] = torch.from_numpy(scales)
        state[f"{name}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        with torch.no_grad():
            lin.weight.copy_(deq)
    quantized = {n.rpartition(".")[0] for n in state}
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.rpartition(".")[0] not in quantized and k != "lm_head.weight":
                state[k] = v.half()
                v.copy_(v.half().float())  # the reference holds the fp16 values the file does
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    qc = {"bits": bits, "group_size": gs, "desc_act": desc_act, "sym": sym, "checkpoint_format": fmt,
          "damp_percent": 0.01, "true_sequential": True}
    if where == "config":
        cfg["quantization_config"] = {"quant_method": "gptq", **qc}
    else:
        (folder / "quantize_config.json").write_text(json.dumps(qc))
    cfg["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize("bits,gs,desc_act,sym,fmt", [
    (4, 32, False, True, "gptq"), (4, 32, True, True, "gptq"), (4, 64, True, True, "gptq_v2"),
    (8, -1, False, True, "gptq"), (2, 32, True, True, "gptq"), (4, 32, False, False, "gptq"),
    (4, 32, True, False, "gptq_v2"),
])
def test_gptq_folders_load_with_their_exact_weights(tmp_path, bits, gs, desc_act, sym, fmt):
    ref = write_gptq(tmp_path / "g", bits, gs, desc_act, sym, fmt)
    loaded = shrink.io.read_model(tmp_path / "g")
    assert loaded.source["kind"] == "gptq"
    m = loaded.model
    for name, lin in ref.named_modules():
        if isinstance(lin, torch.nn.Linear) and name != "lm_head":
            layer = m.get_submodule(name)
            assert isinstance(layer, QuantLinear) and layer.spec.bits == bits and layer.spec.symmetric == sym
            # one group needs no order: the reader keeps inputs as they are whenever g_idx allows
            assert (layer.input_order is not None) == (desc_act and gs != -1 and lin.in_features > gs)
            assert torch.equal(layer.dequantized_weight(), lin.weight), name  # codes and scales copied exactly
    ids = torch.randint(3, 96, (2, 10))
    with torch.no_grad():
        want = ref(ids).logits
        for backend in ("torch", "auto"):
            for mod in m.modules():
                if isinstance(mod, QuantLinear):
                    mod.backend = backend
            got = m(ids).logits
            # the native kernel rounds activations to 8 bits; the PyTorch path only reorders a sum
            assert torch.allclose(got, want, atol=1e-4 if backend == "torch" else 0.1 * want.abs().max()), backend


def test_a_gptq_model_saves_and_reloads(tmp_path):
    write_gptq(tmp_path / "g", desc_act=True)
    m = shrink.load(tmp_path / "g")
    shrink.save(m, tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "shrink.json").read_text())
    assert manifest["layout"] == "shrink"  # activation order has no pack-quantized form here
    assert manifest["modules"]["model.layers.0.mlp.up_proj"]["input_order"] is True
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError, match="no file named model.safetensors"):  # loudly, never random weights
        AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    back = shrink.load(tmp_path / "s")
    ids = torch.randint(3, 96, (1, 8))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, m(ids).logits)
    write_gptq(tmp_path / "plain", desc_act=False, where="file")  # quantize_config.json, AutoGPTQ's old place
    shrink.save(shrink.load(tmp_path / "plain"), tmp_path / "p")
    assert json.loads((tmp_path / "p" / "shrink.json").read_text())["layout"] == "pack-quantized"


def test_gptq_export_to_gguf(tmp_path):
    from test_export import bpe_tokenizer  # noqa: F401  (the tiny Llama's vocabulary is word-level)

    from shrink.io.export import exact_type

    write_gptq(tmp_path / "g", desc_act=False)
    m = shrink.load(tmp_path / "g")
    assert {exact_type(x) for x in m.modules() if isinstance(x, QuantLinear)} == {"Q4_0"}
    write_gptq(tmp_path / "a", desc_act=True)
    a = shrink.load(tmp_path / "a")
    with pytest.raises(shrink.ShrinkError, match="int4-g32 in activation order: model.layers.0.self_attn.q_proj"):
        shrink.export_gguf(a, tmp_path / "a.gguf")


def _edit(folder, fn):
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    fn(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_layouts_that_do_not_map_are_refused_naming_the_layer(tmp_path):
    def cfg_edit(folder, **kv):
        p = folder / "config.json"
        c = json.loads(p.read_text())
        c["quantization_config"].update(kv)
        p.write_text(json.dumps(c))

    cases = []
    write_gptq(tmp_path / "b3")
    cfg_edit(tmp_path / "b3", bits=3)
    cases.append(("b3", "GPTQ with 3 bits is not read"))
    write_gptq(tmp_path / "gs")
    cfg_edit(tmp_path / "gs", group_size=48)
    cases.append(("gs", "group_size 48 does not map"))
    write_gptq(tmp_path / "fmt")
    cfg_edit(tmp_path / "fmt", checkpoint_format="marlin")
    cases.append(("fmt", "checkpoint_format 'marlin' is not read"))
    write_gptq(tmp_path / "sym")
    _edit(tmp_path / "sym", lambda s: s.__setitem__("model.layers.1.mlp.up_proj.qzeros",
                                                    s["model.layers.1.mlp.up_proj.qzeros"] ^ 1))
    cases.append(("sym", "layer 'model.layers.1.mlp.up_proj': config says symmetric, but its zero points"))
    write_gptq(tmp_path / "gidx", desc_act=True)
    def skew(s):
        g = s["model.layers.0.self_attn.o_proj.g_idx"]
        g[g == 1] = 0
        s["model.layers.0.self_attn.o_proj.g_idx"] = g
    _edit(tmp_path / "gidx", skew)
    cases.append(("gidx", "layer 'model.layers.0.self_attn.o_proj': g_idx puts 0 to 64 inputs in a group"))
    write_gptq(tmp_path / "shape")
    _edit(tmp_path / "shape", lambda s: s.__setitem__("model.layers.0.mlp.down_proj.scales",
                                                      s["model.layers.0.mlp.down_proj.scales"][:2]))
    cases.append(("shape", "layer 'model.layers.0.mlp.down_proj' needs 'model.layers.0.mlp.down_proj.scales' of shape"))
    write_gptq(tmp_path / "awq")
    cfg_edit(tmp_path / "awq", quant_method="awq")
    cases.append(("awq", "quant_method 'awq' is not read"))
    for folder, message in cases:
        with pytest.raises(shrink.ShrinkError, match=message.replace("(", "\\(").replace(")", "\\)")):
            shrink.io.read_model(tmp_path / folder)
