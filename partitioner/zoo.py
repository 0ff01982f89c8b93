"""Model zoo by name: any torchvision classification model, randomly initialised with a fixed seed.

Nothing on these machines can download weights, so models are built with ``weights=None`` and a fixed
seed (the same name always gives the same parameters); real users pass ``weights_path`` to load theirs.
"""
from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_SEED = 0

# Models whose stem needs a larger input than 224x224, and constructor arguments that keep eval-mode
# outputs a single tensor.
_DEFAULT_INPUT = {"inception_v3": (1, 3, 299, 299)}
_EXTRA_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}


class UnknownModelError(ValueError):
    pass


def classification_model_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def default_input_shape(name: str) -> tuple[int, ...]:
    return _DEFAULT_INPUT.get(name, (1, 3, 224, 224))


def parse_shape(text: str) -> tuple[int, ...]:
    """'1x3x224x224' -> (1, 3, 224, 224), with a clear error for anything else."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"bad input shape {text!r}: expected e.g. 1x3x224x224") from None
    if not shape or any(dim <= 0 for dim in shape):
        raise ValueError(f"bad input shape {text!r}: every dimension must be a positive integer")
    return shape


def load_model(name: str, weights_path: str | Path | None = None, seed: int = DEFAULT_SEED) -> torch.nn.Module:
    """A torchvision classification model in eval mode.

    ``weights_path`` is a state dict saved with ``torch.save``; it is loaded with ``weights_only=True`` so
    a weights file can never run code.
    """
    import torchvision.models as tvm

    names = classification_model_names()
    if name not in names:
        close = [n for n in names if name.lower() in n][:8]
        hint = f"; did you mean one of {close}?" if close else f"; {len(names)} names are known, e.g. {names[:6]}"
        raise UnknownModelError(f"unknown model {name!r}{hint}")
    torch.manual_seed(seed)
    kwargs = dict(_EXTRA_KWARGS.get(name, {}))
    model = tvm.get_model(name, weights=None, **kwargs)
    if weights_path is not None:
        state = torch.load(Path(weights_path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state)
    return model.eval()


def example_input(shape: tuple[int, ...], seed: int = DEFAULT_SEED) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator)
