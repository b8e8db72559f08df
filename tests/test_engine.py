"""isbi_unet.engine: eager and nn.Graph training behind one interface, and what each keeps in a checkpoint."""

import numpy as np
import oneflow as flow
import pytest

from isbi_unet.engine import EagerEngine, GraphEngine
from isbi_unet.losses import SegmentationLoss
from isbi_unet.training import lr_at
from unet import UNet

STEPS = 4  # a cosine schedule over 4 steps


def make_engine(kind, lr=1e-2):
    flow.manual_seed(0)
    model = UNet(width=4)
    optimizer = flow.optim.Adam(model.parameters(), lr=lr)
    scheduler = flow.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
    engine_class = GraphEngine if kind == "graph" else EagerEngine
    return engine_class(model, SegmentationLoss("bce"), optimizer, scheduler), optimizer


def batch(seed=0):
    rng = np.random.default_rng(seed)
    image = flow.tensor(rng.normal(size=(2, 1, 32, 32)).astype(np.float32))
    return image, flow.tensor((rng.random((2, 1, 32, 32)) > 0.5).astype(np.float32))


@pytest.mark.parametrize("kind", ["eager", "graph"])
def test_a_training_step_lowers_the_loss_and_inference_gives_logits(kind):
    engine, _ = make_engine(kind)
    engine.model.train()
    losses = [float(engine.train_step(*batch()).numpy()) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    engine.model.eval()
    with flow.no_grad():
        logits = engine.infer(batch()[0])
    assert tuple(logits.shape) == (2, 1, 32, 32)
    assert (engine.name, list(engine.state_dict())) == (kind, ["graph" if kind == "graph" else "optimizer"])


def test_eager_resume_restores_adam_and_moves_the_schedule():
    engine, optimizer = make_engine("eager")
    engine.model.train()
    for _ in range(2):
        engine.train_step(*batch())
    saved = engine.state_dict()
    fresh, fresh_optimizer = make_engine("eager", lr=5e-3)
    assert fresh.load_state_dict(saved, steps_done=2, lr=5e-3) is None
    state = fresh_optimizer.state_dict()["state"]
    moments = {k: v for k, v in optimizer.state_dict()["state"].items() if k != "step"}
    assert moments and state["step"] == 2
    for key, value in moments.items():
        np.testing.assert_array_equal(state[key]["exp_avg"].numpy(), value["exp_avg"].numpy())
    # this run's lr, followed from where the checkpoint stopped
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(5e-3, "cosine", 2, STEPS))


@pytest.mark.parametrize("saved_by,loaded_by", [("eager", "graph"), ("graph", "eager")])
def test_the_other_engines_state_is_named_not_silently_dropped(saved_by, loaded_by):
    engine, _ = make_engine(saved_by)
    engine.model.train()
    engine.train_step(*batch())
    other, _ = make_engine(loaded_by)
    note = other.load_state_dict(engine.state_dict(), steps_done=1, lr=1e-2)
    assert note.startswith(f"holds {saved_by} optimizer state") and "Adam's moments" in note
