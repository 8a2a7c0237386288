"""The kernels package imports, and its CPU paths run, without importing Triton."""

import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")

CODE = r"""
import sys
sys.path.insert(0, SRC)
import torch
import nemotron.kernels as k
from nemotron.kernels import linear_cross_entropy, gated_rmsnorm, ssd_chunked_reference
from nemotron.kernels.ssd import ssd
from nemotron.kernels.rmsnorm import rmsnorm
x = torch.randn(1, 5, 2, 3); dt = torch.rand(1, 5, 2); A = -torch.rand(2); B = torch.randn(1, 5, 1, 4)
y, s = ssd(x, dt, A, B, B, 4)
assert torch.equal(y, ssd_chunked_reference(x, dt, A, B, B, 4)[0])
h = torch.randn(6, 4); w = torch.randn(4)
rmsnorm(h, w); gated_rmsnorm(h, h, w, 2)
linear_cross_entropy(h, torch.randn(7, 4), torch.randint(0, 7, (6,)))
from nemotron.models.nano3 import Mamba2Mixer, Nano3Config
mixer = Mamba2Mixer(Nano3Config(hybrid_pattern="M", num_layers=1, hidden_size=16, vocab_size=8,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                mamba_num_heads=4, mamba_head_dim=4, mamba_state_size=4,
                                mamba_num_groups=2, mamba_chunk_size=16, num_experts=2, moe_top_k=1,
                                moe_ffn_hidden_size=8, moe_shared_expert_hidden_size=8, ffn_hidden_size=8))
mixer(torch.randn(1, 5, 16)).sum().backward()
from nemotron.kernels.relu2 import relu2
relu2(h)
from nemotron.kernels.add_n import add_n
add_n([h, h.bfloat16(), h], torch.bfloat16)
from nemotron.kernels.fp8 import rowwise
rowwise(h.bfloat16()); rowwise(h.bfloat16(), relu2=True)
linear_cross_entropy(h.bfloat16(), torch.randn(16, 4).bfloat16(), torch.randint(0, 16, (6,)), fp8=True)
from nemotron.models.nano3 import Nano3Config
loaded = [m for m in sys.modules if m == "triton" or m.endswith("_triton")]
assert not loaded, loaded
print("ok")
"""


def test_cpu_paths_do_not_import_triton():
    proc = subprocess.run(
        [sys.executable, "-c", f"SRC = {SRC!r}\n" + CODE], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_lazy_reexports_resolve():
    import nemotron.kernels as k
    from nemotron.kernels.cross_entropy import linear_cross_entropy

    assert k.linear_cross_entropy is linear_cross_entropy
    for name in k.__all__:
        assert callable(getattr(k, name))
