"""Layer 2: the render model — every decision a template would otherwise make."""

from __future__ import annotations

import math

import pytest
from conftest import MINIMAL, REPO

from generator.plan import LATER_FEATURES, plan, spec_hash
from generator.render import load_spec, pyrepr


def models_for(path, overrides=()):
    spec, doc = load_spec(path, list(overrides))
    return {m.arm: m for m in plan(spec, doc)}


def names(model):
    return [c.name for c in model.constants]


def test_arms_and_extra_baselines_in_order():
    models = models_for(REPO / "specs" / "mnist1d_cnn.yaml")
    assert list(models) == [
        "baseline",
        "fixed",
        "phase_only",
        "schedule_only",
        "full",
        "gradient_noise",
        "anti_pgd",
        "baseline_adam",
        "baseline_sgd_constant",
    ]
    assert models["baseline_adam"].kind == "baseline"
    assert models["baseline_adam"].optimizer == "adam"
    assert models["baseline_adam"].override == "optimizer"
    assert models["baseline_sgd_constant"].schedule == "constant"
    assert models["fixed"].script == "train_fixed.py"


def test_baseline_has_no_perturbation(write_spec):
    models = models_for(write_spec())
    base, fixed = models["baseline"], models["fixed"]
    assert not base.perturbs and not base.detector
    assert fixed.perturbs and not fixed.detector
    assert not {"EPS_FIXED", "APPLY_TO", "NOISE_SCALE", "KERNEL"} & set(names(base))
    assert {"EPS_FIXED", "APPLY_TO", "NOISE_SCALE", "KERNEL"} <= set(names(fixed))


def test_each_perturbing_arm_names_its_policy_file():
    """The eps(t) policy is a file of generator/method/ picked by the arm; its constructor
    keywords are constants of the arm; the detector is there iff the policy needs it."""
    models = models_for(REPO / "specs" / "mnist1d_cnn.yaml")
    expected = {
        "baseline": ("", (), False),
        "fixed": ("eps_fixed", ("eps_fixed",), False),
        "phase_only": ("eps_phase", ("eps_phase",), True),
        "schedule_only": ("eps_schedule", ("eps_base", "decay"), False),
        "full": ("eps_full", ("eps_phase", "decay"), True),
        "gradient_noise": ("eps_gradient_noise", ("noise_eta", "noise_gamma"), False),
        "anti_pgd": ("eps_anti_pgd", ("sigma",), False),
    }
    for arm, (policy, arguments, detector) in expected.items():
        m = models[arm]
        assert (m.policy, m.policy_arguments, m.detector) == (policy, arguments, detector), arm
        assert {a.upper() for a in arguments} <= set(names(m)), arm


def test_constants_follow_the_spec(write_spec):
    models = models_for(write_spec(), ["perturbation.fixed=0.02", "perturbation.scale=lr"])
    values = {c.name: c.value for c in models["fixed"].constants}
    assert values["EPS_FIXED"] == 0.02 and values["NOISE_SCALE"] == "lr"
    assert values["INPUT_SHAPE"] == (8,) and values["IN_FEATURES"] == 8
    assert values["MOMENTUM"] == 0.9 and "BETAS" not in values
    assert models["fixed"].eps_formula == "eps(t) = eps_fixed * lr_t / lr_0"
    assert models["fixed"].eps_values == "eps_fixed = 0.02"


def test_every_constant_has_a_comment():
    for model in models_for(REPO / "specs" / "mnist1d_cnn.yaml").values():
        assert all(c.comment for c in model.constants)
        assert len(set(names(model))) == len(names(model))


def test_mnist1d_shape():
    model = models_for(REPO / "specs" / "mnist1d_cnn.yaml")["baseline"]
    assert (model.input_shape, model.num_classes) == ((1, 40), 10)


def test_pyrepr_refuses_what_python_source_cannot_hold():
    assert pyrepr((1,)) == "(1,)"
    assert pyrepr({"a": [1.5, None, True]}) == "{'a': [1.5, None, True]}"
    assert pyrepr('x"""\n') == repr('x"""\n')
    for bad in (math.inf, math.nan, object()):
        with pytest.raises(Exception, match="non-finite|cannot emit"):
            pyrepr(bad)


