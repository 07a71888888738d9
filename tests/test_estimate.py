"""estimate.py: the fake-tensor estimate of a training step against the same step run for real on
the CPU (the SD3.5-M miniature: VAE, T5, dual attention, RMS qk-norm at tiny sizes), the controls
that would catch a broken estimate (checkpointing, batch, the math attention kernel, a missing
autocast), and startup_check's verdicts."""
from contextlib import nullcontext

import pytest
import torch

import estimate as E

TOL = 0.05  # activation bytes per image: the estimate against the real run's heap growth
needs_heap = pytest.mark.skipif(E.heap_meter() is None, reason="the heap is read through glibc's mallinfo2")
CFGS = E.stage_defaults()
OPD = dict(teachers=E.TEACHERS[:2], anchor="anchor")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """(folder, real policy, fake policy, fake mode) of the miniature with 2 LoRA teachers and a
    LoRA anchor, bf16 with CUDA's autocast casts."""
    from sd35_miniature import build_sd35_miniature
    folder = tmp_path_factory.mktemp("mini")
    build_sd35_miniature(folder)
    real = E.real_policy(str(folder), t5_tokens=8, rank=8, alpha=16, **OPD)
    fake, mode = E.fake_policy(real.transformer.config, real.pipe.vae.config, real.resolution, 8,
                               real.pipe.tokenizer_max_length, 8, 16, **OPD)
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
@pytest.mark.parametrize("unit", ["opd", "sft with checkpointing"])
def test_estimate_matches_the_real_cpu_run(mini, real_run, unit):
    """One OPD step (2 teachers + anchor; no checkpointing) and one SFT step (checkpointing) at batch
    2 and 4: the fake-tensor estimate equals the same Counter on the real tensors, its weights are
    the loaded model's, its bytes per image are the real heap's within TOL, and what the heap holds
    beyond it does not grow with the batch (autograd's graph, not tensors) and is under 2 MB. The
    table's extrapolation from batch 1 and 2 gives the batch-4 estimate within 2%."""
    _, real, fake, mode = mini
    step, stage, ckpt, kw = (E.opd_step, "opd", False, OPD) if unit == "opd" else (E.sft_step, "sft", True, {})
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


def test_controls_checkpointing_batch_and_the_sft_step(mini):
    """Checkpointing holds less than not at the same batch; activations grow with the batch; SFT's
    step measures as the student phase of GRPO's update, as the table takes it."""
    _, _, policy, mode = mini
    train = {(b, ck): E.measure(policy, mode, E.grpo_train_step, b, CFGS["grpo"], ck) for b, ck in
             ((1, False), (2, False), (2, True))}
    assert train[2, True]["peak"]["student"] < 0.8 * train[2, False]["peak"]["student"]
    assert activations(train[2, False]) > 1.5 * activations(train[1, False])
    sft = E.measure(policy, mode, E.sft_step, 2, CFGS["sft"])
    assert abs(activations(sft) - train[2, False]["peak"]["student"]) <= 0.01 * activations(sft)
    assert sum(sft["flops"].values()) == train[2, False]["flops"]["student"]


@needs_heap
def test_controls_the_math_kernel_and_a_missing_autocast_are_caught(mini, real_run):
    """Forcing the math attention kernel shows up (a tokens x tokens matrix, more bytes); and an
    estimate without CUDA's autocast casts (its LoRA inputs saved in fp32) misses the real run by
    more than TOL without checkpointing: the comparison above can fail."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    _, real, fake, mode = mini
    fused = E.measure(fake, mode, E.sft_step, 2, CFGS["sft"])
    with sdpa_kernel(SDPBackend.MATH):
        math = E.measure(fake, mode, E.sft_step, 2, CFGS["sft"])
    assert fused["attention_matrices"] == 0 < math["attention_matrices"]
    assert activations(math) > activations(fused)
    fake.autocast = nullcontext  # no casts: the LoRA path in fp32, the rest in bf16
    try:
        est = {b: activations(E.measure(fake, mode, E.sft_step, b, CFGS["sft"])) for b in (2, 4)}
    finally:
        fake.autocast = lambda: E.cuda_autocast(torch.bfloat16)
    got = {b: real_run(E.sft_step, b, "sft")["heap"] for b in (2, 4)}
    assert abs((est[4] - est[2]) / (got[4] - got[2]) - 1) > TOL


def test_startup_check_fits_refuses_and_names_the_largest_batch(mini, capsys):
    from sft_coldstart import DEFAULTS
    folder = str(mini[0])
    cfg = {**DEFAULTS, "resolution": 64, "t5_tokens": 8, "lora_rank": 8, "lora_alpha": 16, "batch_size": 4}
    cost_at, _ = E.estimate_run("sft", cfg, folder)
    need = {b: cost_at(b)["peak"] for b in (1, 2, 3, 4)}
    assert need[1] < need[2] < need[3] < need[4]

    def free_for(peak):  # the free bytes at which this peak leaves just 15% to spare
        return peak / (1 - E.SPARE) + 1
    cost = E.startup_check("sft", cfg, folder, free_for(need[4]))
    assert cost["largest_batch"] >= 4 and cost["peak"] == need[4]
    assert "estimated peak" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"the largest --batch_size that fits with 15% to spare is 2 \(larger with"):
        E.startup_check("sft", cfg, folder, (free_for(need[2]) + free_for(need[3])) / 2)
    with pytest.raises(SystemExit, match="not even --batch_size 1 fits .* try --gradient_checkpointing true"):
        E.startup_check("sft", cfg, folder, free_for(need[1]) * 0.9)
    assert E.startup_check("sft", cfg, folder + "/nothing", 1e12) is None  # no config: a note, no verdict
