import oneflow as flow
import pytest

from unet import UNet


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("size", [(16, 16), (48, 48), (37, 45)])
def test_output_matches_input_size(bilinear, size):
    net = UNet(n_channels=1, n_classes=1, bilinear=bilinear, width=4).eval()
    with flow.no_grad():
        y = net(flow.randn(2, 1, *size))
    assert tuple(y.shape) == (2, 1, *size)


@pytest.mark.parametrize("bilinear", [False, True])
def test_backward_reaches_every_parameter(bilinear):
    net = UNet(n_channels=1, n_classes=2, bilinear=bilinear, width=4)
    net(flow.randn(1, 1, 32, 32)).sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.parameters())


def test_width_scales_channels_and_config_round_trips():
    net = UNet(n_channels=1, n_classes=1, bilinear=True, width=8)
    assert net.inc.double_conv[0].out_channels == 8
    assert net.down4.maxpool_conv[1].double_conv[3].out_channels == 64  # 16 * 8 // 2 with bilinear
    again = UNet(**net.config())
    assert again.config() == net.config()
    assert [p.shape for p in again.parameters()] == [p.shape for p in net.parameters()]


def test_paper_width_has_expected_parameter_count():
    # 31.0 M parameters: the 23-conv U-Net of the paper with padding, BatchNorm and no conv biases.
    n = sum(p.numel() for p in UNet(1, 1, width=64).parameters())
    assert 30_900_000 < n < 31_100_000


def test_upconv_equals_transposed_convolution():
    from unet import UpConv2x2

    up = UpConv2x2(6, 3)
    ref = flow.nn.ConvTranspose2d(6, 3, kernel_size=2, stride=2)
    ref.load_state_dict(up.state_dict())  # same parameter names and shapes as the article's layer
    x = flow.randn(2, 6, 5, 7)
    assert tuple(up(x).shape) == (2, 3, 10, 14)
    assert float((up(x) - ref(x)).abs().max()) < 1e-5
