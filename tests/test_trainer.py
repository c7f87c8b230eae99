"""The shared trainer: loss falls, a killed run resumes to the same weights, NaN stops it cleanly."""

import pytest
import torch

from pocketdiff.distill.trainer import NonFiniteLoss, Trainer, TrainConfig


class Killed(Exception):
    pass


def _problem(seed=0):
    """A small conv net regressing a fixed random target: real gradients, real optimizer state."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    data = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.roll(data, 1, dims=-1)

    def batch_for(step):
        index = torch.randperm(64, generator=torch.Generator().manual_seed(step))[:16]
        return {"x": data[index], "y": target[index]}

    def loss_fn(batch, generator):
        noise = 0.01 * torch.randn(batch["x"].shape, generator=generator)
        return {"loss": (model(batch["x"] + noise) - batch["y"]).pow(2).mean()}

    return model, loss_fn, batch_for


def _config(**kw):
    return TrainConfig(**{"steps": 12, "lr": 1e-2, "warmup_steps": 2, "ema_decay": 0.9, "checkpoint_every": 3,
                          "log_every": 1, **kw})


def test_loss_falls(tmp_path):
    import csv

    model, loss_fn, batch_for = _problem()
    Trainer(model, loss_fn, batch_for, _config(steps=40), tmp_path).run()
    losses = [float(r["loss"]) for r in csv.DictReader((tmp_path / "log.csv").open())]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_killed_run_resumes_to_identical_weights(tmp_path):
    model, loss_fn, batch_for = _problem()
    reference = Trainer(model, loss_fn, batch_for, _config(), tmp_path / "straight").run()

    model2, loss_fn2, batch_for2 = _problem()

    def dying(step):
        if step == 7:  # killed mid-interval: steps 6 (checkpointed) and 7 are redone after resume
            raise Killed
        return batch_for2(step)

    with pytest.raises(Killed):
        Trainer(model2, loss_fn2, dying, _config(), tmp_path / "resumed").run()
    model3, loss_fn3, batch_for3 = _problem(seed=123)  # fresh process: different init, overwritten by resume
    resumed = Trainer(model3, loss_fn3, batch_for3, _config(), tmp_path / "resumed")
    assert resumed.step == 6
    resumed.run()
    for (name, a), b in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(a, b), name
    for name, a in reference.ema_state_dict().items():
        assert torch.equal(a, resumed.ema_state_dict()[name]), name


def test_nan_stops_with_message_and_keeps_checkpoint(tmp_path):
    model, loss_fn, batch_for = _problem()

    def poisoned(batch, generator):
        terms = loss_fn(batch, generator)
        return {"loss": terms["loss"] * float("nan")} if batch["step"] >= 5 else terms

    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 5; the last good checkpoint is kept"):
        Trainer(model, poisoned, lambda s: {**batch_for(s), "step": s}, _config(), tmp_path).run()
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=True)
    assert state["step"] == 3


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    from pocketdiff.errors import UserError

    model, loss_fn, batch_for = _problem()
    Trainer(model, loss_fn, batch_for, _config(steps=3), tmp_path, identity={"teacher": "a", "lr": 1}).run()
    with pytest.raises(UserError, match="holds the checkpoint of a run with other inputs or settings"):
        Trainer(model, loss_fn, batch_for, _config(steps=6), tmp_path, identity={"teacher": "a", "lr": 2})
    assert Trainer(model, loss_fn, batch_for, _config(steps=6), tmp_path, identity={"teacher": "a", "lr": 1}).step == 3


def test_tensorboard_gets_every_logged_term(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional; the test extra installs it")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, loss_fn, batch_for = _problem()
    Trainer(model, loss_fn, batch_for, _config(steps=4), tmp_path).run()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "samples_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
