"""The exported module's AdaptivePerturbationCallback in a real lightning.pytorch.Trainer."""

from __future__ import annotations

import runpy
import sys
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import GENERATED, exported_peer, load_module, readme_snippets

L = pytest.importorskip("lightning.pytorch")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

MODULE = GENERATED / "mnist1d_cnn" / "adaptive_perturbation.py"  # eps absolute, on all
FAST = {"every": 1, "window": 4, "patience": 1}  # the detector acts within a few steps


@pytest.fixture(scope="module")
def ap():
    return load_module(MODULE, "ap_lightning")


class Tiny(L.LightningModule):
    def __init__(self, lr=0.05, momentum=0.9):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)
        )
        self.lr, self.momentum = lr, momentum

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def loader():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(160, 6, generator=g), torch.randint(3, (160,), generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=16)  # 10 steps an epoch, no shuffle


def fit(callback, epochs, model=None, ckpt_path=None, **trainer_args):
    model = model or Tiny()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback, *trainer_args.pop("callbacks", [])],
        **trainer_args,
    )
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer, model


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_noise_has_the_spec_std_and_is_logged(ap):
    model = Tiny(lr=0.0, momentum=0.0)  # the optimizer step changes nothing: only the noise
    before = flat(model)
    trainer, _ = fit(
        ap.AdaptivePerturbationCallback(seed=0), 1, model, max_steps=1, enable_checkpointing=False
    )
    noise = flat(model) - before
    # 643 values: the sample std is within 10 % of eps with probability > 0.99
    assert abs(noise.std().item() / ap.EPS_PHASE[0] - 1) < 0.1
    assert trainer.callback_metrics["adaptive_perturbation/eps"].item() == pytest.approx(
        ap.EPS_PHASE[0]
    )
    assert trainer.callback_metrics["adaptive_perturbation/phase"].item() == 0.0


def test_two_runs_are_identical_and_resume_from_a_checkpoint_continues_exactly(ap, tmp_path):
    runs = []
    for _ in range(2):
        callback = ap.AdaptivePerturbationCallback(seed=0, **FAST)
        _, model = fit(callback, 3, enable_checkpointing=False)
        runs.append((flat(model), callback.perturb.state_dict()))
    assert torch.equal(runs[0][0], runs[1][0])
    straight, state = runs[0]
    assert state["steps"] == 30 and state["detector"]["phase_start"] > 0  # the phase changed

    saver = L.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    fit(ap.AdaptivePerturbationCallback(seed=0, **FAST), 2, callbacks=[saver])
    (ckpt,) = tmp_path.glob("epoch=1-step=20*.ckpt")
    callback = ap.AdaptivePerturbationCallback(seed=0, **FAST)
    _, model = fit(callback, 3, ckpt_path=ckpt, enable_checkpointing=False)
    assert torch.equal(flat(model), straight)
    assert callback.perturb.state_dict()["detector"] == state["detector"]


def test_the_peers_noise_lands_where_their_papers_put_it(tmp_path):
    """gradient_noise inside Lightning's optimizer.step(closure): the noise reaches the update
    after the closure's backward (one SGD step at lr 1 without momentum moves theta by
    -(g + sigma_0 xi), so against a run without noise the change is -sigma_0 xi);
    anti_pgd at lr 0: after 3 steps theta - theta_0 = xi_3, std sigma (not sqrt(3) sigma).
    643 values: a sample std is within 10 % of its sigma with probability > 0.99."""
    ONE = {"max_steps": 1, "enable_checkpointing": False}
    plain = flat(fit(L.Callback(), 1, Tiny(lr=1.0, momentum=0.0), **ONE)[1])
    gn = exported_peer(tmp_path, "gradient_noise", "ap_gn_lightning")
    callback = gn.AdaptivePerturbationCallback(seed=0, noise_eta=0.01)
    noisy = flat(fit(callback, 1, Tiny(lr=1.0, momentum=0.0), **ONE)[1])
    assert callback.perturb.eps == 0.1 and abs((noisy - plain).std().item() / 0.1 - 1) < 0.1
    anti = exported_peer(tmp_path, "anti_pgd", "ap_anti_lightning")
    model = Tiny(lr=0.0, momentum=0.0)
    before = flat(model)
    fit(
        anti.AdaptivePerturbationCallback(seed=0, sigma=0.01),
        1,
        model,
        max_steps=3,
        enable_checkpointing=False,
    )
    assert abs((flat(model) - before).std().item() / 0.01 - 1) < 0.1


def test_the_callback_refuses_a_bad_keyword_at_once(ap):
    with pytest.raises(TypeError, match="unknown setting.s. windw"):
        ap.AdaptivePerturbationCallback(windw=3)


def test_the_readme_program_runs(tmp_path, monkeypatch):
    (tmp_path / "main.py").write_text(readme_snippets("Lightning", "docs/export.md")[0])
    (tmp_path / "adaptive_perturbation.py").write_bytes(MODULE.read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "adaptive_perturbation", raising=False)
    ns = runpy.run_path(str(tmp_path / "main.py"), run_name="__main__")
    assert ns["trainer"].global_step == 12
    assert "adaptive_perturbation/eps" in ns["trainer"].callback_metrics
