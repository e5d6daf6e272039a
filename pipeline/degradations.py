"""Forward operators of the tasks behind one interface (experiments spec, "Tasks" table).

Each task turns the clean image ``x`` into a frozen observation ``y = A(x)`` (:meth:`observe`) and
fits the network output ``out`` by ``MSE(A'(out)·m, y·m)`` (:meth:`loss`, method spec §6), where
``A'`` is :meth:`forward` (the identity except for super-resolution, whose fitting operator is the
Lanczos2 downsampler rather than PIL's resize) and ``m`` the inpainting mask (:meth:`loss_mask`).
The restored image is :meth:`restore` applied to the output (only enhancement differs from the
output itself). Images are ``(1, C, H, W)`` tensors in [0, 1]; the network's output channels
follow the image. Each task also declares what the pipeline needs to know about it (its variant,
backtracking, default fit settings, options, metadata round trip): see :class:`Degradation`.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from io import BytesIO
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import SettingError, UserError, check_bool, check_int, check_number
from pipeline.imageio import load_image, save_image, to_uint8

MASK_FILE = "mask.png"


def _cpu_generator(seed: int) -> torch.Generator:
    # Draws happen on the CPU so that one seed gives one observation on every device.
    return torch.Generator(device="cpu").manual_seed(seed)


def _from_uint8(pixels: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` or ``(H, W, C)`` uint8 → ``(1, C, H, W)`` in [0, 1] on ``like``'s device/dtype."""
    t = torch.from_numpy(np.ascontiguousarray(pixels)).to(torch.float32) / 255.0
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.unsqueeze(0).to(device=like.device, dtype=like.dtype)


def _size(t: torch.Tensor) -> str:
    return f"{t.shape[-2]}×{t.shape[-1]}"


