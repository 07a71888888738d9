"""estimate.py: the fake-tensor estimate of a training step against the same step run for real on
the CPU (the SD3.5-M miniature: VAE, T5, dual attention, RMS qk-norm at tiny sizes), the controls
that would catch a broken estimate (checkpointing, batch, the math attention kernel, a missing
autocast), startup_check's verdicts, and that estimate.py imports no stage."""
import ast
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import estimate as E
import opd_distill
import sft_coldstart
import teacher_grpo

TOL = 0.05  # activation bytes per image: the estimate against the real run's heap growth
needs_heap = pytest.mark.skipif(E.heap_meter() is None, reason="the heap is read through glibc's mallinfo2")
# the stages' code the estimate runs, passed in (estimate.py imports no stage: the stages import it)
STAGES = {"opd": (opd_distill.DEFAULTS, opd_distill.distill_micro_batch),
          "grpo": (teacher_grpo.DEFAULTS, teacher_grpo.step_loss),
          "sft": (sft_coldstart.DEFAULTS, sft_coldstart.flow_matching_loss)}
CFGS = E.stage_defaults(STAGES)
OPD = dict(distill=opd_distill.distill_micro_batch, teachers=E.TEACHERS[:2], anchor="anchor")
SFT = dict(loss=sft_coldstart.flow_matching_loss)
TRAIN = dict(step_loss=teacher_grpo.step_loss)
REPO = Path(__file__).resolve().parents[1]
STAGE_MODULES = ["teacher_grpo", "merge_coldstart", "sft_coldstart", "opd_distill", "eval"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """(folder, real policy, fake policy, fake mode) of the miniature with 2 LoRA teachers and a
    LoRA anchor, bf16 with CUDA's autocast casts."""
    from tools.sd35_miniature import build_sd35_miniature
    folder = tmp_path_factory.mktemp("mini")
    build_sd35_miniature(folder)
    real = E.real_policy(str(folder), t5_tokens=8, rank=8, alpha=16, teachers=E.TEACHERS[:2], anchor="anchor")
    fake, mode = E.fake_policy(real.transformer.config, real.pipe.vae.config, real.resolution, 8,
                               real.pipe.tokenizer_max_length, 8, 16, teachers=E.TEACHERS[:2], anchor="anchor")
    return folder, real, fake, mode


@pytest.fixture(scope="module")
def real_run(mini):
    """The real run of a step at a batch, measured once per module (with its heap growth)."""
    _, real, _, _ = mini
    done = {}

    def run(step, b, stage, ckpt=False, **kw):
        key = (step, b, ckpt)
        if key not in done:
            done[key] = E.measure(real, None, step, b, CFGS[stage], ckpt, heap=E.heap_meter(), **kw)
        return done[key]
    return run


def activations(m):
    return max(m["peak"].values())


def test_counter_counts_live_storages_once_and_their_peak():
    w = torch.ones(8, 16)
    with E.Counter(known=[w]) as c:
        w.t()                             # a view of a known tensor: nothing new
        a = torch.empty(1000)             # 4,000 bytes
        b = a + 1                         # 8,000 live
        a[:10]                            # a view: no new storage
        del a                             # 4,000 live, the peak stays
        torch.nn.functional.linear(torch.ones(4, 16), w)   # 2 x 4 x 16 x 8 FLOPs, freed at once
    assert c.peak["other"] == 8000 and c.live == 4000
    assert c.flops["other"] == 2 * 4 * 16 * 8
    del b


def test_flops_agree_with_flop_counter_mode(mini):
    """The Counter's FLOPs of a real OPD step are FlopCounterMode's (told the CPU attention kernel)."""
    from torch.utils.flop_counter import FlopCounterMode, flop_registry
    _, real, _, _ = mini
    cpu_attention = {op: f.__wrapped__ for op, f in E._flop_formulas().items() if op not in flop_registry}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as fc:
        m = E.measure(real, None, E.opd_step, 2, CFGS["opd"], **OPD)
    assert sum(m["flops"].values()) == fc.get_total_flops() > 0


@needs_heap
@pytest.mark.slow  # 6-60 s a unit of real CPU runs: .ci/run runs them after the README's command
@pytest.mark.parametrize("unit", ["opd", "sft with checkpointing"])
def test_estimate_matches_the_real_cpu_run(mini, real_run, unit):
    """One OPD step (2 teachers + anchor; no checkpointing) and one SFT step (checkpointing) at batch
    2 and 4: the fake-tensor estimate equals the same Counter on the real tensors, its weights are
    the loaded model's, its bytes per image are the real heap's within TOL, and what the heap holds
    beyond it does not grow with the batch (autograd's graph, not tensors) and is under 2 MB. The
    table's extrapolation from batch 1 and 2 gives the batch-4 estimate within 2%."""
    _, real, fake, mode = mini
    step, stage, ckpt, kw = (E.opd_step, "opd", False, OPD) if unit == "opd" else (E.sft_step, "sft", True, SFT)
    assert E.weights_bytes(fake, E.TEACHERS[:2], "anchor", vae=True) == \
        E.storage_bytes([real.transformer, real.pipe.vae]) - E.trainable_bytes(real) // 5
    est = {b: E.measure(fake, mode, step, b, CFGS[stage], ckpt, **kw) for b in (1, 2, 4)}
    got = {b: real_run(step, b, stage, ckpt, **kw) for b in (2, 4)}
    for b in (2, 4):
        assert abs(activations(est[b]) - activations(got[b])) <= 0.01 * activations(got[b])
    per_image = (activations(est[4]) - activations(est[2])) / (got[4]["heap"] - got[2]["heap"]) - 1
    assert abs(per_image) < TOL, per_image
    assert 0 <= got[2]["heap"] - activations(est[2]) < 2e6
    line = E.activation_bytes({unit: (est[1], est[2])}, 4, CFGS[stage])
    assert abs(line - activations(est[4])) <= 0.02 * activations(est[4])


@pytest.mark.slow  # 4 s: .ci/run runs it after the README's command
def test_controls_checkpointing_batch_and_the_sft_step(mini):
    """Checkpointing holds less than not at the same batch; activations grow with the batch; SFT's
    step measures as the student phase of GRPO's update, as the table takes it."""
    _, _, policy, mode = mini
    train = {(b, ck): E.measure(policy, mode, E.grpo_train_step, b, CFGS["grpo"], ck, **TRAIN) for b, ck in
             ((1, False), (2, False), (2, True))}
    assert train[2, True]["peak"]["student"] < 0.8 * train[2, False]["peak"]["student"]
    assert activations(train[2, False]) > 1.5 * activations(train[1, False])
    sft = E.measure(policy, mode, E.sft_step, 2, CFGS["sft"], **SFT)
    assert abs(activations(sft) - train[2, False]["peak"]["student"]) <= 0.01 * activations(sft)
    assert sum(sft["flops"].values()) == train[2, False]["flops"]["student"]


@pytest.mark.slow  # 4 s: .ci/run runs it after the README's command
@needs_heap
def test_controls_the_math_kernel_and_a_missing_autocast_are_caught(mini, real_run):
    """Forcing the math attention kernel shows up (a tokens x tokens matrix, more bytes); and an
    estimate without CUDA's autocast casts (its LoRA inputs saved in fp32) misses the real run by
    more than TOL without checkpointing: the comparison above can fail."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    _, real, fake, mode = mini
    fused = E.measure(fake, mode, E.sft_step, 2, CFGS["sft"], **SFT)
    with sdpa_kernel(SDPBackend.MATH):
        math = E.measure(fake, mode, E.sft_step, 2, CFGS["sft"], **SFT)
    assert fused["attention_matrices"] == 0 < math["attention_matrices"]
    assert activations(math) > activations(fused)
    fake.autocast = nullcontext  # no casts: the LoRA path in fp32, the rest in bf16
    try:
        est = {b: activations(E.measure(fake, mode, E.sft_step, b, CFGS["sft"], **SFT)) for b in (2, 4)}
    finally:
        fake.autocast = lambda: E.cuda_autocast(torch.bfloat16)
    got = {b: real_run(E.sft_step, b, "sft", **SFT)["heap"] for b in (2, 4)}
    assert abs((est[4] - est[2]) / (got[4] - got[2]) - 1) > TOL


@pytest.mark.slow  # 4 s: .ci/run runs it after the README's command (tests/test_scale.py checks a stage refuses)
def test_startup_check_fits_refuses_and_names_the_largest_batch(mini, capsys):
    folder, loss = str(mini[0]), sft_coldstart.flow_matching_loss
    cfg = {**sft_coldstart.DEFAULTS, "resolution": 64, "t5_tokens": 8, "lora_rank": 8, "lora_alpha": 16,
           "batch_size": 4}
    cost_at, _ = E.estimate_run("sft", cfg, folder, loss)
    need = {b: cost_at(b)["peak"] for b in (1, 2, 3, 4)}
    assert need[1] < need[2] < need[3] < need[4]

    def free_for(peak):  # the free bytes at which this peak leaves just 15% to spare
        return peak / (1 - E.SPARE) + 1
    cost = E.startup_check("sft", cfg, folder, free_for(need[4]), loss)
    assert cost["largest_batch"] >= 4 and cost["peak"] == need[4]
    assert "estimated peak" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"the largest --batch_size that fits with 15% to spare is 2 \(larger with"):
        E.startup_check("sft", cfg, folder, (free_for(need[2]) + free_for(need[3])) / 2, loss)
    with pytest.raises(SystemExit, match="not even --batch_size 1 fits .* try --gradient_checkpointing true"):
        E.startup_check("sft", cfg, folder, free_for(need[1]) * 0.9, loss)
    assert E.startup_check("sft", cfg, folder + "/nothing", 1e12, loss) is None  # no config: a note, no verdict


def test_startup_check_lets_a_run_go_on_when_the_estimator_fails(mini):
    """An unexpected error inside the estimate is one note, not the end of the training run; the
    SystemExit that refuses a run still comes through."""
    def broken(*args):
        raise RuntimeError("no such op\nsecond line")
    cfg = {**sft_coldstart.DEFAULTS, "resolution": 64, "t5_tokens": 8, "lora_rank": 8, "lora_alpha": 16}
    notes = []
    assert E.startup_check("sft", cfg, str(mini[0]), 1e12, broken, log=notes.append) is None
    assert notes == ["note: no memory estimate (RuntimeError: no such op)"]
    with pytest.raises(SystemExit):
        E.startup_check("sft", cfg, str(mini[0]), 1, sft_coldstart.flow_matching_loss, log=notes.append)


def imported_modules(source):
    """Top-level names of every module the source imports, at any depth (inside functions too), and
    of importlib.import_module("...") / __import__("...") calls with a literal name."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value).split(".")[0])
    return found


def test_estimate_imports_no_stage():
    """The layout rule: the stages import estimate.py (startup_check), so it must import none of
    them, not even lazily. The controls: the checker sees bench.py's import of opd_distill (inside
    an `if`), and stage imports inside a function."""
    assert imported_modules((REPO / "estimate.py").read_text()) & set(STAGE_MODULES) == set()
    assert "opd_distill" in imported_modules((REPO / "tools" / "bench.py").read_text())
    nested = "def f():\n    from teacher_grpo import step_loss\n    importlib.import_module('eval')\n"
    assert imported_modules(nested) == {"teacher_grpo", "eval"}


def test_cfg_free_student_halves_the_student_phase(mini):
    """A CFG-free student (--student_guidance 1) runs its forward and backward without the
    unconditional half: half the student phase's FLOPs and activations; the labels are unchanged."""
    _, _, policy, mode = mini
    guided = E.measure(policy, mode, E.opd_step, 2, CFGS["opd"], **OPD)
    free = E.measure(policy, mode, E.opd_step, 2, {**CFGS["opd"], "student_guidance": 1.0}, **OPD)
    assert free["flops"]["labels"] == guided["flops"]["labels"] > 0
    assert 0.45 < free["flops"]["student"] / guided["flops"]["student"] < 0.55
    assert free["peak"]["student"] < 0.65 * guided["peak"]["student"]
