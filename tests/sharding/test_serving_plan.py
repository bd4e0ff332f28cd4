"""The serving plan (python -m sharding.plan serve): weights and KV cache per device, checked against
the arithmetic written out by hand for Llama-3-8B. Nothing here compiles a model."""

from __future__ import annotations

import pytest

from model import preset
from sharding import plan
from sharding.rules import ShardingError, rules_for

GIB = 2**30


def test_llama3_8b_bf16_tensor8_32_slots_of_8192_tokens_by_hand():
    V, D, L, H, K, Dh, F = 128256, 4096, 32, 32, 8, 128, 14336  # Llama-3-8B, untied embeddings
    # Split over tensor=8: embedding and lm_head over the vocabulary; q/o over heads, k/v over KV
    # heads, the three MLP matrices over the hidden. Replicated: 2 RMSNorm scales a layer + the final one.
    split = 2 * V * D + L * (2 * D * H * Dh + 2 * D * K * Dh + 3 * D * F)
    replicated = (2 * L + 1) * D
    assert split == 8_029_995_008 and replicated == 266_240
    weights = (split / 8 + replicated) * 2  # bfloat16
    assert weights == 2_008_031_232  # 1.87 GiB
    kv_per_slot = 2 * L * 8192 * (K // 8) * Dh * 2  # keys and values, one KV head per device, bf16
    assert kv_per_slot == 128 * 2**20
    kv = 32 * kv_per_slot
    assert kv == 4 * GIB

    got = plan.serving_plan(preset("llama3-8b"), plan.parse_mesh("tensor=8"), rules_for("fsdp_tp"),
                            dtype="bfloat16", slots=32, context=8192)
    assert (got["weights"], got["kv_cache"], got["total"]) == (weights, kv, weights + kv)
    # v5e: 16 GiB x 0.9 - 1.87 GiB of weights leaves room for floor(100.24) slots of 128 MiB
    assert plan.max_slots(got, 16) == int((16 * GIB * 0.9 - weights) // kv_per_slot) == 100


def test_slots_split_over_data_and_heads_over_tensor():
    m = preset("llama-tiny", vocab_size=256)  # 2 KV heads
    one = plan.serving_plan(m, plan.parse_mesh(""), rules_for("fsdp_tp"), dtype="float32", slots=8, context=256)
    two = plan.serving_plan(m, plan.parse_mesh("data=2,tensor=2"), rules_for("fsdp_tp"), dtype="float32",
                            slots=8, context=256)
    assert two["kv_cache"] == one["kv_cache"] / 4  # half the slots and half the KV heads per device
    assert plan.max_slots(two, 16) % 2 == 0  # whole slots on each data shard


@pytest.mark.parametrize("mesh, slots, message", [
    ("tensor=4", 8, "2 KV heads do not split over 4 devices.*divides them: 1, 2"),
    ("data=2", 3, "--slots=3 does not divide over the 2 devices"),
    ("pipeline=2", 8, "must be AXIS=N"),
])
def test_a_mesh_that_cannot_serve_the_model_is_one_clear_error(mesh, slots, message):
    with pytest.raises(ShardingError, match=message):
        plan.serving_plan(preset("llama-tiny", vocab_size=256), plan.parse_mesh(mesh), rules_for("fsdp_tp"), dtype="bfloat16",
                          slots=slots, context=128)


def test_serve_command_prints_the_plan_and_errors_in_one_line(capsys):
    assert plan.main(["serve", "llama3-8b", "--mesh", "tensor=8", "--slots", "32", "--context", "8192",
                      "--memory", "v5e"]) == 0
    out = capsys.readouterr().out
    assert "kv_cache           4.000" in out and "weights            1.870" in out and out.rstrip().endswith("100")
    assert plan.main(["serve", "llama3-8b", "--mesh", "tensor=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "8 KV heads do not split over 16 devices" in err[0]
