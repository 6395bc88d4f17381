"""The scripts' GPU set-up, the same in every arm: backend switches, fused optimizers, DDP
settings and where torch.compile goes. Static checks of every emitted script, the render
model's static_graph, and the set-up functions run on the CPU (gloo for DDP)."""

from __future__ import annotations

import ast

import pytest
import torch
import torch.distributed as dist
from conftest import GENERATED, MINIMAL, REPO, SCRIPTS, generate

from generator.plan import plan
from generator.render import load_spec
from generator.scriptload import load_script

ids = [p.relative_to(GENERATED).as_posix() for p in SCRIPTS]


def function(tree, name):
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    return node


def calls(node, name):
    """Calls in `node` to a function whose dotted name ends in `name`."""
    return [
        n
        for n in ast.walk(node)
        if isinstance(n, ast.Call) and ast.unparse(n.func).split(".")[-1] == name
    ]


def keywords(call):
    return {k.arg: ast.unparse(k.value) for k in call.keywords}


@pytest.mark.parametrize("script", SCRIPTS, ids=ids)
def test_every_arm_sets_up_the_gpu_alike(script):
    tree = ast.parse(script.read_text())
    optimizers = [
        c
        for name in ("SGD", "Adam", "AdamW")
        for c in calls(function(tree, "build_optimizer"), name)
    ]
    assert len(optimizers) == 1 and keywords(optimizers[0])["fused"] == "fused"
    assert "fused = next(model.parameters()).is_cuda" in ast.unparse(
        function(tree, "build_optimizer")
    )
    main = ast.unparse(function(tree, "main"))
    assert "with training_process(args.device, out, DETERMINISTIC" in main
    # the process set-up and DDP's wrapper are shared: the folder's support module holds
    # them, the arm holds none
    (support,) = script.parent.glob("*_support.py")
    shared = ast.parse(support.read_text())
    process = ast.unparse(function(shared, "training_process"))
    assert "setup_distributed(device_name)\n    use_fast_cuda_kernels(device, deterministic)" in process
    (ddp,) = calls(function(shared, "wrap_ddp"), "DistributedDataParallel")
    settings = keywords(ddp)
    assert settings["gradient_as_bucket_view"] == "True"
    assert "ddp.broadcast_buffers = running_stats" in ast.unparse(function(shared, "wrap_ddp"))
    assert settings["static_graph"] == "static_graph"  # each arm says, see below
    assert not calls(shared, "DistributedDataParallel")[1:]  # wrap_ddp is the only wrapper
    assert not calls(tree, "DistributedDataParallel")
    train = ast.unparse(function(tree, "train"))
    assert any(
        f"forward = wrap_ddp(model, device, static_graph={graph}) if world > 1 else model" in train
        for graph in ("True", "False")
    )


def render_models(path, *overrides):
    spec, doc = load_spec(path, list(overrides))
    return plan(spec, doc)


@pytest.mark.parametrize(
    ("spec", "overrides", "static"),
    [
        ("mnist1d_cnn.yaml", (), True),
        ("cifar10_resnet18.yaml", (), True),
        ("mnist1d_cnn.yaml", ("train.accumulate=2",), False),
        ("mnist1d_cnn.yaml", ("train.compile=true",), False),
        ("custom_stripes.yaml", (), False),
    ],
)
def test_static_graph_only_where_the_graph_is_known(spec, overrides, static):
    models = render_models(REPO / "specs" / spec, *overrides)
    assert {m.static_graph for m in models} == {static}


def test_compile_comes_before_ddp_and_keeps_the_names(tmp_path):
    """PyTorch's advice: compile the module in place, then let DDP wrap it (torch.compile
    of the DDP wrapper traces DDP itself); the checkpoint's names stay the model's own."""
    folder = generate(tmp_path, MINIMAL, "train.compile=true")
    train = ast.unparse(function(ast.parse((folder / "train_fixed.py").read_text()), "train"))
    assert not calls(ast.parse(train), "compile")[1:]
    assert train.index("model.compile()") < train.index("forward = wrap_ddp(model, device")


def namespace(script):
    return load_script(str(script), run_name="perturbgen_test")


@pytest.fixture
def backend_state():
    """Put the process-wide switches back as they were."""
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
    )
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[1:]


@pytest.mark.parametrize("deterministic", [False, True])
def test_fast_cuda_kernels_on_a_gpu_only(deterministic, backend_state, tmp_path):
    folder = generate(tmp_path, MINIMAL, f"train.deterministic={str(deterministic).lower()}")
    ns = load_script(str(folder / "train_fixed.py"), support=True)

    def use_fast_cuda_kernels(device):
        ns["use_fast_cuda_kernels"](device, ns["DETERMINISTIC"])

    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = False
    use_fast_cuda_kernels(torch.device("cpu"))  # the CPU is left alone: the golden bits
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cudnn.benchmark is False
    use_fast_cuda_kernels(torch.device("cuda", 1))  # switches only: no CUDA call is made
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cudnn.allow_tf32 is True
    assert torch.backends.cudnn.benchmark is (not deterministic)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_the_cpu_keeps_the_unfused_optimizer(optimizer, tmp_path):
    folder = generate(tmp_path, MINIMAL, f"optimizer={{name: {optimizer}, lr: 0.01}}")
    ns = namespace(folder / "train_baseline.py")
    assert ns["build_optimizer"](ns["build_model"]()).defaults["fused"] is False


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("spec", "running_stats"), [("cifar10_resnet18", True), ("mnist1d_cnn", False)]
)
def test_ddp_broadcasts_buffers_only_for_running_statistics(spec, running_stats, one_rank_group):
    ns = namespace(GENERATED / spec / "train_baseline.py")
    model = ns["build_model"]()
    ddp = ns["wrap_ddp"](model, torch.device("cpu"), static_graph=True)
    assert ddp.broadcast_buffers is running_stats
    assert ddp.gradient_as_bucket_view and ddp.static_graph
