"""Device and precision resolution (clipforge.device), shared by training, evaluation, inference and the CLI."""

from __future__ import annotations

import pytest
import torch

from clipforge.device import autocast_context, model_device, resolve_device


def test_resolve_device() -> None:
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None) == resolve_device() == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # unchecked: moving a model there would raise


def test_model_device() -> None:
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(torch.nn.Identity()) == torch.device("cpu")  # no parameters


def test_autocast_context() -> None:
    cpu = torch.device("cpu")
    x = torch.ones(2, 2)
    with autocast_context(cpu, "fp32"):
        assert (x @ x).dtype == torch.float32
    with autocast_context(cpu, "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_context(cpu, "fp8")
