"""UNetModel, SoftDiceLoss and the batched augmentation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from augmentations import BatchAugmentation, affine_matrices, apply_affine, random_affine_parameters
from losses import DiceBCELoss, SoftDiceLoss, build_loss, soft_dice
from network import UNetModel, count_parameters


def test_parameter_counts_match_readme():
    assert round(count_parameters(UNetModel(base_filters=32)) / 1e6, 1) == 7.8
    assert round(count_parameters(UNetModel(base_filters=64)) / 1e6) == 31


def test_forward_shape_range_and_bad_size():
    model = UNetModel(base_filters=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 48))
    assert out.shape == (2, 1, 32, 48)
    assert out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="divisible by 16"):
        model(torch.randn(1, 3, 40, 32))


def test_channels_last_and_bf16_autocast_match_fp32():
    torch.manual_seed(0)
    model = UNetModel(base_filters=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        cl = model_cl(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, reference, atol=1e-5, rtol=1e-4)
    assert (bf16.float() - reference).abs().max() < 0.05


# --------------------------------------------------------------------------------- loss


def confident(mask: torch.Tensor) -> torch.Tensor:
    """Logits whose sigmoid is the 0/1 `mask` to float32 precision (sigmoid(+-40) = 1, 4e-18)."""
    return mask * 80.0 - 40.0


def test_soft_dice_loss_cases():
    loss = SoftDiceLoss(smooth=1.0)
    g = torch.zeros(2, 1, 16, 16)
    g[:, :, 4:12, 4:12] = 1
    assert loss(confident(g), g).item() == pytest.approx(0.0, abs=1e-6)
    zeros = torch.zeros_like(g)
    assert loss(confident(zeros), zeros).item() == pytest.approx(0.0, abs=1e-6)
    disjoint = torch.zeros_like(g)
    disjoint[:, :, :2, :2] = 1
    assert loss(confident(disjoint), g).item() > 0.98
    # per-sample average, against a hand computation: logit 0 is probability 0.5
    p = torch.full_like(g, 0.5)
    per_sample = (2 * 0.5 * 64 + 1) / (0.5 * 256 + 64 + 1)
    assert loss(torch.zeros_like(g), g).item() == pytest.approx(1 - per_sample, rel=1e-6)
    assert 1 - soft_dice(p.flatten(1), g.flatten(1), 1.0).item() == pytest.approx(1 - per_sample, rel=1e-6)


def test_soft_dice_loss_gradient_finite_and_float32_under_autocast():
    logits = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    value = SoftDiceLoss()(logits, torch.zeros(2, 1, 8, 8))
    assert value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(logits.grad.float()).all()


# -------------------------------------------------------------------------- augmentation


def test_identity_configuration_is_exact():
    images, masks = torch.randn(4, 3, 32, 32), (torch.rand(4, 1, 32, 32) > 0.5).float()
    out_images, out_masks = BatchAugmentation(0.0, 0.0, 0.0, seed=1)(images, masks)
    assert torch.equal(out_images, images) and torch.equal(out_masks, masks)


def test_flip_matches_torch_flip():
    images = torch.randn(2, 3, 16, 16)
    masks = (torch.rand(2, 1, 16, 16) > 0.5).float()
    params = {"scale": torch.ones(2), "angle": torch.zeros(2), "flip": torch.ones(2)}
    out_images, out_masks = apply_affine(images, masks, affine_matrices(params))
    torch.testing.assert_close(out_images, images.flip(-1), atol=1e-5, rtol=0)
    assert torch.equal(out_masks, masks.flip(-1))


def test_rotation_direction_matches_scipy():
    mask = torch.zeros(1, 1, 33, 33)
    mask[0, 0, 4:10, 14:19] = 1  # a block above the centre
    params = {"scale": torch.ones(1), "angle": torch.tensor([90.0]), "flip": torch.zeros(1)}
    _, rotated = apply_affine(mask.clone(), mask, affine_matrices(params))
    expected = ndimage.rotate(mask[0, 0].numpy(), 90, order=0, reshape=False)
    assert (rotated[0, 0].numpy() != expected).sum() <= 4


def test_masks_stay_binary_and_follow_the_image():
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(8, 1, 64, 64, generator=gen) > 0.7).float()
    masks = torch.from_numpy(ndimage.binary_opening(masks.numpy(), np.ones((1, 1, 5, 5)))).float()
    images = torch.cat([masks, masks, masks], dim=1) * 4.0 - 1.0  # channel == mask, background -1
    out_images, out_masks = BatchAugmentation(0.2, 30.0, 0.5, seed=3)(images, masks)
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    assert out_images.min() >= -1 - 1e-5  # fill uses the background value, not 0
    # where the bilinear image is clearly in or out, the nearest mask agrees
    inside, outside = out_images[:, :1] > 2.5, out_images[:, :1] < -0.5
    assert (out_masks[inside] == 1).all() and (out_masks[outside] == 0).all()


def test_parameters_in_range_and_deterministic():
    a = random_affine_parameters(1000, 0.05, 15.0, 0.5, torch.Generator().manual_seed(5))
    b = random_affine_parameters(1000, 0.05, 15.0, 0.5, torch.Generator().manual_seed(5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["scale"].min() >= 0.95 and a["scale"].max() <= 1.05
    assert a["angle"].abs().max() <= 15.0
    assert 0.4 < a["flip"].mean() < 0.6
    theta = affine_matrices(a)
    det = theta[:, 0, 0] * theta[:, 1, 1] - theta[:, 0, 1] * theta[:, 1, 0]
    torch.testing.assert_close(det.abs(), 1 / a["scale"] ** 2)


# ---------------------------------------------------------------- logits and mixed precision


def test_logits_and_float32_probabilities():
    torch.manual_seed(0)
    model = UNetModel(base_filters=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x, return_logits=True)
        torch.testing.assert_close(model(x), torch.sigmoid(logits))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x, return_logits=True).dtype == torch.bfloat16
            assert model(x).dtype == torch.float32  # the sigmoid runs in float32


def confident_false_positive_gradient(loss: torch.nn.Module, autocast: bool) -> torch.Tensor:
    """d loss / d (head bias) when every pixel has logit 6.5 and the truth is empty."""
    model = UNetModel(base_filters=4).train()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(6.5)  # exactly representable in bf16: every logit is 6.5
    target = torch.zeros(1, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), return_logits=True)
    loss(logits, target).backward()
    return model.head.bias.grad


@pytest.mark.parametrize("name", ["dice", "dice+bce"])
def test_bf16_keeps_the_gradient_of_a_confident_false_positive(name):
    loss = build_loss(name)
    fp32 = confident_false_positive_gradient(loss, autocast=False)
    bf16 = confident_false_positive_gradient(loss, autocast=True)
    # by hand: sigmoid'(6.5) = s (1 - s); soft Dice with empty truth: 1 - 1 / (sum p + 1)
    s = 1 / (1 + np.exp(-6.5))
    n = 32 * 32
    expected = n * s * (1 - s) / (n * s + 1) ** 2 + (s if name == "dice+bce" else 0.0)
    assert fp32.item() == pytest.approx(expected, rel=1e-4)
    assert bf16.item() == pytest.approx(expected, rel=1e-2)  # not 0: the sigmoid ran in float32


def test_sigmoid_in_bf16_would_zero_that_gradient():
    """The failure the float32 sigmoid prevents: in bf16, sigmoid(6.5) == 1.0 exactly,
    so a soft Dice taken on those probabilities has no gradient left for the logit."""
    logit = torch.tensor([6.5], dtype=torch.bfloat16, requires_grad=True)
    p = torch.sigmoid(logit)
    assert p.item() == 1.0
    (1 - soft_dice(p.float()[None], torch.zeros(1, 1), 1.0)).backward()
    assert logit.grad.item() == 0.0


def test_dice_bce_matches_a_hand_computation():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64) * 4
    target = (torch.rand(3, 1, 8, 8, generator=gen) > 0.6).double()
    p, g = torch.sigmoid(logits).numpy().reshape(3, -1), target.numpy().reshape(3, -1)
    dice = 1 - np.mean((2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1))
    bce = -np.mean(g * np.log(p) + (1 - g) * np.log(1 - p))
    from_logits = DiceBCELoss()(logits, target).item()
    # the same sum taken on float32 probabilities (how validation computed it before it took logits)
    probs, g32 = torch.sigmoid(logits.float()).flatten(1), target.float().flatten(1)
    from_probabilities = (1 - soft_dice(probs, g32, 1.0) + F.binary_cross_entropy(probs, g32)).item()
    assert from_logits == pytest.approx(dice + bce, rel=1e-6)
    assert from_probabilities == pytest.approx(dice + bce, rel=1e-5)
    assert SoftDiceLoss()(logits, target).item() == pytest.approx(dice, rel=1e-6)
