"""The memory planner: its bytes are the runtime's bytes (tiny model, to the byte), its Mixtral-8x7B plans
match hand-computed sizes on the four reference machines, and it refuses clearly when nothing fits."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mixoff_app.config import CacheConfig, ConfigError, EngineConfig, QuantConfig
from mixoff_app.engine import Engine
from mixoff_app.memory import device_tensor_bytes
from mixoff_app.plan import GiB, MiB, dequant_scratch, device_need, model_sizes, plan_for, reference_markdown
from mixoff_app.presets import from_name
from mixoff_app.quant import dequantize, quantize

MIXTRAL_8X7B = from_name("mixtral-8x7b")


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages made inside the block (each storage counted once, freed when it dies)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n and key not in self.seen:
                    self.seen.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)

                    def gone(key=key, n=n):
                        self.live -= n
                        self.seen.discard(key)
                    weakref.finalize(st, gone)
        return out


def test_sizes_match_the_tiny_model_to_the_byte(tiny_dir):
    quant = QuantConfig()
    eng = Engine.load(EngineConfig(model=str(tiny_dir), device="cpu", quant=quant, max_context=300,
                                   cache=CacheConfig(sizes=(3,))))
    m, cfg = eng.model, eng.model.cfg
    s = model_sizes(cfg, quant, 300, torch.float32)

    def nb(t):
        return sum(v.numel() * v.element_size() for v in t.tensors().values()) if hasattr(t, "tensors") \
            else t.numel() * t.element_size()

    tr = m.trunk
    assert s.attention == sum(nb(w) for lw in tr.layers for w in (lw.wq, lw.wk, lw.wv, lw.wo))
    assert s.embed == nb(tr.embed) and s.lm_head == nb(tr.lm_head)
    assert s.norms == nb(tr.norm) + sum(nb(lw.attn_norm) + nb(lw.ffn_norm) for lw in tr.layers)
    assert s.router == sum(nb(lw.gate) for lw in tr.layers)
    assert s.kv == nb(m.kv.data) and s.rope == nb(m.cos) + nb(m.sin)
    assert s.expert == m.cache.store.layout.nbytes == eng.info.expert_bytes
    assert s.all_experts == m.cache.store.nbytes
    assert sum(L.slots.numel() for L in m.cache.layers) == 3 * cfg.num_layers * s.expert
    # what the engine keeps on its device, measured tensor by tensor, is the planner's device need
    assert device_tensor_bytes(m) == device_need(s, "inclusive", (3,) * cfg.num_layers, cuda=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bits,group", [(2, 16), (4, 64)])
def test_dequant_scratch_formula_is_the_measured_peak(bits, group, dtype):
    from mixoff_app.config import QuantSpec
    spec = QuantSpec(bits=bits, group_size=group, scale_group=128)
    q = quantize(torch.randn(128, 64), spec)
    dequantize(q, dtype)                      # first use makes the unpacking's shift table (kept, not scratch)
    with LiveBytes() as mode:
        w = dequantize(q, dtype)
    del w
    assert mode.peak == dequant_scratch((128, 64), spec, dtype)


def test_mixtral_8x7b_sizes_by_hand():
    s = model_sizes(MIXTRAL_8X7B, QuantConfig(), 4096, torch.float16)
    # one expert matrix (14336 x 4096 at 2-bit g16): M = 3,670,016 groups
    M = 14336 * 4096 // 16
    mat = 4 * M + M + 2 * (M // 128 * 2) + M + 2 * 64        # codes, scale_q, scale_s/z, zero_q, zero_s/z (64-aligned)
    assert s.expert == 3 * mat == 66_404_736                 # 63.3 MiB; 256 experts = 15.8 GiB (17.0 GB)
    q = 4096 * 4096 // 2 + 2 * (4096 * 4096 // 64) + 2 * 2 * (4096 * 4096 // 64 // 256) + 4
    k = 1024 * 4096 // 2 + 2 * (1024 * 4096 // 64) + 2 * 2 * (1024 * 4096 // 64 // 256) + 4
    assert s.attention == 32 * (2 * q + 2 * k) == 713_359_872
    assert s.embed == s.lm_head == 32000 * 4096 * 2
    assert s.kv == 2 * 32 * 4096 * 8 * 128 * 2 == 512 * MiB
    assert s.scratch == 14336 * 4096 * 2 + 14336 * 4096     # codes in fp16 + the integer codes, a byte each


# Hand-computed plans: device cap = VRAM - 0.5 GiB context - 2% margin; fixed device bytes = trunk + KV + RoPE +
# scratch + activations (+ one staging expert when exclusive swaps); slots = floor((cap - fixed) / expert).
FIXED = 713_359_872 + 2 * 262_144_000 + 65 * 4096 * 2 + 32 * 8 * 4096 * 2 + 536_870_912 + 2 * 4096 * 128 * 2 \
    + 14336 * 4096 * 3 \
    + 512 * (2 * (10 * 4096 + 4 * 14336 + 4 * 48 * 128) + 4 * 12) + 512 * 4096 * 3 \
    + 4 * 32 * 512 * 4096 + 2 * 32 * 4096 * 128 * 2     # one 512-token prefill chunk's activations
EXPERT = 66_404_736


def hand_slots(vram_gib, staging):
    cap = int(vram_gib * GiB) - 512 * MiB
    cap -= max(128 * MiB, int(0.02 * cap))
    return min(256, (cap - FIXED - staging * EXPERT) // EXPERT)


@pytest.mark.parametrize("vram,ram,placement,slots", [
    (15.0, 12.7, "exclusive", hand_slots(15.0, 1)),     # free Colab T4: the host cannot hold all 256 experts
    (12.0, 32.0, "inclusive", hand_slots(12.0, 0)),
    (16.0, 32.0, "inclusive", hand_slots(16.0, 0)),
    (24.0, 32.0, "exclusive", 256),                     # everything fits on the GPU: no host copies
])
def test_mixtral_plans_for_the_reference_machines(vram, ram, placement, slots):
    p = plan_for(MIXTRAL_8X7B, QuantConfig(), 4096, vram_bytes=int(vram * GiB), ram_bytes=int(ram * GiB),
                 device="cuda")
    assert p.feasible, p.reason
    assert p.placement == placement and sum(p.sizes) == slots
    assert max(p.sizes) - min(p.sizes) <= 1 and min(p.sizes) >= 1
    assert p.device_total + p.context_allowance <= vram * GiB
    assert p.host_total <= ram * GiB
    if placement == "exclusive" and slots < 256:
        assert p.host_total == (256 - slots + 1) * EXPERT + 1536 * MiB
    table = p.table()
    assert placement in table and "expected misses/token" in table


def test_colab_plan_k_and_misses():
    p = plan_for(MIXTRAL_8X7B, QuantConfig(), 4096, vram_bytes=15 * GiB, ram_bytes=int(12.7 * GiB), device="cuda")
    assert sum(p.sizes) == hand_slots(15.0, 1) and max(p.sizes) - min(p.sizes) <= 1
    mixed = plan_for(MIXTRAL_8X7B, QuantConfig(), 4096, vram_bytes=12 * GiB, ram_bytes=32 * GiB, device="cuda")
    assert sorted(set(mixed.sizes)) == [4, 5]
    assert min(mixed.sizes) == 4 and mixed.k_range == "4-5" and "k=4-5 per layer" in mixed.summary()   # a mixed plan says so
    assert p.misses_per_token == pytest.approx(sum(2 * (1 - k / 8) for k in p.sizes))
    md = reference_markdown(MIXTRAL_8X7B, QuantConfig(), 4096, "mixtral-8x7b")
    assert md.count("\n") == 5 and "does not fit" not in md


def test_refusal_says_what_would_fit():
    p = plan_for(MIXTRAL_8X7B, QuantConfig(), 4096, vram_bytes=4 * GiB, ram_bytes=8 * GiB, device="cuda",
                 disk_ok=False)
    assert not p.feasible
    assert "needs at least" in p.reason and "k=1" in p.reason and "VRAM" in p.reason
    assert "--placement disk" in p.reason and "quantize" in p.reason
    p = plan_for(MIXTRAL_8X7B, QuantConfig(), 4096, vram_bytes=12 * GiB, ram_bytes=4 * GiB, device="cuda")
    assert p.feasible and p.placement == "disk"          # RAM too small for any host share: the disk tier


def test_plan_command(capsys):
    from mixoff_app.cli import main
    assert main(["plan", "--model", "mixtral-8x7b", "--vram", "15", "--ram", "12.7"]) == 0
    out = capsys.readouterr().out
    assert "plan: exclusive" in out and "expert slots" in out and "KV cache" in out
    assert main(["plan", "--model", "mixtral-8x7b", "--vram", "3", "--ram", "2"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["plan", "--model", "mixtral-8x22b", "--vram", "24", "--ram", "64"]) == 0


def test_impossible_budget_is_refused_before_allocating(tiny_dir):
    with pytest.raises(ConfigError, match="does not fit.*needs at least"):
        Engine.load(EngineConfig(model=str(tiny_dir), device="cpu", max_context=256,
                                 cache=CacheConfig(placement="inclusive"), vram_budget=100_000))


def test_cache_sizes_have_one_normal_form():
    assert CacheConfig(sizes=(3, 3, 3)) == CacheConfig(sizes=(3,))
    assert CacheConfig(sizes=(3,)).layer_sizes(4, 8) == (3, 3, 3, 3)
    assert CacheConfig(sizes=(5, 6)).sizes == (5, 6)
    assert CacheConfig().layer_sizes(2, 8) == (8, 8)            # nothing to plan against: every expert
    with pytest.raises(ConfigError, match="3 per-layer cache sizes given for 2 layers"):
        CacheConfig(sizes=(1, 2, 3)).layer_sizes(2, 8)
    with pytest.raises(ConfigError, match="between 1 and the number of experts"):
        CacheConfig(sizes=(9,)).layer_sizes(2, 8)


def test_unplanned_load_keeps_every_expert_inclusive(tiny_dir):
    """On the CPU without a budget nothing is planned: None means every expert on the device, inclusive."""
    eng = Engine.load(EngineConfig(model=str(tiny_dir), device="cpu", max_context=64))
    cfg = eng.model.cfg
    assert eng.memory_plan is None
    assert eng.model.cache.sizes == (cfg.num_experts,) * cfg.num_layers
    assert eng.info.cache == eng.config.cache == CacheConfig(sizes=(cfg.num_experts,), placement="inclusive")
