"""The flat parameter buffer and the memory layout around it: a later conversion of the
model is caught (the noise would act on a dead buffer), the epoch's order and augmentation
draws are today's stream, and channels-last keeps every weight a view of the one buffer."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import MINIMAL, generate, run_inprocess

from generator.method.noise import STORAGE_CHECK_EVERY
from generator.scriptload import arm_data, load_script

ARMS = MINIMAL.replace("[baseline, fixed]", "[baseline, fixed, full]")


def small_convnet():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    )


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    """The fixed and full arms (without and with a detector) of the minimal spec."""
    return generate(tmp_path_factory.mktemp("arms"), ARMS, "phase_detector.every=2")


@pytest.mark.parametrize("arm", ["fixed", "full"])
@pytest.mark.parametrize(
    "convert", [torch.nn.Module.half, lambda m: m.to(memory_format=torch.channels_last)]
)
def test_a_conversion_after_construction_is_caught_at_the_next_check(arms, arm, convert):
    ns = load_script(str(arms / f"train_{arm}.py"), run_name="perturbgen_test", support=True)
    model = small_convnet()
    ns["flatten_parameters"](model)
    perturbation = ns["make_perturbation"](model, 0, torch.device("cpu"), "torch")
    norm = torch.tensor(1.0)  # the gradient norm a detector samples

    def step(t):
        return perturbation.step(lambda: None, t, 0.1, 1.0, norm)

    step(0)  # a sample step and a check step: the buffer is live
    convert(model)
    step(1)  # neither
    with pytest.raises(ns["StorageReplaced"], match="flat buffer"):
        step(STORAGE_CHECK_EVERY if arm == "fixed" else 2)


@pytest.mark.parametrize("arm", ["fixed", "full"])
def test_a_run_whose_model_is_converted_late_stops_with_one_line(arms, tmp_path, arm):
    source = (arms / f"train_{arm}.py").read_text()
    (late,) = [line for line in source.splitlines(keepends=True) if "= wrap_ddp(" in line]
    # what model.half() or model.to(memory_format=...) does to each parameter, dtype kept
    script = tmp_path / f"train_{arm}.py"
    script.write_text(source.replace(late, "    model._apply(torch.clone)\n" + late))
    (support,) = arms.glob("*_support.py")
    shutil.copy(support, tmp_path)  # the script's shared module, beside it as generated
    result = run_inprocess(script, "--out", tmp_path / "run")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: the parameters no longer lie in the flat buffer")


def todays_crop_flip_batches(ns, data, order, first, batch_size, seed, epoch, rank, world):
    """The training batches as the scripts drew them per batch on the host: each batch's crop
    offsets and flips from a generator of its own, each crop cut out by slicing."""
    mean = torch.tensor(ns["NORM_MEAN"]).view(1, -1, 1, 1)
    std = torch.tensor(ns["NORM_STD"]).view(1, -1, 1, 1)
    for batch in range(first, -(-len(order) // batch_size)):
        idx = order[batch * batch_size : (batch + 1) * batch_size].tensor_split(world)[rank]
        g = torch.Generator().manual_seed(
            ns["derived_seed"](seed, "augment", epoch * 2**20 + batch)
        )
        n = len(idx)
        dy, dx = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        padded = torch.nn.functional.pad(data.x_train[idx], (4, 4, 4, 4))
        crops = [padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(n)]
        x = torch.stack([c.flip(2) if f else c for c, f in zip(crops, flip)])
        yield (x.float() / 255 - mean) / std, data.y_train[idx]


@pytest.mark.parametrize("rank, world, first", [(0, 1, 0), (0, 1, 3), (1, 2, 2)])
def test_the_epochs_order_crops_and_flips_are_todays_stream(rank, world, first):
    """Drawn once per epoch and copied up at once, the batches are still bit for bit those
    of the per-batch draws: mid-epoch (a resume) and on a DDP rank too."""
    from conftest import GENERATED

    ns = load_script(str(GENERATED / "cifar10_resnet18" / "train_baseline.py"))
    assert ns["AUGMENT"]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (90, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (90,), generator=g)
    support = ns["load_data"].__globals__  # the support module, where the data code lives
    inputs = support["Inputs"](torch.device("cpu"), ns["NORM_MEAN"], ns["NORM_STD"])
    data = support["TensorData"](
        x, y, x[:8], y[:8], inputs, rank, world, dataset="cifar10", val_size=10, crop_flip=True
    )
    order = torch.randperm(data.train_size, generator=g)
    batches = list(data.train_batches(order, first, 16, 7, 3))
    expected = list(todays_crop_flip_batches(ns, data, order, first, 16, 7, 3, rank, world))
    assert len(batches) == len(expected) == 5 - first
    for (xb, yb), (xe, ye) in zip(batches, expected):
        assert torch.equal(xb, xe) and torch.equal(yb, ye)


CONV = (
    MINIMAL.replace("shape: [8]", "shape: [3, 32, 32]")
    .replace("model: {arch: mlp, hidden: [16]}", "model: {arch: resnet18}")
    .replace("train_size: 64, val_size: 32", "train_size: 24, val_size: 8, test_size: 8")
    .replace("[baseline, fixed]", "[fixed]")
)


@pytest.fixture(scope="module")
def channels_last_fixed(tmp_path_factory):
    """The fixed arm of a ResNet-18 on small synthetic images, channels-last forced."""
    root = tmp_path_factory.mktemp("nhwc")
    return generate(root, CONV, "train.channels_last=true", "data.batch_size=8") / "train_fixed.py"


def test_channels_last_weights_are_views_of_the_flat_buffer(channels_last_fixed):
    ns = load_script(str(channels_last_fixed), run_name="perturbgen_test")
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = ns["build_model"]()
    before = [p.detach().clone() for p in model.parameters()]
    memory_format = ns["memory_format_for"](model, cpu, ns["CHANNELS_LAST"])
    assert memory_format == torch.channels_last
    ns["flatten_parameters"](model, memory_format)
    perturbation = ns["make_perturbation"](model, 0, cpu, "torch")  # checks the one buffer
    params = list(model.parameters())
    convs = [p for p in params if p.ndim == 4]
    assert len(convs) == 20
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(not p.is_contiguous() for p in convs if p.shape[2:] != (1, 1))  # not both
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # the same weights
    flat = perturbation.flat
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in params)
    perturbation.apply(0, 0.1)  # fixed eps: every weight moves, through the buffer
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    perturbation.check_storage()  # and each is still where it was put


def test_channels_last_is_auto_for_conv_nets_on_cuda_only(tmp_path):
    folder = generate(tmp_path, CONV.replace("[fixed]", "[baseline]"))
    ns = load_script(str(folder / "train_baseline.py"), run_name="perturbgen_test")
    assert ns["CHANNELS_LAST"] == "auto"
    conv, mlp = ns["build_model"](), torch.nn.Linear(3, 3)

    def pick(model, device):
        return ns["memory_format_for"](model, device, ns["CHANNELS_LAST"])

    assert pick(conv, torch.device("cpu")) == torch.preserve_format
    assert pick(conv, torch.device("cuda")) == torch.channels_last  # a device, not a tensor
    assert pick(mlp, torch.device("cuda")) == torch.preserve_format


def test_channels_last_batches_and_an_exact_resume(channels_last_fixed, tmp_path):
    ns = load_script(str(channels_last_fixed), run_name="perturbgen_test")
    data = arm_data(ns, "data", True, 0, torch.device("cpu"))
    data.inputs.memory_format = torch.channels_last
    order = torch.randperm(data.train_size)
    for x, _ in [*data.train_batches(order, 0, 8, 0, 0), *data.eval_batches("val", 8)]:
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    script = channels_last_fixed
    assert run_inprocess(script, "--out", tmp_path / "a").returncode == 0
    assert run_inprocess(script, "--out", tmp_path / "b", "--max-steps", "4").returncode == 0
    assert run_inprocess(script, "--out", tmp_path / "b", "--resume").returncode == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["state"]["step"] == 6  # 2 epochs of 3 steps; the resume mid-epoch 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["model"]["stem.0.weight"].is_contiguous(memory_format=torch.channels_last)


def test_persistent_loader_workers_see_each_epoch(tmp_path):
    """Image-folder crops are seeded by (epoch, index); the loader's workers live from pass
    to pass, so the epoch reaches them through shared memory, not a copy made at fork."""
    from test_training import image_folder_scripts, write_image_folder

    folder = image_folder_scripts(tmp_path, 2)
    write_image_folder(tmp_path / "images")
    ns = load_script(str(folder / "train_fixed.py"), run_name="perturbgen_test")
    data = arm_data(ns, tmp_path / "images", False, 0, torch.device("cpu"))
    order = torch.arange(data.train_size)
    epochs = []
    for epoch in range(3):
        loaded = torch.cat([x for x, _ in data.train_batches(order, 0, 4, 0, epoch)])
        data.train_set.epoch.fill_(epoch)  # as the workers should have seen it
        expected = torch.stack([data.train_set[i][0] for i in order.tolist()])
        assert torch.equal(loaded, data.inputs(expected)), epoch
        epochs.append(loaded)
    assert not torch.equal(epochs[0], epochs[1])  # the crops do change with the epoch
    loader = data.loader  # one loader for every split, its workers kept from pass to pass
    assert loader.persistent_workers and loader.prefetch_factor == 2
