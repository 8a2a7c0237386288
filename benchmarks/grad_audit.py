"""Per-parameter gradient audit of the fast GPU path (issue 16).

For a model with all three block kinds at Nano3 width (fewer routed experts), one batch of
random tokens and the next-token loss, every parameter tensor's gradient is compared, tensor by
tensor, against the reference path (``fast_paths(False)``) in float32 without autocast:

    error(path, p) = ||g_path(p) - g_ref32(p)|| / ||g_ref32(p)||

for the fast path under bf16 autocast (the fused Mamba chain, and the step-by-step fast path
with ``fused_chain(False)``) and for the reference path under the same autocast. A tensor fails
when its fast error exceeds ``RATIO`` times the reference-bf16 error or ``FLOOR``, whichever is
larger: bf16 is allowed its own rounding, never a worse gradient than the reference computes
from the same bf16 activations. One aggregate error over all tensors would hide a wrong small
tensor (it hid a 40-140% error on ``A_log`` and ``dt_bias``), so there is none here.

    PYTHONPATH=src python3 benchmarks/grad_audit.py --seqs 4096,8192 --batches 1,2 --init ours,hf --out audit.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import TINY_SIZES, environment, now_utc  # noqa: E402

from nemotron.kernels import fast_paths  # noqa: E402
from nemotron.kernels.mamba_chain import fused_chain  # noqa: E402
from nemotron.models.nano3 import Nano3Config, Nano3ForCausalLM  # noqa: E402

RATIO = 1.5
FLOOR = 1e-2
PATHS = {  # name -> (fast paths on, fused chain on, bf16 autocast)
    "reference-fp32": (False, True, False),
    "reference-bf16": (False, True, True),
    "fast-bf16": (True, True, True),
    "fast-stepwise-bf16": (True, False, True),
}


def violates(error: float, reference_error: float) -> bool:
    """The audit's rule for one tensor (module docstring)."""
    return error > max(RATIO * reference_error, FLOOR)


def audit_config(pattern: str = "MEM*E", experts: int = 16, tiny: bool = False) -> Nano3Config:
    """Nano3's widths (hidden 2688, 64 Mamba heads x 64, state 128, 8 groups, chunk 128, 32/2
    attention heads x 128, vocab 131072) with `experts` routed experts (top-6)."""
    if tiny:  # CPU smoke test of the script itself
        # the benchmarks' tiny sizes, with a smaller vocabulary and expert count
        sizes = {**TINY_SIZES, "vocab_size": 128, "num_experts": 4, "moe_shared_expert_hidden_size": 32}
        return Nano3Config(hybrid_pattern=pattern, num_layers=len(pattern), ffn_hidden_size=64, **sizes)
    return Nano3Config(hybrid_pattern=pattern, num_layers=len(pattern), num_experts=experts)


def build_model(cfg: Nano3Config, device: torch.device, init: str, seed: int) -> Nano3ForCausalLM:
    """The model in float32 with this project's initialisation (`ours`) or with transformers'
    own `NemotronHForCausalLM` initialisation (`hf`: saved and read back through
    `models.nano3.hf.load_hf`, as a user converting a transformers model would)."""
    torch.manual_seed(seed)
    if init == "ours":
        with torch.device(device):
            return Nano3ForCausalLM(cfg)
    import tempfile

    from transformers import NemotronHForCausalLM

    from nemotron.models.nano3.hf import load_hf, to_hf_config

    with torch.device(device):
        peer = NemotronHForCausalLM(to_hf_config(cfg, dtype=torch.float32))
    with tempfile.TemporaryDirectory() as tmp:
        peer.save_pretrained(tmp)
        del peer
        return load_hf(tmp, dtype=torch.float32, device=device)


def gradients(model: Nano3ForCausalLM, tokens: torch.Tensor, path: str) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of the mean next-token loss on `tokens` along `path`."""
    fast, chain, bf16 = PATHS[path]
    model.zero_grad(set_to_none=True)
    with (
        fast_paths(fast),
        fused_chain(chain),
        torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=bf16),
    ):
        out = model(tokens[:, :-1], labels=tokens[:, 1:])
    out.loss.backward()
    return {
        name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def audit_case(
    cfg: Nano3Config,
    seq: int,
    batch: int,
    device: torch.device,
    seed: int = 0,
    paths: tuple[str, ...] = ("fast-bf16", "fast-stepwise-bf16"),
    init: str = "ours",
) -> dict:
    """One (sequence, micro batch) case: per-tensor errors of each path and the reference bf16
    path against the float32 reference, and the tensors that fail the rule."""
    model = build_model(cfg, device, init, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device, generator=gen)
    truth = gradients(model, tokens, "reference-fp32")
    ref = {n: rel(g, truth[n]) for n, g in gradients(model, tokens, "reference-bf16").items()}
    result = {"seq": seq, "batch": batch, "init": init, "tensors": {}, "failures": {}}
    for path in paths:
        got = gradients(model, tokens, path)
        missing = sorted(set(truth) - set(got))
        if missing:
            raise RuntimeError(f"{path}: no gradient for {missing}")
        failures = []
        for name, g in got.items():
            err = rel(g, truth[name])
            row = result["tensors"].setdefault(name, {"reference-bf16": ref[name]})
            row[path] = err
            if violates(err, ref[name]):
                failures.append(name)
        result["failures"][path] = failures
        worst = max(got, key=lambda n: result["tensors"][n][path] / max(ref[n], FLOOR / RATIO))
        result.setdefault("worst", {})[path] = {
            "tensor": worst,
            "error": result["tensors"][worst][path],
            "reference_bf16": ref[worst],
        }
    del model, truth
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def print_case(case: dict, paths: tuple[str, ...]) -> None:
    print(f"== seq {case['seq']} micro batch {case['batch']} init {case['init']}", flush=True)
    print(f"  {'tensor':52s} {'ref-bf16':>9s} " + " ".join(f"{p:>18s}" for p in paths))
    for name, row in case["tensors"].items():
        flag = " FAIL" if any(name in case["failures"][p] for p in paths) else ""
        print(
            f"  {name:52s} {row['reference-bf16']:9.2e} " + " ".join(f"{row[p]:18.2e}" for p in paths) + flag
        )
    for p in paths:
        w = case["worst"][p]
        print(
            f"  worst {p}: {w['tensor']} {w['error']:.2e} (reference bf16 {w['reference_bf16']:.2e}); "
            f"failures: {case['failures'][p] or 'none'}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pattern", default="MEM*E")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--seqs", default="4096,8192")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--paths", default="fast-bf16,fast-stepwise-bf16")
    ap.add_argument("--init", default="ours", help="comma list of initialisations: ours, hf (transformers')")
    ap.add_argument("--tiny", action="store_true", help="small widths (CPU smoke test)")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cfg = audit_config(args.pattern, args.experts, args.tiny)
    paths = tuple(args.paths.split(","))
    result = {
        "when": now_utc(),
        "env": environment(device),
        "pattern": args.pattern,
        "experts": cfg.num_experts,
        "rule": f"fast error <= max({RATIO} x reference-bf16 error, {FLOOR})",
        "cases": [],
    }
    for init in args.init.split(","):
        for seq in map(int, args.seqs.split(",")):
            for batch in map(int, args.batches.split(",")):
                case = audit_case(cfg, seq, batch, device, paths=paths, init=init)
                print_case(case, paths)
                result["cases"].append(case)
    result["ok"] = not any(f for c in result["cases"] for f in c["failures"].values())
    print(f"audit {'passed' if result['ok'] else 'FAILED'}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
