"""``torch.compile`` for clipforge models: the trainer's ``compile=true`` and :func:`compile_encoders` for
inference.

Compiled code always runs the towers' reference computation: the inference fast paths (packed text, the pooled
last block) depend on the data (each batch's real text lengths), which would break the graph at every batch, so
:func:`clipforge.model.layers.use_fast_paths` is off while Dynamo traces. On the CPU, Inductor generates C++ and
needs a compiler (``g++``); without one, asking for compilation is a :class:`ConfigError`, not a traceback from
deep inside torch. The first call of each new input shape compiles (tens of seconds on 2 cores); later calls
reuse it. Measured speed: ``benchmarks/bench_compile.py``.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from clipforge.errors import ConfigError


def check_compilable(device: torch.device | str) -> None:
    """Raise :class:`ConfigError` when ``torch.compile`` cannot work on ``device`` here."""
    if not hasattr(torch, "compile"):
        raise ConfigError("compile: this torch has no torch.compile (needs torch >= 2.0); set compile=false")
    if torch.device(device).type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise ConfigError(
            "compile: torch.compile on the CPU generates C++ and needs a compiler, and none was found "
            "(apt-get install g++); or set compile=false"
        )


def compile_module(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``torch.compile(module)`` after :func:`check_compilable`: the compiled module shares ``module``'s
    parameters (save and load ``module`` itself; the wrapper's state-dict keys carry an ``_orig_mod.`` prefix)."""
    check_compilable(device)
    return torch.compile(module)  # type: ignore[return-value]


def compile_encoders(model: nn.Module) -> nn.Module:
    """Compile ``model.encode_image`` and ``model.encode_text`` in place (the model's own methods, so every
    caller, the encode layer included, gets the compiled versions); returns ``model``. Undo with
    :func:`uncompile_encoders`."""
    check_compilable(next(model.parameters()).device)
    for name in ("encode_image", "encode_text"):
        setattr(model, name, torch.compile(getattr(type(model), name).__get__(model)))
    return model


def uncompile_encoders(model: nn.Module) -> nn.Module:
    """Back to the eager ``encode_image`` / ``encode_text``."""
    for name in ("encode_image", "encode_text"):
        model.__dict__.pop(name, None)
    return model
