"""The forward check of a quantization: one sample input through the model before and after, so a
quantize that broke the model is an error and one that changed it is measured.

The sample input is built from what the model declares: token ids for text models (decoder ids too for
encoder-decoders), pixels for image models, and for plain modules a batch shaped for the first layer.
When no input can be built, the check says it was skipped and why; it never guesses silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..core.errors import ShrinkError
from ..core.finite import all_finite, count_non_finite
from ..core.model_outputs import main_output

SEED = 0


@dataclass
class ForwardCheck:
    """What the check found: the relative output error (||after - before|| / ||before||) on `input`,
    or why it was skipped (then relative_error is None)."""

    relative_error: float | None
    input: str
    skipped: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ForwardCheck | None":
        """From shrink.json's `check` (None when absent or not of this shape)."""
        if not isinstance(d, dict) or set(d) != {"relative_error", "input", "skipped"}:
            return None
        return cls(**d)

    def line(self) -> str:
        if self.skipped:
            return f"forward check skipped: {self.skipped}"
        return f"forward check: relative output error {self.relative_error:.2e} on {self.input}"


def sample_input(model: nn.Module) -> tuple[dict | None, str]:
    """Keyword arguments for one forward of `model`, and what they are (None, reason when none fits)."""
    g = torch.Generator().manual_seed(SEED)
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is not None and main == "input_ids" and getattr(config, "vocab_size", None):
        n = min(int(config.vocab_size), 1000)
        ids = torch.randint(0, n, (1, 16), generator=g)
        kwargs = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = ids[:, :4]
        return kwargs, "16 random token ids"
    if config is not None and main == "input_features" and getattr(config, "num_mel_bins", None):
        frames = 2 * int(getattr(config, "max_source_positions", 1500))  # Whisper takes exactly this many
        kwargs = {"input_features": torch.randn(1, int(config.num_mel_bins), frames, generator=g)}
        if getattr(config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = torch.full((1, 4), getattr(config, "decoder_start_token_id", None) or 0)
        return kwargs, f"{frames} random frames of audio features"
    if config is not None and main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        ch = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(1, ch, size, size, generator=g)}, f"one random {size}x{size} image"
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if isinstance(first, nn.Linear):
        return {"x": torch.randn(4, first.in_features, generator=g)}, f"4 random inputs of {first.in_features}"
    if isinstance(first, nn.Conv2d):
        return ({"x": torch.randn(2, first.in_channels, 32, 32, generator=g)},
                f"2 random {first.in_channels}x32x32 inputs")
    return None, "no sample input can be built for this model (no token ids, pixels or first layer to shape one)"


@torch.no_grad()
def run(model: nn.Module, kwargs: dict) -> torch.Tensor:
    """The model's main output on `kwargs`, in eval mode, as float32."""
    training = model.training
    model.eval()
    try:
        if list(kwargs) == ["x"]:
            return main_output(model(kwargs["x"])).float()
        return main_output(model(**kwargs)).float()
    finally:
        model.train(training)


def relative_error(before: torch.Tensor, after: torch.Tensor) -> float:
    """||after - before|| / ||before|| (inf when the shapes differ or the result is not finite)."""
    if before.shape != after.shape or not torch.isfinite(after).all():
        return float("inf")
    return float((after - before).norm() / before.norm().clamp_min(1e-30))


def refuse_non_finite(model: nn.Module) -> None:
    """ShrinkError naming the first floating-point tensor of `model`'s state that holds NaN or infinity:
    such a model computes NaN, and a saved copy would carry it to every later user."""
    for name, t in model.state_dict().items():
        refuse_non_finite_tensor(name, t)


def refuse_non_finite_tensor(name: str, t: torch.Tensor) -> None:
    """ShrinkError naming `name` when the floating-point tensor `t` holds NaN or infinity."""
    if not (t.is_floating_point() and t.numel() and not t.is_meta):
        return
    if all_finite(t):
        return
    bad = count_non_finite(t)
    raise ShrinkError(f"{name}: {bad:,} of its {t.numel():,} values are NaN or infinite; a model holding "
                      "them computes NaN, so it is not saved (check the original's weights, or the "
                      "calibration that produced these)")
