"""Batched augmentation on the training device (GPU when there is one): the reference's training policy.

With probability ``augmentation_prob`` per image (the reference's ``dataset.py``):

1. resize to a random width R in [300, 320] (height R * aspect);
2. rotate by one of 0/90/180/270 degrees (the frame turns with the image), then by a random angle in [-10, 10];
3. centre-crop a random width C in [250, 270] (height C * aspect of the current frame);
4. shift-crop: cut 0-20 px from each of the four sides;
5. horizontal and vertical flips, each with p = 0.5;
6. colour jitter on the image only: brightness 0.2, contrast 0.2, hue 0.02;

then (every image, augmented or not) resize to ``image_size`` x ``image_size`` and normalise with mean = std = 0.5.

Steps 1-5 and the final resize are all affine, so they are composed into *one* 2x3 matrix per image and applied to the
whole batch with a single ``grid_sample`` (bilinear for images; masks are sampled bilinearly and thresholded at 0.5,
so they stay binary and follow the image exactly; label maps of several classes are sampled by nearest neighbour, so
every pixel keeps a class of its own). Image and mask share the matrix, so they move together.
Differences from the reference, on purpose: a 90-degree turn rotates the frame (the reference rotates inside an
unexpanded canvas, cutting the corners of non-square images), and the hue shift is a rotation of the chroma plane in
YIQ space (the same as an HSV hue shift to first order for these +-0.02 turns), which makes colour jitter a per-image
3x3 matrix for the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MEAN = STD = 0.5

_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


@dataclass
class AugmentConfig:
    augmentation_prob: float = 0.4
    resize_range: tuple[int, int] = (300, 320)
    rotation_range: float = 10.0
    crop_range: tuple[int, int] = (250, 270)
    shift_range: int = 20
    brightness: float = 0.2
    contrast: float = 0.2
    hue: float = 0.02


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _randint(n: int, lo: int, hi: int, g: torch.Generator) -> torch.Tensor:
    """Integers in [lo, hi] inclusive, like Python's random.randint."""
    return torch.randint(lo, hi + 1, (n,), generator=g).double()


def sample_affine(aspect: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image affine matrices (B, 2, 3) for ``F.affine_grid`` (output -> source, normalised coordinates), and the
    boolean (B,) of which images were augmented. ``aspect`` is height / width of each original image (B,).
    Parameters are drawn on the CPU from ``g`` so that runs are reproducible on any device."""
    aspect = aspect.double().cpu()
    b = aspect.numel()
    apply = torch.rand(b, generator=g, dtype=torch.float64) <= cfg.augmentation_prob
    resize_w = _randint(b, *cfg.resize_range, g)  # frame width R after step 1
    w1, h1 = resize_w, resize_w * aspect
    quarter = torch.randint(0, 4, (b,), generator=g)  # k * 90 degrees
    angle = _uniform(b, -cfg.rotation_range, cfg.rotation_range, g) * math.pi / 180
    crop_w = _randint(b, *cfg.crop_range, g)
    shifts = _randint(4 * b, 0, cfg.shift_range, g).view(4, b)  # left, top, right, bottom
    flip_x = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0).double()
    flip_y = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0).double()

    odd = quarter % 2 == 1
    frame_aspect = torch.where(odd, 1 / aspect, aspect)  # aspect of the frame after the 90-degree turn
    crop_h = crop_w * frame_aspect
    left, top, right, bottom = shifts
    out_w, out_h = crop_w - left - right, crop_h - top - bottom  # final window, in pixels of the rotated frame
    cx, cy = (left - right) / 2, (top - bottom) / 2  # its centre relative to the frame centre

    # Output normalised (xo, yo) -> rotated-frame pixels (centred): p2 = S @ [xo, yo] + c
    scale = torch.zeros(b, 2, 2, dtype=torch.float64)
    scale[:, 0, 0] = flip_x * out_w / 2
    scale[:, 1, 1] = flip_y * out_h / 2
    # Undo the small rotation and the quarter turn: p0 = R(-(k*90 + angle)) @ p2 (y axis points down in images)
    total = angle + quarter.double() * (math.pi / 2)
    cos, sin = torch.cos(total), torch.sin(total)
    rot = torch.stack((torch.stack((cos, sin), -1), torch.stack((-sin, cos), -1)), -2)
    # Resized-frame pixels (centred) -> source normalised: divide by half the frame size
    to_norm = torch.zeros(b, 2, 2, dtype=torch.float64)
    to_norm[:, 0, 0] = 2 / w1
    to_norm[:, 1, 1] = 2 / h1
    linear = to_norm @ rot @ scale
    offset = (to_norm @ rot @ torch.stack((cx, cy), -1).unsqueeze(-1)).squeeze(-1)
    theta = torch.cat((linear, offset.unsqueeze(-1)), dim=2)
    identity = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64).expand(b, 2, 3)
    theta = torch.where(apply.view(b, 1, 1), theta, identity)
    return theta.float(), apply


def sample_color(apply: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image brightness factor (B,), contrast factor (B,) and hue-rotation colour matrix (B, 3, 3)."""
    b = apply.numel()
    bright = _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, g).float()
    contrast = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, g).float()
    hue = (_uniform(b, -cfg.hue, cfg.hue, g) * 2 * math.pi).float()
    cos, sin = torch.cos(hue), torch.sin(hue)
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    matrix = _YIQ2RGB @ rot @ _RGB2YIQ
    keep = ~apply
    bright[keep], contrast[keep] = 1.0, 1.0
    matrix[keep] = torch.eye(3)
    return bright, contrast, matrix


