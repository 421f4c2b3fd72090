"""Calibration spread over processes (torchrun, gloo on CPU): the statistics of every process's windows are
combined, so two processes quantize what one does, up to the order floating-point sums are taken in."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shrink

SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from helpers import tiny_llama
from safetensors.torch import save_file
import shrink
from shrink.quant.distributed import join, leave, world
join()
calibration = [torch.randint(3, 96, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(8)]
import shrink.quant.calibrated as calibrated
tokens, collect = {{}}, calibrated.collect_stats
def counting(*a, **k):  # the token counts the methods see, after combining
    stats = collect(*a, **k)
    tokens.update({{n: s.tokens for n, s in stats.items()}})
    return stats
calibrated.collect_stats = counting
model = shrink.quantize(tiny_llama(), "int4-g32", method=sys.argv[2], calibration=calibration, progress=False)
rank, size = world()
state = {{k: v.contiguous() for k, v in model.state_dict().items() if k.endswith((".qweight", ".scales"))}}
share = len(shrink.quant.distributed.my_share(calibration))
save_file(state, sys.argv[1] + f"-{{rank}}-of-{{size}}.safetensors",
          metadata={{"tokens": str(tokens["self_attn.q_proj"]), "windows": str(share)}})
leave()
"""


def calibration():
    return [torch.randint(3, 96, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(8)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_two_processes_quantize_what_one_does(tmp_path, method):
    from helpers import tiny_llama
    from safetensors.torch import load_file

    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(tmp_path / "q"), method], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    from safetensors import safe_open

    files = [str(tmp_path / f"q-{r}-of-2.safetensors") for r in range(2)]
    ranks = [load_file(f) for f in files]
    for f in files:  # each process ran 4 of the 8 windows; the statistics are of all 8 (8 x 32 tokens)
        with safe_open(f, "pt") as g:
            assert g.metadata() == {"tokens": "256", "windows": "4"}
    for k in ranks[0]:  # both processes hold the very same weights
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    one = shrink.quantize(tiny_llama(), "int4-g32", method=method, calibration=calibration(), progress=False)
    alone = {k: v for k, v in one.state_dict().items() if k.endswith((".qweight", ".scales"))}
    assert set(alone) == set(ranks[0])
    same = sum(int((alone[k] == ranks[0][k]).sum()) for k in alone if k.endswith(".qweight"))
    total = sum(alone[k].numel() for k in alone if k.endswith(".qweight"))
    assert same / total > 0.99, same / total  # codes: a rounding tie may fall the other way
    for k in alone:
        if k.endswith(".scales"):
            torch.testing.assert_close(ranks[0][k].float(), alone[k].float(), rtol=2e-2, atol=1e-4)


def test_windows_are_shared_in_order_and_too_few_are_refused(monkeypatch):
    from shrink.quant import distributed

    monkeypatch.setattr(distributed, "world", lambda: (1, 3))
    assert distributed.my_share(list(range(8))) == [2, 3, 4]  # rank 1 of 3: the middle slice
    monkeypatch.setattr(distributed, "world", lambda: (0, 3))
    assert distributed.my_share(list(range(8))) == [0, 1]
    with pytest.raises(shrink.ShrinkError, match="2 calibration windows cannot be shared among 3 processes"):
        distributed.my_share([0, 1])
