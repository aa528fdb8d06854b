"""Auto-wrap policies, with the signatures of ``torch.distributed.fsdp.wrap``.

A policy is called as ``policy(module=m, recurse=r, nonwrapped_numel=n)``: with ``recurse=True`` it
says whether to look inside ``m``; with ``recurse=False`` whether ``m`` becomes its own FSDP unit
(``n`` counts the parameters of ``m`` not already inside a unit below it).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["size_based_auto_wrap_policy", "transformer_auto_wrap_policy", "ModuleWrapPolicy"]


def size_based_auto_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int,
                                min_num_params: int = int(1e8)) -> bool:
    """Wrap a module once it holds at least ``min_num_params`` parameters not wrapped below it."""
    if recurse:
        return True
    return nonwrapped_numel >= min_num_params


def transformer_auto_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int,
                                 transformer_layer_cls: Iterable[type] = ()) -> bool:
    """Wrap every instance of the given layer classes (e.g. one unit per transformer block)."""
    if recurse:
        return True
    return isinstance(module, tuple(transformer_layer_cls))


class ModuleWrapPolicy:
    """Wrap every instance of the given module classes."""

    def __init__(self, module_classes: Iterable[type]) -> None:
        self.module_classes = tuple(module_classes)

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            return True
        return isinstance(module, self.module_classes)