class Degradation(ABC):
    """A task: observation ``y = A(x)``, fitting loss, output size and restored image — and what
    the pipeline needs to know about it, declared here and nowhere else.

    A subclass that sets :attr:`name` registers itself in :data:`TASKS`, so a new task is one
    class: the CLI, the prepare and optimize stages and the tuner find everything below. Its
    constructor's parameters are its degradation parameters, each stored under its own name
    (:meth:`params` reads them back for the prepared observation's metadata).
    """

    name: ClassVar[str]
    variant: ClassVar[str | None] = None
    """The parameter the pipeline prepares one observation per value of (σ, JPEG quality, SR
    factor), e.g. ``sigma``; None for tasks with one observation per image."""
    variant_list: ClassVar[str | None] = None
    """The key of params.yaml's ``tasks.<task>.observe`` listing the variant's values."""
    backtracks: ClassVar[bool] = False
    """Whether fits of this task use DIP's backtracking by default (method.md §5)."""
    defaults: ClassVar[dict[str, Any]] = {"lam": 1.4, "lam_gaussian": 1.8}
    """The task's fit settings in the reference scripts (method.md §2, experiments.md "Tasks"):
    they override :class:`pipeline.fit.FitConfig`'s defaults, and profiles override both.
    ``lam_gaussian`` is the λ for Gaussian upsampling (the reference README's advice)."""
    options: ClassVar[dict[str, str]] = {}
    """Degradation parameters offered as command-line options (``--<name>``), with their help."""
    takes_mask: ClassVar[bool] = False
    """Whether the task takes a mask file (``--mask``, ``tasks.<task>.observe.masks``)."""
    holds_out: ClassVar[bool] = True
    """Whether observed pixels can be held out of the fit to score it without ground truth."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            TASKS[cls.name] = cls

    @classmethod
    def parameters(cls) -> list[str]:
        """The names of the constructor's parameters (the degradation parameters)."""
        return list(inspect.signature(cls).parameters)

    def params(self) -> dict[str, Any]:
        """The degradation parameters as JSON values (a prepared observation's metadata); files
        (the inpainting mask) are written by :meth:`save` instead."""
        return {name: getattr(self, name) for name in self.parameters() if name not in self.files}

    files: ClassVar[tuple[str, ...]] = ()
    """Parameters stored as files beside the observation, not in its metadata."""

    def save(self, folder: Path) -> None:
        """Write the parameters in :attr:`files` into ``folder`` (nothing by default)."""
        return None

    @classmethod
    def load(cls, params: dict[str, Any], folder: Path) -> Degradation:
        """Rebuild the degradation from :meth:`params` and the files :meth:`save` wrote; unknown
        or bad parameters (a damaged metadata file) are a :class:`UserError`."""
        return make_degradation(cls.name, **params)

    @abstractmethod
    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """The observation ``y`` of the clean image ``x`` (deterministic given the parameters)."""

    def observation_of_photo(self, photo: torch.Tensor) -> torch.Tensor:
        """A user's degraded photo as this task's observation: the photo itself by default."""
        return photo

    def photo_multiple(self, output_multiple: int) -> int:
        """The multiple a photo's size must have for the output's to be ``output_multiple``."""
        return output_multiple

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        """``A'(out)``, what the loss compares with ``y``; the identity unless overridden."""
        return out

    def loss_mask(self, y: torch.Tensor) -> torch.Tensor | None:
        """Mask multiplying both sides of the loss (inpainting), ``None`` for no mask."""
        return None

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``MSE(A'(out)·m, y·m)``, the mean over all elements (as ``nn.MSELoss``), spec §6."""
        pred = self.forward(out)
        mask = self.loss_mask(y)
        if mask is None:
            return F.mse_loss(pred, y)
        return F.mse_loss(pred * mask, y * mask)

    def output_shape(self, y: torch.Tensor) -> tuple[int, int]:
        """The network output size ``(H, W)`` given ``y``: ``y``'s size unless overridden."""
        return y.shape[-2], y.shape[-1]

    def restore(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The restored image from the network output; the output itself unless overridden."""
        return out


TASKS: dict[str, type[Degradation]] = {}
"""Task name → degradation class; every subclass with a ``name`` registers itself."""


class Denoising(Degradation):
    """Additive white Gaussian noise: ``y = clip(x + n, 0, 1)``, ``n ~ N(0, (σ/255)²)``.

    Experiments spec, "Tasks": σ = 25 (15 and 50 also useful); loss ``MSE(out, y)``. The noise is
    drawn on the CPU from a generator seeded with ``seed``.
    """

    name = "denoising"
    variant = "sigma"
    variant_list = "sigmas"
    backtracks = True
    options: ClassVar[dict[str, str]] = {"sigma": "Noise level on the 0–255 scale (default 25)."}

    def __init__(self, sigma: float = 25, seed: int = 0) -> None:
        self.sigma = check_number("sigma", sigma, 0)
        self.seed = check_int("seed", seed, 0)

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=_cpu_generator(self.seed), dtype=torch.float32)
        noise = noise.to(device=x.device, dtype=x.dtype)
        return (x + noise * (self.sigma / 255.0)).clamp(0.0, 1.0)


class JpegDeblocking(Degradation):
    """JPEG compression: ``y = decode(encode_q(round(255·x)))/255`` with Pillow.

    Experiments spec, "Tasks": quality q ∈ {10, 20, 30}, ``optimize=True, progressive=True``, loss
    ``MSE(out, y)``. Grey images are coded as mode ``L``, RGB as ``RGB`` (Pillow's default 4:2:0
    chroma subsampling).
    """

    name = "deblocking"
    variant = "quality"
    variant_list = "qualities"
    backtracks = True
    options: ClassVar[dict[str, str]] = {"quality": "JPEG quality (default 10)."}

    def __init__(self, quality: int = 10) -> None:
        self.quality = check_int("quality", quality, 1, 100)

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        buffer = BytesIO()
        Image.fromarray(to_uint8(x)).save(
            buffer, format="JPEG", quality=self.quality, optimize=True, progressive=True
        )
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            pixels = np.array(decoded)
        return _from_uint8(pixels, x)


class Inpainting(Degradation):
    """Missing pixels: ``y = x·m`` with ``m ∈ {0, 1}`` (1 = kept), loss ``MSE(out·m, y·m)``.

    Experiments spec, "Tasks": ``m`` is a given mask (a frozen Bernoulli ``.h5`` mask or a region
    mask, already cropped like the image, see :mod:`pipeline.imageio`) or, without one, drawn
    i.i.d. Bernoulli with keep-probability ``p`` on the CPU from a generator seeded with ``seed``.
    One mask is shared by all channels. :attr:`mask` is the mask used by the last :meth:`observe`.
    """

    name = "inpainting"
    defaults: ClassVar[dict[str, Any]] = {"lam": 1.6, "lam_gaussian": 1.8}
    options: ClassVar[dict[str, str]] = {"p": "Kept fraction of a Bernoulli mask (default 0.5)."}
    takes_mask = True
    files = ("mask",)

    def __init__(self, mask: torch.Tensor | None = None, p: float = 0.5, seed: int = 0) -> None:
        self.p = check_number("p", p, maximum=1, above=0)
        self.seed = check_int("seed", seed, 0)
        self._given = None if mask is None else self._as_mask(mask)
        self._mask: torch.Tensor | None = self._given

    @staticmethod
    def _as_mask(mask: torch.Tensor) -> torch.Tensor:
        if mask.ndim < 2 or any(s != 1 for s in mask.shape[:-2]):
            raise UserError(
                f"inpainting mask must have shape H×W or 1×1×H×W, got {tuple(mask.shape)}"
            )
        values = mask.detach().to(device="cpu", dtype=torch.float32)
        if not ((values == 0) | (values == 1)).all():
            raise UserError("inpainting mask must hold only 0 and 1")
        if not values.any():
            raise UserError("inpainting mask keeps no pixel (1 = kept): there is nothing to fit")
        return values.reshape(1, 1, *mask.shape[-2:])

    @property
    def mask(self) -> torch.Tensor:
        """The ``(1, 1, H, W)`` mask (CPU, float 0/1); drawn by :meth:`observe` if not given."""
        if self._mask is None:
            raise RuntimeError("the Bernoulli mask is drawn by observe(); call it first")
        return self._mask

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        if self._given is None:
            shape = (1, 1, x.shape[-2], x.shape[-1])
            draw = torch.rand(shape, generator=_cpu_generator(self.seed), dtype=torch.float32)
            self._mask = (draw < self.p).to(torch.float32)
            if not self._mask.any():
                raise UserError(f"the Bernoulli mask of p={self.p:g} keeps no pixel of the image")
        elif self._given.shape[-2:] != x.shape[-2:]:
            raise UserError(
                f"inpainting mask is {_size(self._given)} px but the image is {_size(x)} px "
                "(height×width)"
            )
        return x * self.mask.to(device=x.device, dtype=x.dtype)

    def loss_mask(self, y: torch.Tensor) -> torch.Tensor:
        return self.mask.to(device=y.device, dtype=y.dtype)

    def observation_of_photo(self, photo: torch.Tensor) -> torch.Tensor:
        """A photo with holes: its mask must be given; the holes are zeroed as in ``y = x·m``."""
        if self._given is None:
            raise UserError("inpainting a real photo needs its mask (--mask)")
        return self.observe(photo)

    def save(self, folder: Path) -> None:
        save_image(folder / MASK_FILE, self.mask)

    @classmethod
    def load(cls, params: dict[str, Any], folder: Path) -> Inpainting:
        mask = (load_image(folder / MASK_FILE) > 0.5).float()
        return make_degradation(cls.name, mask=mask, **params)  # type: ignore[return-value]


def lanczos2_kernel(factor: int, phase: float = 0.5) -> torch.Tensor:
    """The DIP Lanczos2 anti-aliasing kernel for downsampling by ``factor``, float64.

    Kernel width ``w = 4·factor``, centre ``c = (w + 1)/2``, 1-based indices ``i, j``:

    - phase ½ (reference): size ``(w − 1) × (w − 1)``, ``d_i = |i + ½ − c| / factor``;
    - phase 0: size ``w × w``, ``d_i = |i − c| / factor``.

    ``K(i, j) ∝ L(d_i)·L(d_j)`` with ``L(0) = 1``, ``L(d) = a·sin(πd)·sin(πd/a)/(π²d²)``, ``a = 2``,
    normalised to sum 1 (experiments spec, "Tasks", super-resolution).
    """
    if phase not in (0, 0.5):
        raise UserError(f"Lanczos kernel phase must be 0 or 0.5, got {phase!r}")
    width = 4 * factor
    support = 2.0
    if phase == 0.5:
        idx = torch.arange(1, width, dtype=torch.float64) + 0.5
    else:
        idx = torch.arange(1, width + 1, dtype=torch.float64)
    d = (idx - (width + 1) / 2.0).abs() / factor
    safe = torch.where(d == 0, torch.ones_like(d), d)
    lobe = support * torch.sin(math.pi * safe) * torch.sin(math.pi * safe / support)
    taps = torch.where(d == 0, torch.ones_like(d), lobe / (math.pi**2 * safe**2))
    kernel = torch.outer(taps, taps)
    return kernel / kernel.sum()


class SuperResolution(Degradation):
    """Super-resolution ×``factor``: ``y = LANCZOS_resize(x, (H/f, W/f))``, loss ``MSE(D(out), y)``.

    Experiments spec, "Tasks": the observation is Pillow's antialiased Lanczos resize of the 8-bit
    HR image (as the reference, which resized the PIL image); the fitting operator ``D`` is the DIP
    Lanczos2 downsampler: replication padding, then a depthwise convolution with
    :func:`lanczos2_kernel` at stride ``factor``, mapping ``H × W`` to ``H/f × W/f``. The network
    outputs the HR size, ``factor ×`` that of ``y``.

    ``phase=0.5`` (reference): odd ``(4f − 1)``-tap kernel, padding ``2f − 1`` on each side, so LR
    pixel ``r`` is centred on HR pixel ``f·r``, whereas Pillow centres it on ``f·r + (f − 1)/2``:
    the reference ``D`` is offset from its own observation by ``(f − 1)/2`` HR pixels (1.5 for
    ×4, 3.5 for ×8). ``phase=0``: even ``4f``-tap kernel, padding ``(3f)/2`` on each side, centred
    like Pillow.
    """

    name = "sr"
    variant = "factor"
    variant_list = "factors"
    # λ for super-resolution is not published (tune it); the budget is DIP's 2,000 for ×4, and
    # PSNR is read as DIP's SR script reads it (experiments.md, "Protocols").
    defaults: ClassVar[dict[str, Any]] = {
        "lam": 1.4,
        "lam_gaussian": 1.8,
        "iterations": 2000,
        "psnr_protocol": "y",
    }
    options: ClassVar[dict[str, str]] = {"factor": "Super-resolution factor (default 4)."}

    def __init__(self, factor: int = 4, phase: float = 0.5) -> None:
        self.factor = check_int("factor", factor, 2)
        if isinstance(phase, bool) or phase not in (0, 0.5):
            raise SettingError("phase", f"Lanczos kernel phase must be 0 or 0.5, got {phase!r}")
        if phase == 0 and self.factor % 2:
            raise UserError(f"phase 0 needs an even super-resolution factor, got {factor}")
        self.phase = phase
        self.kernel = lanczos2_kernel(self.factor, phase).to(torch.float32)
        size = self.kernel.shape[-1]
        # Odd kernels pad symmetrically around their centre tap; even ones so that 4f − 2p = f.
        self.pad = (size - 1) // 2 if size % 2 else (size - self.factor) // 2

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        if height % self.factor or width % self.factor:
            raise UserError(
                f"image of {height}×{width} px (height×width) is not divisible by the "
                f"super-resolution factor {self.factor}"
            )
        hr = Image.fromarray(to_uint8(x))
        lr = hr.resize((width // self.factor, height // self.factor), Image.Resampling.LANCZOS)
        return _from_uint8(np.array(lr), x)

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        channels = out.shape[-3]
        weight = self.kernel.to(device=out.device, dtype=out.dtype)
        weight = weight.expand(channels, 1, *self.kernel.shape)
        padded = F.pad(out, (self.pad,) * 4, mode="replicate")
        return F.conv2d(padded, weight, stride=self.factor, groups=channels)

    def output_shape(self, y: torch.Tensor) -> tuple[int, int]:
        return y.shape[-2] * self.factor, y.shape[-1] * self.factor

    def photo_multiple(self, output_multiple: int) -> int:
        """A low-resolution photo is cropped or padded to multiples of ``output_multiple /
        factor``; the factor must divide ``output_multiple`` (else no output size has a whole
        low-resolution image)."""
        if output_multiple % self.factor:
            raise SettingError(
                "factor",
                f"super-resolution factor must divide {output_multiple}, got {self.factor}",
            )
        return output_multiple // self.factor


class Enhancement(Degradation):
    """Detail enhancement: ``y = x``; the fit to ``x`` for a few iterations gives a smooth base.

    Experiments spec, "Tasks": loss ``MSE(out, x)`` for 100 iterations, and the restored image is
    ``clip(x + gain·r, 0, 1)`` with the detail ``r = clip(x − out, 0, 1)`` (reference behaviour,
    ``gain = 1``, ``signed = False``); ``signed=True`` uses the signed residual ``r = x − out``,
    which also deepens dark details, and ``gain`` scales the boost.
    """

    name = "enhancement"
    defaults: ClassVar[dict[str, Any]] = {"lam": 1.0, "lam_gaussian": 1.0, "iterations": 100}
    holds_out = False  # it fits the clean image itself: nothing to hold out

    def __init__(self, gain: float = 1.0, signed: bool = False) -> None:
        self.gain = check_number("gain", gain)
        self.signed = check_bool("signed", signed)

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def restore(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        detail = y - out
        if not self.signed:
            detail = detail.clamp(0.0, 1.0)
        return (y + self.gain * detail).clamp(0.0, 1.0)


def make_degradation(task: str, **params: object) -> Degradation:
    """Build the degradation of ``task`` (one of :data:`TASKS`) with keyword ``params``.

    Raises:
        UserError: unknown task, unknown parameter, or an invalid parameter value.
    """
    cls = TASKS.get(task)
    if cls is None:
        raise UserError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    accepted = cls.parameters()
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise UserError(
            f"unknown parameter(s) {', '.join(unknown)} for task {task!r}; "
            f"valid: {', '.join(accepted)}"
        )
    return cls(**params)
