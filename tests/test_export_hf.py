"""The exported module's AdaptivePerturbationTrainerCallback in a real transformers.Trainer
(its tests share one process: importing transformers is slow)."""

from __future__ import annotations

import runpy
import sys
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import GENERATED, exported_peer, load_module, readme_snippets

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

MODULE = GENERATED / "mnist1d_cnn" / "adaptive_perturbation.py"  # eps absolute, on all
FAST = {"every": 1, "window": 4, "patience": 1}  # the detector acts within a few steps


@pytest.fixture(scope="module")
def ap():
    return load_module(MODULE, "ap_hf")


class Tiny(torch.nn.Module):
    """A model in the Trainer's convention: it returns its loss when given labels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)
        )

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(160, 6, generator=g), torch.randint(3, (160,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def train(out, callback, steps, lr=1e-2, resume=None, save_steps=None):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=16,  # 10 steps an epoch
        learning_rate=lr,
        lr_scheduler_type="constant",
        logging_steps=5,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    model = Tiny()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Data(), callbacks=[callback]
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_noise_has_the_spec_std_and_is_logged(ap, tmp_path):
    before = flat(Tiny())
    trainer, model = train(tmp_path, ap.AdaptivePerturbationTrainerCallback(seed=0), 5, lr=0.0)
    # AdamW at lr 0 changes nothing: after 5 steps the change is the sum of 5 draws
    noise = flat(model) - before
    # 643 values: the sample std is within 10 % of sqrt(5) eps with probability > 0.99
    assert abs(noise.std().item() / (ap.EPS_PHASE[0] * 5**0.5) - 1) < 0.1
    logged = [h for h in trainer.state.log_history if "adaptive_perturbation/eps" in h]
    assert [h["step"] for h in logged] == [5, 5]  # the step-5 log and the run's summary
    # the eps of the fifth step (t_p = 4) in exploration
    assert logged[0]["adaptive_perturbation/eps"] == ap.EPS_PHASE[0] * math.exp(-ap.DECAY * 4)
    assert logged[0]["adaptive_perturbation/phase"] == 0.0


def test_the_peers_in_the_trainer(tmp_path):
    """gradient_noise at eta 0 trains what a run without the callback trains, bit for bit,
    and at eta > 0 something else, logging sigma_4 = sqrt(eta / 5^gamma) at step 5; anti_pgd
    at lr 0: after 5 steps theta - theta_0 = xi_5, std sigma (not sqrt(5) sigma; 643 values,
    within 10 % with probability > 0.99)."""
    plain = flat(train(tmp_path / "p", transformers.TrainerCallback(), 5)[1])
    gn = exported_peer(tmp_path, "gradient_noise", "ap_gn_hf")
    off = gn.AdaptivePerturbationTrainerCallback(seed=0, noise_eta=0.0)
    assert torch.equal(flat(train(tmp_path / "z", off, 5)[1]), plain)
    trainer, model = train(tmp_path / "g", gn.AdaptivePerturbationTrainerCallback(seed=0), 5)
    assert not torch.equal(flat(model), plain)
    logged = [h for h in trainer.state.log_history if "adaptive_perturbation/eps" in h]
    assert logged[0]["adaptive_perturbation/eps"] == math.sqrt(gn.NOISE_ETA / 5**gn.NOISE_GAMMA)
    anti = exported_peer(tmp_path, "anti_pgd", "ap_anti_hf")
    before = flat(Tiny())
    model = train(
        tmp_path / "a", anti.AdaptivePerturbationTrainerCallback(seed=0, sigma=0.01), 5, lr=0.0
    )[1]
    assert abs((flat(model) - before).std().item() / 0.01 - 1) < 0.1


def test_two_runs_are_identical_and_resume_from_a_checkpoint_continues_exactly(ap, tmp_path):
    runs = []
    for i in range(2):
        callback = ap.AdaptivePerturbationTrainerCallback(seed=0, **FAST)
        _, model = train(tmp_path / f"straight{i}", callback, 30)
        runs.append((flat(model), callback.perturb.state_dict()))
    assert torch.equal(runs[0][0], runs[1][0])
    straight, state = runs[0]
    assert state["steps"] == 30 and state["detector"]["phase_start"] > 0  # the phase changed

    out = tmp_path / "resumed"
    train(out, ap.AdaptivePerturbationTrainerCallback(seed=0, **FAST), 20, save_steps=10)
    assert (out / "checkpoint-20" / "adaptive_perturbation.pt").is_file()
    callback = ap.AdaptivePerturbationTrainerCallback(seed=0, **FAST)
    _, model = train(out, callback, 30, resume=str(out / "checkpoint-20"))
    assert torch.equal(flat(model), straight)
    assert callback.perturb.state_dict()["detector"] == state["detector"]

    (out / "checkpoint-20" / "adaptive_perturbation.pt").unlink()
    with pytest.raises(
        FileNotFoundError, match="checkpoint-20/adaptive_perturbation.pt is missing"
    ):
        train(
            out,
            ap.AdaptivePerturbationTrainerCallback(seed=0, **FAST),
            30,
            resume=str(out / "checkpoint-20"),
        )


def test_the_readme_program_runs(tmp_path, monkeypatch):
    (tmp_path / "main.py").write_text(readme_snippets("Hugging Face", "docs/export.md")[0])
    (tmp_path / "adaptive_perturbation.py").write_bytes(MODULE.read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "adaptive_perturbation", raising=False)
    ns = runpy.run_path(str(tmp_path / "main.py"), run_name="__main__")
    assert ns["trainer"].state.global_step == 12
    assert (tmp_path / "hf-run" / "checkpoint-12" / "adaptive_perturbation.pt").is_file()