def to_float_nchw(images_u8: torch.Tensor, masks_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, S, 3) uint8 and (B, S, S) uint8 -> (B, 3, S, S) float in [0, 1] and (B, 1, S, S) float 0/1."""
    return images_u8.permute(0, 3, 1, 2).float().div_(255), masks_u8.unsqueeze(1).float()


def train_batch(
    images_u8: torch.Tensor,
    masks_u8: torch.Tensor,
    aspect: torch.Tensor,
    image_size: int,
    cfg: AugmentConfig,
    g: torch.Generator,
    labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch on the tensors' device: normalised images (B, 3, H, W) and binary masks (B, 1, H, W), or with
    ``labels`` class indices (B, 1, H, W) (as floats)."""
    device = images_u8.device
    x, y = to_float_nchw(images_u8, masks_u8)
    b = x.shape[0]
    theta, apply = sample_affine(aspect, cfg, g)
    bright, contrast, matrix = sample_color(apply, cfg, g)
    # All per-image parameters travel in one copy, from pinned memory on a GPU, so the host never waits for the GPU
    params = torch.cat((theta.view(b, 6), bright.view(b, 1), contrast.view(b, 1), matrix.view(b, 9)), dim=1)
    if device.type == "cuda":
        params = params.pin_memory()
    params = params.to(device, non_blocking=True)
    theta, matrix = params[:, :6].reshape(b, 2, 3), params[:, 8:].reshape(b, 3, 3)
    bright, contrast = params[:, 6], params[:, 7]
    grid = F.affine_grid(theta, [b, 1, image_size, image_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if labels:
        y = F.grid_sample(y, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    else:
        y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    if bool(apply.any()):  # a CPU tensor: no device synchronisation
        x = x * bright.view(b, 1, 1, 1)
        gray_mean = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean((1, 2))
        x = (x - gray_mean.view(b, 1, 1, 1)) * contrast.view(b, 1, 1, 1) + gray_mean.view(b, 1, 1, 1)
        x = torch.einsum("bij,bjhw->bihw", matrix, x.clamp_(0, 1)).clamp_(0, 1)
    return (x - MEAN) / STD, y


def eval_images(images_u8: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, S, S) resized (antialiased) and normalised: the network input outside training."""
    x = images_u8.permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return (x - MEAN) / STD


def eval_batch(images_u8: torch.Tensor, masks_u8: torch.Tensor, image_size: int, labels: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize + normalise only (validation / test); ``labels``: class indices, resized by nearest neighbour."""
    y = masks_u8.unsqueeze(1).float()
    if labels and y.shape[-2:] != (image_size, image_size):
        y = F.interpolate(y, size=(image_size, image_size), mode="nearest-exact")
    elif y.shape[-2:] != (image_size, image_size):
        y = (F.interpolate(y, size=(image_size, image_size), mode="bilinear", antialias=True,
                           align_corners=False) > 0.5).float()
    return eval_images(images_u8, image_size), y
