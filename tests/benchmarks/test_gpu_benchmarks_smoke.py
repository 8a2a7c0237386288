"""The GPU benchmarks run end to end at tiny sizes on CPU, so they cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_train_throughput_runs_the_training_step_and_records(tmp_path):
    bench = load("train_throughput")
    out, md = tmp_path / "r.json", tmp_path / "bench.md"
    result = bench.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--seq",
            "32",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--params",
            "fp32",
            "--check-numerics",
            "2",
            "--out",
            str(out),
            "--append-row",
            str(md),
        ]
    )
    run = result["run"]
    assert json.loads(out.read_text())["run"]["tokens_per_step"] == 32
    assert run["tokens_per_s"] > 0 and len(run["losses"]) == 3
    # Every block kind of the proxy pattern got forward and backward time.
    for kind in ("mamba", "moe", "attention"):
        assert run["split_ms"][f"{kind}/fwd"] > 0 and run["split_ms"][f"{kind}/bwd"] > 0
    assert run["split_ms"]["optimizer"] > 0
    assert result["model"]["hybrid_pattern"] == "MEMEM*EMEMEM*E"
    assert result["numerics"]["ok"]
    text = md.read_text()
    assert "## Training throughput: Nano3 proxy, one GPU" in text and "32 x 1 x 1" in text
    # A second run appends to the same table.
    bench.record_row(str(md), result)
    assert md.read_text().count("32 x 1 x 1") == 2


def test_train_throughput_bf16_fsdp_path_with_accumulation(tmp_path):
    bench = load("train_throughput")
    result = bench.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--seq",
            "32",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--params",
            "bf16",
            "--grad-accum",
            "2",
            "--no-profile",
        ]
    )
    run = result["run"]
    assert run["grad_accum"] == 2 and run["tokens_per_step"] == 64
    assert all(torch.isfinite(torch.tensor(run["losses"])))
    assert not torch.distributed.is_initialized()  # the benchmark's one-rank group is gone


def test_experts_float32_grads_option_of_the_benchmarks(tmp_path):
    """`--experts-float32-grads` (train.experts_float32_grads) of train_throughput on the bf16
    FSDP2 path: the same loss as without it at the first step (the same forward), then other
    losses (other expert gradients; Adam's first update is the gradient's sign, which BF16
    rounding keeps, so from the third step); the parity script records it."""
    bench = load("train_throughput")
    argv = ["--tiny", "--device", "cpu", "--seq", "32", "--steps", "3", "--warmup", "0", "--params", "bf16"]
    argv += ["--no-profile"]
    plain = bench.main(argv)["run"]["losses"]
    f32 = bench.main([*argv, "--experts-float32-grads"])["run"]["losses"]
    assert f32[0] == plain[0] and f32[2] != plain[2]
    parity = load("fp8_loss_parity")
    args = [
        "--tiny",
        "--device",
        "cpu",
        "--seq",
        "32",
        "--steps",
        "2",
        "--window",
        "1",
        "--eval-batches",
        "1",
    ]
    out = parity.main([*args, "--recipes", "", "--experts-float32-grads"])  # BF16 only: no torchao
    assert out["args"]["experts_float32_grads"] is True and list(out["runs"]) == ["bf16"]


def test_train_throughput_hf_peer_ratio(tmp_path):
    pytest.importorskip("transformers")
    bench = load("train_throughput")
    result = bench.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--seq",
            "32",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--params",
            "fp32",
            "--no-profile",
            "--peer",
            "hf",
            "--peer-steps",
            "1",
            "--micro-batch",
            "2",
            "--grad-accum",
            "2",
        ]
    )
    peer = result["peer"]
    assert peer["seq"] == 32 and peer["ratio"] > 0 and peer["peer_tokens_per_s"] > 0
    # the same tokens per optimizer step on both sides (the peer fits micro batch 2 here)
    assert (peer["peer_micro_batch"], peer["peer_grad_accum"]) == (2, 2)
    assert (peer["ours_micro_batch"], peer["ours_grad_accum"]) == (2, 2)


def test_blocks_reference_and_fast_paths(tmp_path):
    bench = load("blocks")
    md = tmp_path / "bench.md"
    result = bench.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--seq",
            "32",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--experts",
            "8",
            "--append-row",
            str(md),
        ]
    )
    paths = {(r["block"], r["path"]) for r in result["rows"]}
    for kind in ("mamba", "attention", "moe"):
        assert {(kind, "reference"), (kind, "fast"), (kind, "fast-fp32w")} <= paths
    assert ("mamba", "fast-stepwise") in paths
    fast = [r for r in result["rows"] if r["path"] == "fast"]
    # Per tensor, against the fp32 reference without autocast (bf16 weights: loose bound).
    assert all(r["worst_param"]["error"] < 5e-2 for r in fast)
    mamba = next(r for r in fast if r["block"] == "mamba")
    assert {"mixer.A_log", "mixer.dt_bias", "mixer.D", "mixer.in_proj.weight"} <= set(mamba["param_errors"])
    assert md.read_text().count("| fast |") == 3


def test_grad_audit_reports_every_tensor(tmp_path):
    bench = load("grad_audit")
    out = tmp_path / "audit.json"
    result = bench.main(["--tiny", "--device", "cpu", "--seqs", "32", "--batches", "1,2", "--out", str(out)])
    assert json.loads(out.read_text())["rule"] == result["rule"]
    assert [(c["seq"], c["batch"]) for c in result["cases"]] == [(32, 1), (32, 2)]
    names = {n for n, _ in bench.Nano3ForCausalLM(bench.audit_config(tiny=True)).named_parameters()}
    for case in result["cases"]:
        assert set(case["tensors"]) == names  # every parameter tensor, one row each
        for row in case["tensors"].values():
            assert {"reference-bf16", "fast-bf16", "fast-stepwise-bf16"} <= set(row)
    # The rule: at most 1.5x the reference's bf16 error of the tensor, or 1e-2.
    assert bench.violates(0.05, 0.02) and bench.violates(0.62, 0.009)
    assert not bench.violates(0.029, 0.02) and not bench.violates(0.009, 0.001)


def test_train_dynamics_runs_each_path_and_compares(tmp_path):
    # by path: `import conftest` finds whichever test directory's conftest pytest imported last
    spec = importlib.util.spec_from_file_location(
        "train_conftest", BENCH.parent / "tests" / "train" / "conftest.py"
    )
    assert spec is not None and spec.loader is not None
    train_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_conftest)
    write_corpus = train_conftest.write_corpus

    bench = load("train_dynamics")
    blend = write_corpus(tmp_path / "data")
    files = []
    for path in ("fast", "reference", "reference-fp32"):
        files.append(tmp_path / f"{path}.json")
        run = bench.main(
            [
                "--tiny",
                "--device",
                "cpu",
                "--blend",
                str(blend),
                "--path",
                path,
                "--vocab",
                "64",
                "--seq",
                "16",
                "--batch",
                "2",
                "--steps",
                "4",
                "--warmup",
                "1",
                "--out",
                str(files[-1]),
            ]
        )
        assert len(run["lm_loss"]) == 4 and len(run["params"]) == 5  # the initial values + one per step
        assert any(k.endswith("A_log") for k in run["params"][0])
        assert run["params"][4] != run["params"][0]  # the decay parameters trained
    report = bench.main(["--compare", *map(str, files)])
    assert set(report) == {"fast_vs_reference", "reference_vs_fp32"}
    # On CPU only the device-independent fast paths differ from the reference (bf16 rounding order).
    assert report["fast_vs_reference"]["last50_mean_abs_loss_diff"] < 1e-3
    assert report["reference_vs_fp32"]["A_log"]["4"]["moved"] > 0


def test_mamba_floor_counts_gemms_and_bytes():
    bench = load("blocks")
    cfg = bench.block_config("mamba")
    floor = bench.mamba_block_floor(cfg, 1, 8192, 4e12, 800e12)
    # in_proj 2688 -> 10304 and out_proj 4096 -> 2688, x3 for training
    assert floor["gemm_flops"] == 3 * 2 * 8192 * (2688 * 10304 + 4096 * 2688)
    assert floor["floor_ms"] == pytest.approx(floor["gemm_ms"] + floor["memory_ms"])
    assert 0.3 < floor["memory_ms"] < 2.0


def test_long_context_ascends_with_recompute(tmp_path):
    bench = load("long_context")
    md = tmp_path / "bench.md"
    result = bench.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--seqs",
            "32,64",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--append-row",
            str(md),
        ]
    )
    assert result["longest_trained"] == 64
    assert [r["seq"] for r in result["runs"]] == [32, 64]
    text = md.read_text()
    assert "CP 1, per-block recompute" in text and "out of memory" not in text


def test_train_throughput_reads_a_real_blend(tmp_path):
    """`--blend` trains on tokens from a prepared blend.json instead of synthetic ones."""
    # The training tests' tiny Megatron-format corpus writer, loaded by path (not by module name).
    path = Path(__file__).resolve().parents[1] / "train" / "conftest.py"
    spec = importlib.util.spec_from_file_location("bench_train_corpus", path)
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)

    blend = corpus.write_corpus(tmp_path / "corpus")
    bench = load("train_throughput")
    result = bench.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--seq",
            "16",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--params",
            "fp32",
            "--no-profile",
            "--blend",
            str(blend),
        ]
    )
    assert result["args"]["blend"] == str(blend)
    assert all(torch.isfinite(torch.tensor(result["run"]["losses"])))


def test_multi_gpu_run_records_losses_and_throughput(tmp_path):
    bench = load("multi_gpu")
    assert (
        bench.main(
            [
                "--config",
                "tiny",
                "--name",
                "g1",
                "--out",
                str(tmp_path),
                "train.train_iters=3",
                "data.mock=true",
                "train.global_batch_size=2",
                "train.micro_batch_size=1",
                "train.device=cpu",
                "train.log_interval=1",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "g1.json").read_text())
    assert len(result["losses"]) == 3 and result["world_size"] == 1
    assert result["tokens_per_second_per_gpu"] > 0 and 0 < result["mfu"] < 1


def test_multi_gpu_report_compares_each_layout_with_the_one_gpu_run(tmp_path, capsys):
    report = load("multi_gpu_report")
    base = ["model.num_layers=14", "train.global_batch_size=2"]

    def run(name, world, losses, extra=()):
        return {
            "name": name,
            "world_size": world,
            "overrides": base + list(extra),
            "losses": losses,
            "tokens_per_second_per_gpu": 1000.0,
            "mfu": 0.4,
            "peak_memory_per_gpu": [{"allocated_gib": 1.0, "reserved_gib": 2.0}] * world,
        }

    runs = [
        run("g1", 1, [12.0, 11.0, 10.0, 9.0]),
        run("dp2", 2, [12.0, 11.0005, 10.001, 5.0]),  # step 4 is outside the compared steps
        run("tp2", 2, [12.0, 11.0, 10.01], ["model.tensor_model_parallel_size=2"]),
        run("big", 2, [1.0], ["model.num_layers=27"]),
    ]  # no one-GPU run of that model
    # Each memory column is its own peak over the GPUs: the GPU with most allocated is not the
    # one with most reserved here (the report printed 2.0 reserved, the GPU with 3.5 unseen).
    runs[-1]["peak_memory_per_gpu"] = [
        {"allocated_gib": 1.5, "reserved_gib": 2.0},
        {"allocated_gib": 1.0, "reserved_gib": 3.5},
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in runs) + "\n")
    assert report.main([str(path)]) == 1  # tp2 is 1e-2 off
    table = capsys.readouterr().out
    assert "1.0e-03 vs `g1` (pass)" in table and "1.0e-02 vs `g1` (FAIL)" in table
    assert "| `big` | 2 | 1,000 | 0.400 | 1.5 / 3.5 | - |" in table
    assert report.main([str(path), "--tol", "0.02"]) == 0


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_fp8_options_of_the_benchmarks(tmp_path):
    """`--fp8` of train_throughput and blocks, and the loss-parity script, at tiny sizes (FP8
    emulated on CPU)."""
    tt = load("train_throughput")
    result = tt.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--seq",
            "32",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--params",
            "fp32",
            "--no-profile",
            "--fp8",
            "rowwise",
            "--fp8-layers",
            "attention,experts",
        ]
    )
    assert result["run"]["name"] == "fp8-rowwise[attention,experts]"
    converted = result["run"]["fp8"]  # what was converted, not only what was asked for
    assert converted["emulated"] and not converted["lm_head"] and not converted["skipped"]
    # the attention layers' four projections, nothing of the Mamba layers or shared experts
    assert converted["linears"] and {n.rsplit(".", 1)[1] for n in converted["linears"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }
    assert converted["experts"] and all(name.endswith("experts") for name in converted["experts"])
    blocks = load("blocks")
    rows = blocks.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--seq",
            "32",
            "--blocks",
            "moe",
            "--paths",
            "fast",
            "--fp8",
            "tensorwise",
            "--warmup",
            "0",
            "--iters",
            "1",
        ]
    )["rows"]
    fp8_row = next(r for r in rows if r["path"] == "fast-fp8-tensorwise")
    assert 0 < fp8_row["rel_err_out"] < 0.1  # FP8 roundings: not the reference's values, close to them
    parity = load("fp8_loss_parity")
    out = parity.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--seq",
            "32",
            "--steps",
            "2",
            "--window",
            "1",
            "--params",
            "fp32",
            "--tolerance",
            "1.0",
            "--eval-batches",
            "2",
            "--bf16-control",
            "--cross-eval",
        ]
    )
    run = out["runs"]["fp8-tensorwise"]
    # the cross evaluation: each run's weights reloaded into a fresh model of its own precision
    # give its own held-out loss again; BF16 weights in the FP8 forward compute another loss
    table = out["cross_eval"]
    assert table["bf16"]["bf16"] == out["runs"]["bf16"]["test_loss"]
    assert table["fp8-tensorwise"]["fp8-tensorwise"] == run["test_loss"]
    assert table["bf16-control"]["bf16"] == table["bf16"]["bf16"] and "bf16-control" not in table["bf16"]
    assert run["forward_effect"] == table["bf16"]["fp8-tensorwise"] - table["bf16"]["bf16"] != 0
    assert run["training_effect"] == table["fp8-tensorwise"]["bf16"] - table["bf16"]["bf16"]
    assert all("weights" not in r for r in out["runs"].values())  # kept out of the JSON
    assert len(run["losses"]) == 2 and run["losses"] != out["runs"]["bf16"]["losses"] and run["ok"]
    # the held-out loss of each run's final weights, and the BF16 control: on CPU (deterministic)
    # it is the BF16 run again, to the bit, and is reported, not checked
    control = out["runs"]["bf16-control"]
    assert control["losses"] == out["runs"]["bf16"]["losses"] and control["ok"] is None
    assert control["final_loss_diff"] == 0.0 and control["test_loss_diff"] == 0.0
    assert (
        run["test_loss"] > 0 and run["test_loss_diff"] == run["test_loss"] - out["runs"]["bf16"]["test_loss"]
    )
    assert "6 expert groups" in run["fp8"]  # the parity run converts every FP8-capable layer


def test_multi_gpu_fake_world_records_memory_time_to_first_step_and_prediction(tmp_path):
    """`--fake-world`: rank 0 of a fake 4-rank group (one GPU measures a cluster layout's
    memory); on CPU the run must complete and record the phases and the plan's prediction."""
    import torch.distributed as dist

    bench = load("multi_gpu")
    assert (
        bench.main(
            [
                "--config",
                "tiny",
                "--name",
                "fake4",
                "--out",
                str(tmp_path),
                "--fake-world",
                "4",
                "train.train_iters=2",
                "data.mock=true",
                "train.global_batch_size=8",
                "train.micro_batch_size=1",
                "train.device=cpu",
            ]
        )
        == 0
    )
    assert not dist.is_initialized()
    result = json.loads((tmp_path / "fake4.json").read_text())
    assert result["fake_world"] == 4 and result["grad_accumulation"] == 2
    assert 0 < result["start_s"] < result["first_step_s"]
    assert result["predicted"]["fits"] is True and result["predicted"]["peak_allocated_gib"] > 0


