"""Meshes from config, their errors, multi-slice layout, multi-host start-up settings, rule
validation and the memory plan: everything here runs without compiling a model."""

import pytest
from flax import nnx

from model.config import preset
from model.transformer import Transformer
from sharding import plan
from sharding.mesh import device_grid, distributed_settings, make_mesh
from sharding.rules import RULE_PRESETS, ShardingError, rules_for, unused_mesh_axes, validate_state
from train.config import ConfigError, MeshConfig, load_config


def test_minus_one_takes_the_remaining_devices():
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1, "stage": 1}
    assert dict(make_mesh(MeshConfig(data=1, num_devices=1)).shape)["data"] == 1


@pytest.mark.parametrize("sizes,message", [
    (dict(data=1, fsdp=4), "has 4 positions but there are 8 devices"),
    (dict(data=-1, tensor=3), "multiply to 3, which does not divide the 8 devices"),
    (dict(data=1, num_devices=16), "num_devices=16 but only 8"),
])
def test_mesh_sizes_that_do_not_match_the_devices_are_clear_errors(sizes, message):
    with pytest.raises(ShardingError, match=message):
        make_mesh(MeshConfig(**sizes))


def test_mesh_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="at most one mesh axis may be -1"):
        load_config(None, ["mesh.fsdp=-1"])
    with pytest.raises(ConfigError, match="mesh.rules='zero' is not one of dp, fsdp, fsdp_tp, tp, fsdp_sp"):
        load_config(None, ["mesh.rules=zero"])
    with pytest.raises(ConfigError, match="n_layers=4 must be divisible by mesh.stage=3"):
        load_config(None, ["mesh.stage=3"])
    with pytest.raises(ConfigError, match="must be divisible by mesh.microbatches=5"):
        load_config(None, ["mesh.stage=2", "mesh.microbatches=5"])


class FakeTpuDevice:
    """Just what mesh_utils reads from a multislice TPU device."""

    def __init__(self, i, per_slice):
        self.id, self.slice_index, self.process_index = i, i // per_slice, i // per_slice
        self.platform = self.device_kind = "cpu"

    def __repr__(self):
        return f"dev{self.id}@slice{self.slice_index}"


def test_multislice_puts_dcn_axes_across_slices_and_ici_axes_within():
    devices = [FakeTpuDevice(i, per_slice=4) for i in range(8)]
    # data over DCN (2 slices), fsdp over ICI (4 chips per slice): each data row is one slice.
    grid = device_grid(MeshConfig(data=1, fsdp=4, dcn_data=2), devices)
    assert grid.shape == (2, 4, 1, 1, 1)
    assert [{d.slice_index for d in row.flat} for row in grid] == [{0}, {1}]
    # fsdp spans both slices (2 per slice x 2 slices); -1 fills the rest of a slice.
    grid = device_grid(MeshConfig(data=-1, fsdp=2, dcn_fsdp=2), devices)
    assert grid.shape == (2, 4, 1, 1, 1)
    assert {d.slice_index for d in grid[:, :2].flat} == {0} and {d.slice_index for d in grid[:, 2:].flat} == {1}
    with pytest.raises(ShardingError, match="3 slices, which does not divide the 8 devices"):
        device_grid(MeshConfig(data=1, fsdp=4, dcn_data=3), devices)


def test_distributed_settings_from_config_environment_or_cluster():
    assert distributed_settings(MeshConfig(), environ={}) is None  # one process: nothing to start
    explicit = MeshConfig(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    assert distributed_settings(explicit, environ={}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed_settings(MeshConfig(), environ=env) == {
        "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    # Cloud TPU VM pod slices and SLURM jobs: jax.distributed detects everything itself.
    assert distributed_settings(MeshConfig(), environ={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == {}
    assert distributed_settings(MeshConfig(), environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == {}
    assert distributed_settings(MeshConfig(), environ={"TPU_WORKER_HOSTNAMES": "t0"}) is None  # one-host TPU VM
    with pytest.raises(ShardingError, match="mesh.num_processes"):
        distributed_settings(MeshConfig(coordinator_address="h:1"), environ={})


def abstract_model(**overrides):
    cfg = preset("llama-tiny", **{**dict(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64), **overrides})

    def init():
        with nnx.use_eager_sharding(False):
            return Transformer(cfg, rngs=nnx.Rngs(0))
    return nnx.split(nnx.eval_shape(init))[1]


def test_validation_names_the_parameter_its_shape_and_the_axes():
    state = abstract_model(d_ff=62, n_kv_heads=4)
    mesh_shape = {"data": 2, "fsdp": 1, "tensor": 4, "sequence": 1, "stage": 1}
    with pytest.raises(ShardingError, match=r"blocks.mlp.w_down with shape \(4, 62, 32\).*mlp=62.*tensor=4"):
        validate_state(state, mesh_shape, rules_for("fsdp_tp"))
    validate_state(state, mesh_shape, rules_for("fsdp"))  # fsdp does not split mlp: fine
    with pytest.raises(ShardingError, match="logical axis 'embed' has no rule"):
        validate_state(state, mesh_shape, tuple((k, v) for k, v in rules_for("dp") if k != "embed"))


def test_every_preset_maps_every_logical_name_and_reports_idle_axes():
    from sharding.rules import LOGICAL_AXES

    for name, rules in RULE_PRESETS.items():
        assert [k for k, _ in rules] == list(LOGICAL_AXES), name
    assert unused_mesh_axes({"data": 2, "fsdp": 1, "tensor": 4, "sequence": 1, "stage": 1}, rules_for("dp")) == ["tensor"]


def test_plan_prints_per_device_memory_and_fit(capsys):
    cfg_args = ["experiments/quickstart.yaml", "data.tokenizer=byte", "model.vocab_size=256", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]
    assert plan.main(cfg_args + ["--devices", "8"]) == 0
    out = capsys.readouterr().out
    for row in ("params", "optimizer", "activations", "total", "TPU v5e", "H100"):
        assert row in out
    assert "fsdp=4  tensor=2" in out
    cfg = load_config(cfg_args[0], cfg_args[1:])
    one = plan.memory_plan(load_config(cfg_args[0], ["model.vocab_size=256", "mesh.data=1"]),
                           {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, "stage": 1})
    eight = plan.memory_plan(cfg, {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1, "stage": 1})
    # Every parameter of this model is split 8 ways by fsdp x tensor (norm scales only over fsdp).
    assert one["params"] / 8 <= eight["params"] <= one["params"] / 7
    assert one["params"] == cfg.model.num_params() * 4
    assert plan.main(["experiments/quickstart.yaml", "data.tokenizer=byte", "mesh.tensor=2", "--devices", "8"]) == 2  # vocab 257 / 2
    assert "vocab=257" in capsys.readouterr().err