@pytest.mark.parametrize(
    "spec, sizes",
    [
        ("mnist1d_cnn", {"VAL_SIZE": 500}),
        ("cifar10_resnet18", {"VAL_SIZE": 5000}),
        ("imagenet100_efficientnet_b0", {"VAL_SIZE": None}),  # a tenth, counted at run time
        ("synthetic_mlp", {"TRAIN_SIZE": 2048, "VAL_SIZE": 512, "TEST_SIZE": 256}),
    ],
)
def test_split_sizes_reach_every_arm(spec, sizes):
    for model in models_for(REPO / "specs" / f"{spec}.yaml").values():
        values = {c.name: c.value for c in model.constants}
        assert {k: values.get(k) for k in sizes} == sizes, model.arm
        assert ("TEST_SIZE" in values) is (spec == "synthetic_mlp")


ON = {  # a value that turns each later feature on
    "train.clip_grad_norm": "1.0",
    "train.accumulate": "2",
    "train.label_smoothing": "0.1",
    "train.ema": "{decay: 0.9}",
    "train.early_stop": "{patience: 2}",
    "train.loggers": "[tensorboard]",
    "train.check_every": "10",
    "train.channels_last": "true",
    "optimizer.no_decay": "[bias]",
    "perturbation.gradient_noise": "{eta: 0.3}",
    "perturbation.anti_pgd": "{sigma: 0.01}",
}


def test_features_that_are_off_are_out_of_the_spec_hash(write_spec):
    """A spec that does not use issue 19's features keeps the hash it had before they
    existed (golden record, run folders), whether it omits them or writes them off; turning
    one on changes the hash."""
    path = write_spec(MINIMAL)
    plain = spec_hash(load_spec(path)[0])
    off = [
        f"{s}.{k}={'null' if v is None else v}"
        for s, f in LATER_FEATURES.items()
        for k, v in f.items()
    ] + ["train.log_every=3"]
    assert spec_hash(load_spec(path, off)[0]) == plain
    assert sorted(ON) == sorted(f"{s}.{k}" for s, f in LATER_FEATURES.items() for k in f)
    for key, value in ON.items():
        assert spec_hash(load_spec(path, [f"{key}={value}"])[0]) != plain, key


def test_every_variant_has_its_own_template_file():
    """Architectures, datasets and eps policies are files picked by a render-model field
    (arch, data_source, policy), not branches of a chain: each one the spec allows has one."""
    import typing

    from generator.method import HERE as METHOD, POLICIES
    from generator.render import templates_dir
    from generator.spec import Data, Model

    def literals(union, field):
        members = typing.get_args(typing.get_args(union)[0])
        return {typing.get_args(m.model_fields[field].annotation)[0] for m in members}

    templates = templates_dir()
    for arch in literals(Model, "arch"):
        assert (templates / "model" / f"{arch}.py.jinja").is_file(), arch
    for dataset in literals(Data, "dataset"):
        source = "cifar" if dataset.startswith("cifar") else dataset
        assert (templates / "data" / f"{source}.py.jinja").is_file(), dataset
    for module in POLICIES.values():
        assert (METHOD / f"{module}.py").is_file(), module


@pytest.mark.parametrize(
    "spec, arguments",
    [
        ("mnist1d_cnn", ("val_size",)),
        ("cifar10_resnet18", ("val_size", "augment", "norm_mean", "norm_std")),
        (
            "imagenet100_efficientnet_b0",
            ("val_size", "image_size", "workers", "augment", "norm_mean", "norm_std"),
        ),
        ("synthetic_mlp", ("train_size", "val_size", "test_size", "synthetic_noise")),
        ("custom_stripes", ("data_factory", "data_args", "workers", "val_size")),
    ],
)
def test_each_arm_passes_its_data_constants_to_load_data(spec, arguments):
    """load_data's keywords in an arm's call are its data constants, lower case (DATA_ROOT
    is --data-root's default, passed as the root): the support module reads no constant."""
    for model in models_for(REPO / "specs" / f"{spec}.yaml").values():
        expected = ("dataset", "input_shape", "num_classes", *arguments)
        assert model.data_arguments == expected, model.arm
        assert {a.upper() for a in expected} <= set(names(model)), model.arm


def test_the_support_module_holds_each_dataset_of_the_arms_once(write_spec):
    """Arms that read different data (today's checks allow only batch_size, augment and
    workers to differ): load_data dispatches to each source, and the standard-library
    modules are those the sources need."""
    from dataclasses import replace

    from generator.plan import support_model

    models = plan(*load_spec(write_spec(MINIMAL)))
    alone = support_model(models)
    assert alone.datasets == (("synthetic", "synthetic"),)
    assert "pickle" not in alone.stdlib_imports and "json" in alone.stdlib_imports
    mixed = support_model([models[0], replace(models[1], dataset="cifar10")])
    assert mixed.datasets == (("cifar10", "cifar"), ("synthetic", "synthetic"))
    assert "pickle" in mixed.stdlib_imports and "random" not in mixed.stdlib_imports
