import numpy as np
import oneflow as flow

from isbi_unet.engine import InferenceGraphs
from isbi_unet.training import recompute_bn_stats
from unet import UNet


def images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1, size, size)).astype(np.float32) for _ in range(n)]


def first_bn_input(model, batch):
    """What the first BatchNorm sees for `batch`: the first convolution's output."""
    with flow.no_grad():
        return model.inc.double_conv[0](flow.tensor(batch)).numpy()


def test_statistics_are_those_of_the_chosen_whole_slices():
    flow.manual_seed(0)
    model = UNet(1, 1, width=4)
    slices = images(5)
    bn = model.inc.double_conv[1]
    assert isinstance(bn, flow.nn.BatchNorm2d)
    # count 3 of 5 picks slices 0, 2 and 4 (evenly spread), in batches of 2 and 1
    recompute_bn_stats(model, slices, count=3, batch_size=2, device=flow.device("cpu"))
    x = first_bn_input(model, np.stack([slices[i] for i in (0, 2, 4)]))
    np.testing.assert_allclose(bn.running_mean.numpy(), x.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn.running_var.numpy(), x.var(axis=(0, 2, 3)), rtol=2e-3)
    assert bn.momentum == 0.1  # restored
    # different slices give different statistics: the choice of slices is real
    before = bn.running_mean.numpy().copy()
    recompute_bn_stats(model, slices, count=2, batch_size=2, device=flow.device("cpu"))
    assert not np.allclose(before, bn.running_mean.numpy())


def test_compiled_inference_graph_sees_the_new_statistics():
    flow.manual_seed(0)
    model = UNet(1, 1, width=4)
    x = flow.tensor(images(1, seed=3)[0][None])
    graphs = InferenceGraphs(model)
    before = graphs(x).numpy()  # compiled here, with the initial running statistics
    recompute_bn_stats(model, images(4), count=4, batch_size=2, device=flow.device("cpu"))
    model.eval()
    with flow.no_grad():
        eager = model(x).numpy()
    assert not np.allclose(before, eager, atol=1e-3)
    np.testing.assert_allclose(graphs(x).numpy(), eager, rtol=1e-4, atol=1e-5)