def test_profiled_step_accounting_counts_overlapping_streams_once():
    """`device_busy`: the union of device intervals (two streams overlapping count once; CPU
    events are not device time); `attribute_kernels`: a kernel's time goes to the operator
    that launched it, not to the runtime call it is recorded under."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    bench = load("train_throughput")

    def event(name, start, end, device_type=DeviceType.CUDA, parent=None, kernels=()):
        return SimpleNamespace(
            name=name,
            time_range=SimpleNamespace(start=start, end=end),
            device_type=device_type,
            cpu_parent=parent,
            kernels=list(kernels),
            input_shapes=[[4, 8]],
        )

    op = event("aten::copy_", 0, 5, DeviceType.CPU)
    launch = event(
        "cudaLaunchKernel",
        1,
        2,
        DeviceType.CPU,
        parent=op,
        kernels=[SimpleNamespace(name="direct_copy_kernel", duration=3000.0)],
    )
    phase = "train_step: micro-batch 0 forward"
    events = [
        op,
        launch,
        event(phase, 8000, 10600, DeviceType.CPU),  # the host's phase when k3 and k4 launched
        event("k1", 1000, 4000),  # stream 1
        event("k2", 3000, 5000),  # stream 2, overlapping k1
        event("k3", 9000, 10000),  # after 4 ms idle
        event("k4", 10500, 11000),  # after 0.5 ms
        event("k3", 11000, 11500),  # back to back: no gap
        event("k3", 13000, 13500),  # after 1.5 ms
    ]
    prof = SimpleNamespace(events=lambda: events)
    busy = bench.device_busy(prof)
    # the idle time by the kernel each gap ended before, longest total first
    assert busy == {
        "busy_ms": 6.5,
        "span_ms": 12.5,
        "idle_ms": 6.0,
        "gaps": [{"before": "k3", "idle_ms": 5.5, "gaps": 2}, {"before": "k4", "idle_ms": 0.5, "gaps": 1}],
        # by the phase the host was in at each gap's end (k3 at 9 and k4 at 10.5 ms inside it)
        "idle_by_phase": {"micro-batch 0 forward": 4.5, "outside the phases": 1.5},
    }
    rows = bench.attribute_kernels(prof, ["direct_copy", "absent"])
    assert rows["absent"] == []
    assert rows["direct_copy"] == [{"ops": "aten::copy_", "shapes": "[[4, 8]]", "ms": 3.0, "calls": 1}]


def test_top_cpu_ops_ranks_operators_by_their_own_host_time():
    """`top_cpu_ops`: operators by host time of their own (not their children's), from a real
    CPU profile: an op that only calls a slow child ranks below the child."""
    from torch.profiler import ProfilerActivity, profile, record_function

    bench = load("train_throughput")
    x = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("outer_range"):
            for _ in range(20):
                x = torch.tanh(x @ x) * 0.01
    rows = bench.top_cpu_ops(prof, limit=50)
    by_name = {r["name"]: r for r in rows}
    assert by_name["aten::mm"]["calls"] == 20 and by_name["aten::tanh"]["calls"] == 20
    assert rows == sorted(rows, key=lambda r: -r["self_cpu_ms"])
    total = sum(evt.cpu_time_total for evt in prof.key_averages() if evt.key == "outer_range") / 1e3
    assert by_name.get("outer_range", {"self_cpu_ms": 0.0})["self_cpu_ms"] < total


def test_step_split_charges_each_phase_its_peak_of_memory():
    """`StepSplit.peaks`: the allocator's peak since the previous hook goes to the phase that
    just ended (block forward, block backward, between blocks, optimizer), the highest over the
    step's micro-batches, and the counter restarts at every hook."""
    bench = load("train_throughput")
    from nemotron.models.nano3.model import Nano3ForCausalLM

    class CountingMemory:
        """Each phase's peak is the number of the hook that ends it."""

        def __init__(self):
            self.calls = 0
            self.restarts = 0

        def peak_gib(self):
            self.calls += 1
            return float(self.calls)

        def restart(self):
            self.restarts += 1

    torch.manual_seed(0)
    arch = bench.proxy_model_config(tiny=True).arch()
    model = Nano3ForCausalLM(arch)
    model.reset_parameters()
    device = torch.device("cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    memory = CountingMemory()
    split = bench.StepSplit(model, optimizer, device, memory=memory)
    split.begin()
    ids = torch.randint(0, arch.vocab_size, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    split.end()
    split.remove()
    kinds = ("mamba", "moe", "attention")
    expected = {f"{k}/{p}" for k in kinds for p in ("fwd", "bwd")}
    expected |= {"outside blocks (forward)", "outside blocks (backward)", "optimizer", "after the optimizer"}
    assert set(split.peaks) == expected
    # one reading per hook, each followed by a restart (plus the one at begin())
    assert memory.restarts == memory.calls + 1
    assert split.peaks["after the optimizer"] == memory.calls  # the last hook
    assert split.peaks["optimizer"] == memory.calls - 1
    # backward phases come after every forward phase
    assert min(split.peaks[f"{k}/bwd"] for k in kinds) > max(split.peaks[f"{k}/fwd"] for k in kinds)
    # on CPU without a reader, no peaks
    plain = bench.StepSplit(model, optimizer, device)
    assert plain.memory is None
    plain.remove()


def _tiny_fp8_experts_run(*extra) -> dict:
    """train_throughput's run of the tiny model, FP8 routed experts on the bf16 FSDP2 path."""
    argv = ["--tiny", "--device", "cpu", "--seq", "32", "--steps", "2", "--warmup", "0"]
    argv += ["--params", "bf16", "--grad-accum", "2", "--no-profile", "--fp8", "tensorwise"]
    return load("train_throughput").main([*argv, "--fp8-layers", "experts", *extra])["run"]


def test_train_throughput_fp8_experts_gather_trains_as_without(tmp_path):
    """`--fp8-experts-gather` (train.fp8.experts_fsdp_float8_all_gather) on the bf16 FSDP2 path:
    named in the run, the same losses as without (the gathered forms are the same values)."""
    gathered, plain = _tiny_fp8_experts_run("--fp8-experts-gather"), _tiny_fp8_experts_run()
    assert gathered["name"] == "fp8-tensorwise[experts] experts_fsdp_float8_all_gather"
    assert gathered["losses"] == plain["losses"] and len(plain["losses"]) == 2


@pytest.mark.slow  # ~10 s
def test_fp8_loss_parity_with_experts_gather_is_the_parity_without(monkeypatch):
    """`fp8_loss_parity.py --experts-gather` on the bf16 FSDP2 path: FSDP2 makes the experts'
    FP8 forms, and the FP8 losses are those without it (the gathered forms are the same values)."""
    from nemotron.train import fp8_gather

    packs = []
    real_pack = fp8_gather.pack_forms
    monkeypatch.setattr(
        fp8_gather, "pack_forms", lambda w, world=1: packs.append(w.shape) or real_pack(w, world)
    )
    parity = load("fp8_loss_parity")
    argv = ["--tiny", "--device", "cpu", "--seq", "32", "--steps", "2", "--window", "1"]
    argv += ["--params", "bf16", "--fp8-layers", "experts", "--tolerance", "1.0"]
    gathered = parity.main([*argv, "--experts-gather"])
    assert gathered["args"]["experts_gather"] and packs
    packs.clear()
    plain = parity.main(argv)
    assert not packs
    losses = gathered["runs"]["fp8-tensorwise"]["losses"]
    assert losses == plain["runs"]["fp8-tensorwise"]["losses"] and len(losses) == 2


@pytest.mark.slow  # ~14 s
def test_fp8_experts_wgrad_option_reaches_the_experts():
    """`--fp8-experts-wgrad` (train_throughput) and `--experts-wgrad` (fp8_loss_parity):
    train.fp8.experts_weight_grad=fp8, named in the run; the first loss is the one without it
    (the forward is unchanged), the second is not (the weights were updated by FP8 weight
    gradients)."""
    fp8_wgrad, plain = _tiny_fp8_experts_run("--fp8-experts-wgrad"), _tiny_fp8_experts_run()
    assert fp8_wgrad["name"] == "fp8-tensorwise[experts] experts_weight_grad=fp8"
    assert fp8_wgrad["losses"][0] == plain["losses"][0]
    assert fp8_wgrad["losses"][1] != plain["losses"][1]
    parity = load("fp8_loss_parity")
    argv = ["--tiny", "--device", "cpu", "--seq", "32", "--steps", "2", "--window", "1"]
    argv += ["--params", "bf16", "--fp8-layers", "experts", "--tolerance", "1.0"]
    with_key, without = parity.main([*argv, "--experts-wgrad"]), parity.main(argv)
    assert with_key["args"]["experts_wgrad"] and not with_key["args"]["autotune_casts"]
    a, b = with_key["runs"]["fp8-tensorwise"]["losses"], without["runs"]["fp8-tensorwise"]["losses"]
    assert a[0] == b[0] and a[1] != b[1]


def test_fp8_autotune_casts_option_reaches_the_config():
    """`--fp8-autotune-casts` (train_throughput) and `--autotune-casts` (fp8_loss_parity):
    train.fp8.autotune_casts=true, named in the run; on CPU nothing is compiled, so the losses
    are those without it (and on a GPU only kernel launch configurations change)."""
    tuned, plain = _tiny_fp8_experts_run("--fp8-autotune-casts"), _tiny_fp8_experts_run()
    assert tuned["name"] == "fp8-tensorwise[experts] autotune_casts"
    assert tuned["losses"] == plain["losses"] and len(plain["losses"]) == 2
    parity = load("fp8_loss_parity")
    argv = ["--tiny", "--device", "cpu", "--seq", "32", "--steps", "2", "--window", "1"]
    argv += ["--params", "bf16", "--fp8-layers", "experts", "--tolerance", "1.0", "--autotune-casts"]
    assert parity.main(argv)["args"]["autotune_casts"]


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_fp8_loss_parity_over_seeds_checks_the_mean_difference(tmp_path):
    """`--seeds`: every run once per seed, each compared with the BF16 run of its own seed, and
    the check made on the mean of the per-seed final-loss differences (standard error beside)."""
    parity = load("fp8_loss_parity")
    out_path = tmp_path / "parity.json"
    argv = ["--tiny", "--device", "cpu", "--seq", "32", "--steps", "2", "--window", "1", "--params", "fp32"]
    out = parity.main(
        [*argv, "--tolerance", "1.0", "--eval-batches", "1", "--seeds", "3,4", "--out", str(out_path)]
    )
    assert list(out["runs"]) == ["bf16@3", "fp8-tensorwise@3", "bf16@4", "fp8-tensorwise@4"]
    assert out["runs"]["bf16@3"]["losses"] != out["runs"]["bf16@4"]["losses"]  # another seed, another run
    row = out["summary"]["fp8-tensorwise"]
    diffs = [out["runs"][f"fp8-tensorwise@{s}"]["final_loss_diff"] for s in (3, 4)]
    assert row["final_loss_diffs"] == diffs and row["final_loss_diff_mean"] == pytest.approx(sum(diffs) / 2)
    assert row["final_loss_diff_stderr"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)
    assert row["ok"] is True and len(row["test_loss_diffs"]) == 2
    saved = json.loads(out_path.read_text())
    assert saved["partial"] is False and saved["summary"]["fp8-tensorwise"]["final_loss_diffs"] == diffs
    # one seed's own result decides nothing when the tolerance is below the mean difference
    strict = parity.main(
        [*argv, "--tolerance", str(abs(sum(diffs) / 2) / 2), "--seeds", "3,4", "--eval-batches", "0"]
    )
    assert strict["summary"]["fp8-tensorwise"]["ok"] is False
    with pytest.raises(SystemExit):
        parity.main([*argv, "--seeds", "3,3"])


def _killed_in_the_second_run(train):
    """`train` whose second call raises, as a run killed by a time limit does."""
    calls = []

    def train_then_fail(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return train(*a, **k)

    return train_then_fail


def test_fp8_loss_parity_keeps_finished_runs_when_a_later_one_fails(tmp_path, monkeypatch):
    """The JSON is written after every run and marked partial until the end: a run cut short (a
    time limit, an out-of-memory) leaves the finished runs readable and not taken for complete."""
    parity = load("fp8_loss_parity")
    monkeypatch.setattr(parity, "train", _killed_in_the_second_run(parity.train))
    out_path = tmp_path / "parity.json"
    argv = ["--tiny", "--device", "cpu", "--seq", "32", "--steps", "2", "--window", "1", "--params", "fp32"]
    with pytest.raises(RuntimeError, match="killed"):
        parity.main([*argv, "--eval-batches", "0", "--out", str(out_path)])
    saved = json.loads(out_path.read_text())
    assert (
        saved["partial"] is True
        and list(saved["runs"]) == ["bf16"]
        and len(saved["runs"]["bf16"]["losses"]) == 2
    )


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_fp8_loss_parity_combines_the_finished_runs_of_a_result_cut_short(tmp_path, monkeypatch):
    """`--combine --finished-runs`: the runs a result cut short had finished (FP8 runs alone, the
    later seed killed) compare with their BF16 runs as the same runs trained beside them do; the
    result names what was cut short; without the option a cut-short result is refused."""
    parity = load("fp8_loss_parity")
    real_train, train_then_fail = parity.train, _killed_in_the_second_run(parity.train)
    argv = ["--tiny", "--device", "cpu", "--seq", "32", "--steps", "2", "--window", "1", "--params", "fp32"]
    argv += ["--eval-batches", "0", "--tolerance", "1.0"]
    whole = tmp_path / "whole.json"
    both = parity.main([*argv, "--seeds", "4", "--out", str(whole)])
    monkeypatch.setattr(parity, "train", train_then_fail)
    cut = tmp_path / "cut.json"
    with pytest.raises(RuntimeError, match="killed"):  # seed 4's FP8 run finished, seed 5's cut short
        parity.main([*argv, "--no-bf16", "--seeds", "4,5", "--out", str(cut)])
    monkeypatch.setattr(parity, "train", real_train)
    assert list(json.loads(cut.read_text())["runs"]) == ["fp8-tensorwise@4"]
    with pytest.raises(SystemExit):  # not finished
        parity.main([*argv, "--combine", str(cut), "--bf16-from", str(whole)])
    with pytest.raises(SystemExit):  # --finished-runs only with --combine
        parity.main([*argv, "--finished-runs"])
    merged = parity.main([*argv, "--combine", str(cut), "--finished-runs", "--bf16-from", str(whole)])
    assert merged["cut_short"] == [str(cut)] and merged["summary"]["fp8-tensorwise"]["seeds"] == [4]
    assert (
        merged["summary"]["fp8-tensorwise"]["final_loss_diffs"]
        == both["summary"]["fp8-tensorwise"]["final_loss_diffs"]
    )


@pytest.mark.slow  # ~11 s
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_fp8_loss_parity_combines_results_of_several_calls(tmp_path):
    """`--combine`: results of one and of several seeds (made in separate calls) merge into the
    check over all seeds, equal to one call over the same seeds; unfinished results, other
    settings and a seed given twice are refused."""
    parity = load("fp8_loss_parity")
    argv = ["--tiny", "--device", "cpu", "--seq", "32", "--steps", "2", "--window", "1", "--params", "fp32"]
    argv += ["--eval-batches", "1", "--tolerance", "1.0"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    parity.main([*argv, "--seed", "5", "--out", str(a)])
    parity.main([*argv, "--seeds", "6,7", "--out", str(b)])
    c = tmp_path / "c.json"  # one seed through --seeds: named by it (not by --seed's default)
    assert list(parity.main([*argv, "--seeds", "9", "--out", str(c)])["runs"]) == [
        "bf16@9",
        "fp8-tensorwise@9",
    ]
    merged = parity.main([*argv, "--combine", str(a), str(b), str(c)])
    whole = parity.main([*argv, "--seeds", "5,6,7,9"])
    assert list(merged["runs"]) == [f"{n}@{s}" for s in (5, 6, 7, 9) for n in ("bf16", "fp8-tensorwise")]
    got, want = merged["summary"]["fp8-tensorwise"], whole["summary"]["fp8-tensorwise"]
    assert got["seeds"] == [5, 6, 7, 9] and got["final_loss_diffs"] == want["final_loss_diffs"]
    assert got["final_loss_diff_mean"] == want["final_loss_diff_mean"] and got["ok"] is True
    other = tmp_path / "other.json"
    parity.main([*argv, "--seed", "8", "--lr", "1e-3", "--out", str(other)])
    with pytest.raises(SystemExit):  # another learning rate
        parity.main([*argv, "--combine", str(a), str(other)])
    with pytest.raises(SystemExit):  # seed 5 twice
        parity.main([*argv, "--combine", str(a), str(a)])
    unfinished = json.loads(a.read_text()) | {"partial": True}
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(unfinished))
    with pytest.raises(SystemExit):
        parity.main([*argv, "--combine", str(cut), str(b)])


@pytest.mark.slow  # trains several FP8 and BF16 runs: ~15 s
def test_fp8_loss_parity_takes_the_bf16_runs_of_other_results(tmp_path):
    """`--combine ... --bf16-from ...`: each seed's FP8 run compared with the BF16 run of another
    result (BF16 only: a baseline made after the FP8 runs), the differences those of the two
    runs (also FP8 runs trained alone, `--no-bf16`); refused: other settings
    (--experts-float32-grads among them: the FP8 experts follow it too), a missing seed, FP8
    results made before they did, and the key with FP8 experts whose forms FSDP2 does not gather
    (their gradients could not be float32)."""
    parity = load("fp8_loss_parity")
    argv = ["--tiny", "--device", "cpu", "--seq", "32", "--steps", "2", "--window", "1", "--params", "bf16"]
    argv += ["--eval-batches", "1", "--tolerance", "1.0", "--fp8-layers", "experts", "--experts-wgrad"]
    with pytest.raises(SystemExit):  # float32 gradients asked of experts FSDP2 gathers in BF16
        parity.main([*argv, "--experts-float32-grads", "--seeds", "5"])
    argv += ["--experts-gather"]
    fp8, base = tmp_path / "fp8.json", tmp_path / "base.json"
    fp8_out = parity.main([*argv, "--seeds", "5,6", "--out", str(fp8)])
    assert fp8_out["args"]["fp8_experts_grads_keyed"] is True
    parity.main([*argv, "--recipes", "", "--seeds", "5,6", "--out", str(base)])
    # the same settings on the CPU train the same BF16 runs: shifted here, so the merge shows
    # whose runs it compares with
    shifted = json.loads(base.read_text())
    for run in shifted["runs"].values():
        run["losses"] = [v + 0.25 for v in run["losses"]]
        run["test_loss"] += 0.25
    base.write_text(json.dumps(shifted))
    merged = parity.main([*argv, "--combine", str(fp8), "--bf16-from", str(base)])
    assert merged["bf16_from"] == [str(base)]
    own_losses = {}
    for seed in (5, 6):
        got, own = merged["runs"][f"fp8-tensorwise@{seed}"], fp8_out["runs"][f"fp8-tensorwise@{seed}"]
        own_losses[seed] = own["losses"]
        bf16 = shifted["runs"][f"bf16@{seed}"]
        assert merged["runs"][f"bf16@{seed}"]["losses"] == bf16["losses"]
        assert got["final_loss_diff"] == pytest.approx(got["losses"][-1] - bf16["losses"][-1])
        assert got["final_loss_diff"] == pytest.approx(own["final_loss_diff"] - 0.25)
        assert got["test_loss_diff"] == pytest.approx(got["test_loss"] - bf16["test_loss"])
    row = merged["summary"]["fp8-tensorwise"]
    assert row["seeds"] == [5, 6] and row["final_loss_diffs"] == [
        merged["runs"][f"fp8-tensorwise@{s}"]["final_loss_diff"] for s in (5, 6)
    ]
    other = tmp_path / "other.json"
    parity.main([*argv, "--recipes", "", "--seeds", "5,6", "--lr", "1e-3", "--out", str(other)])
    with pytest.raises(SystemExit):  # another learning rate
        parity.main([*argv, "--combine", str(fp8), "--bf16-from", str(other)])
    f32 = tmp_path / "f32.json"
    parity.main([*argv, "--recipes", "", "--experts-float32-grads", "--seeds", "5,6", "--out", str(f32)])
    with pytest.raises(SystemExit):  # float32 expert gradients in the baseline only
        parity.main([*argv, "--combine", str(fp8), "--bf16-from", str(f32)])
    before = json.loads(fp8.read_text())
    del before["args"]["fp8_experts_grads_keyed"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(before))
    with pytest.raises(SystemExit):  # FP8 results of the code before the key reached them
        parity.main([*argv, "--combine", str(old), "--bf16-from", str(base)])
    # `--no-bf16`: the FP8 runs alone, compared through --bf16-from (as if trained with them)
    alone = tmp_path / "alone.json"
    alone_out = parity.main([*argv, "--no-bf16", "--seeds", "5,6", "--out", str(alone)])
    assert list(alone_out["runs"]) == ["fp8-tensorwise@5", "fp8-tensorwise@6"] and "summary" not in alone_out
    for seed in (5, 6):  # the same runs as trained beside BF16 (CPU: deterministic)
        assert alone_out["runs"][f"fp8-tensorwise@{seed}"]["losses"] == own_losses[seed]
    later = parity.main([*argv, "--combine", str(alone), "--bf16-from", str(base)])
    assert later["summary"]["fp8-tensorwise"]["final_loss_diffs"] == row["final_loss_diffs"]
    with pytest.raises(SystemExit):  # no BF16 runs to compare with
        parity.main([*argv, "--combine", str(alone)])
    with pytest.raises(SystemExit):  # ... nor merged with newer ones
        parity.main([*argv, "--combine", str(old), str(alone)])
    one = tmp_path / "one.json"
    parity.main([*argv, "--recipes", "", "--seeds", "5", "--out", str(one)])
    with pytest.raises(SystemExit):  # no BF16 run of seed 6
        parity.main([*argv, "--combine", str(fp8), "--bf16-from", str(one)])
    with pytest.raises(SystemExit):  # only with --combine
        parity.main([*argv, "--bf16-from", str(base)])


def test_grouped_triton_sweep_picks_tiles_the_config_key_takes():
    """`fp8_gemms.best_grouped_tiles`: the least summed time over both shapes under uneven routing,
    skipping a configuration that failed at one shape, one whose result disagrees with CUTLASS,
    and one the config key refuses; the tiles in the key's form (7 integers)."""
    fg = load("fp8_gemms")
    configs = [
        (128, 128, 128, 4, 8, True),  # valid, slower
        (128, 256, 128, 3, 8, True, True),  # valid, fastest
        (64, 128, 128, 4, 4, True),  # fastest of all at up, failed at down
        (128, 128, 64, 5, 8, True),  # fast but wrong
        (32, 128, 128, 4, 4, True),  # fast, but BLOCK_M 32 is not a tile the key takes
    ]

    def shape(ms: list, rel: list) -> dict:
        res: dict = {"cutlass_ms": 2.0}
        for c, t, r in zip(configs, ms, rel):
            res[fg._grouped_label(c)] = (
                {"error": "OutOfResources"} if t is None else {"ms": t, "rel_vs_cutlass": r}
            )
        return res

    result = {
        "configs": [list(c) for c in configs],
        "up_uneven": shape([1.5, 1.2, 0.5, 0.9, 0.5], [1e-3, 1e-3, 1e-3, 0.5, 1e-3]),
        "down_uneven": shape([1.6, 1.3, None, 0.9, 0.5], [1e-3, 1e-3, 0, 0.5, 1e-3]),
        # balanced routing is reported, not used for the choice
        "up_balanced": shape([0.1] * 5, [1e-3] * 5),
    }
    # the sweep measures only tiles training can take
    from nemotron.train.fp8_config import grouped_tiles_problem

    for c in fg.GROUPED_TRITON_CONFIGS:
        assert grouped_tiles_problem([int(v) for v in c] + [0] * (7 - len(c))) is None, c
    best = fg.best_grouped_tiles(result)
    assert best == {"tiles": [128, 256, 128, 3, 8, 1, 1], "ms": 2.5, "cutlass_ms": 4.0}
    assert fg.best_grouped_tiles({**result, "configs": [list(configs[3])]}) is None  # only a wrong one


def test_train_throughput_takes_the_experts_grouped_gemm(tmp_path, monkeypatch):
    """`--fp8-experts-gemm triton --fp8-experts-tiles ...` reach `train.fp8` (emulated on CPU
    without the interpreter: no torchao needed for the experts alone); bad tiles are refused at
    the command line with the config key's words."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tt = load("train_throughput")
    args = ["--tiny", "--device", "cpu", "--seq", "32", "--micro-batch", "1", "--steps", "1", "--warmup", "0"]
    args += ["--params", "bf16", "--no-profile", "--fp8", "tensorwise", "--fp8-layers", "experts"]
    result = tt.main([*args, "--fp8-experts-gemm", "triton", "--fp8-experts-tiles", "128,256,128,3,8,1,0"])
    name = result["run"]["name"]
    assert "experts_grouped_gemm=triton experts_grouped_tiles=128,256,128,3,8,1,0" in name, name
    assert result["run"]["fp8"]["experts"] and result["run"]["fp8"]["emulated"]
    with pytest.raises(SystemExit):
        tt.parse_args([*args, "--fp8-experts-tiles", "128,256,128,3,6,1,0"])


def test_fp8_loss_parity_takes_the_experts_grouped_gemm(monkeypatch):
    """`fp8_loss_parity.py --experts-gemm triton --experts-tiles ...` reach the FP8 runs' config
    (the product that a parity check of a faster layout must train with); bad tiles are refused
    at the command line."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    parity = load("fp8_loss_parity")
    seen: list = []
    real = parity.Fp8Config

    def config(**kwargs):
        made = real(**kwargs)
        seen.append(made)
        return made

    monkeypatch.setattr(parity, "Fp8Config", config)
    argv = [
        "--tiny",
        "--device",
        "cpu",
        "--seq",
        "32",
        "--steps",
        "1",
        "--window",
        "1",
        "--eval-batches",
        "0",
    ]
    argv += ["--params", "bf16", "--fp8-layers", "experts", "--tolerance", "100"]
    result = parity.main([*argv, "--experts-gemm", "triton", "--experts-tiles", "128,256,128,3,8,1,0"])
    assert result["args"]["experts_gemm"] == "triton" and result["args"]["experts_tiles"] == [
        128,
        256,
        128,
        3,
        8,
        1,
        0,
    ]
    (fp8,) = [c for c in seen if c.enabled]
    assert fp8.experts_grouped_gemm == "triton" and fp8.experts_grouped_tiles == [128, 256, 128, 3, 8, 1, 0]
    assert "experts_gemm" in parity._SAME and "experts_tiles" in parity._SAME
    with pytest.raises(SystemExit):
        parity.main([*argv, "--experts-tiles", "128,256,128,3,6,1,0"])
