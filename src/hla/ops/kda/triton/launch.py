"""A lighter host path for the forward's kernel launches.

``kernel[grid](*args, **kwargs)`` costs the host ~55 us a launch in Triton 3.6 (H200 machine, session 21): each
call specializes every argument, builds the kernel's cache key (with the launch options as a string) and checks
the globals the kernel read. A B1 T8192 forward makes four launches, and its host time (~0.5 ms, ~0.2 of it in
those launches) is about its GPU time, so the host set its pace. ``LeanLaunch`` does that work once per argument
signature: the first call of a signature goes through Triton (which compiles, caches and launches), later ones
straight to the compiled kernel's launcher with the same arguments (and no launch hooks: with none installed,
Triton 3.6 still builds the launch metadata for its empty hook chain each call).

The signature is what Triton specializes on for our arguments: a tensor's dtype and whether its address is a
multiple of 16 bytes, an int's value being 1 or a multiple of 16 (and its width), a TMA descriptor's dtype, box
and layout, and every constexpr and launch option by value. Anything else (an unhashable constexpr, a launch hook
installed by a profiler, the interpreter) takes Triton's own path.
"""

from __future__ import annotations

import inspect

import torch
from triton import knobs
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime import driver

from hla.ops.kda.triton.common import INTERPRET


def _arg_signature(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool) or a is None:
        return a
    if isinstance(a, int):
        return int, a == 1, a % 16 == 0, -(2**31) <= a < 2**31
    if isinstance(a, float):
        return float
    if isinstance(a, TensorDescriptor):
        return TensorDescriptor, a.base.dtype, tuple(a.block_shape), a.layout
    raise TypeError  # not one of ours: Triton's path


class LeanLaunch:
    """``LeanLaunch(kernel)[grid](*args, **kwargs)``: the launch ``kernel[grid](*args, **kwargs)`` makes, with
    Triton's per-call argument work done once per argument signature (module docstring). Non-constexpr arguments
    come positionally, constexprs and launch options (num_warps, maxnreg, ...) by keyword, as our call sites pass
    them."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = list(inspect.signature(kernel.fn).parameters.values())
        self.names = [p.name for p in params]
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.compiled: dict = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        hook = knobs.runtime.launch_enter_hook  # an empty HookChain in Triton 3.6 unless a profiler installed one
        if INTERPRET or (hook is not None and getattr(hook, "calls", True)):
            self.kernel[grid](*args, **kwargs)
            return
        device = driver.active.get_current_device()
        try:
            key = (device, tuple(map(_arg_signature, args)), tuple(kwargs.items()))
            compiled = self.compiled.get(key)
        except TypeError:  # an argument we do not know, or an unhashable constexpr
            self.kernel[grid](*args, **kwargs)
            return
        if compiled is None:  # Triton's path: compiles (or finds) the kernel for this signature and launches it
            self.compiled[key] = self.kernel[grid](*args, **kwargs)
            return
        # the arguments in the kernel's order, constexprs included (the launcher skips them), as Triton passes them
        full = [*args, *(kwargs[n] if n in kwargs else self.defaults[n] for n in self.names[len(args):])]
        g0, g1, g2 = (*grid, 1, 1)[:3]
        compiled.run(g0, g1, g2, driver.active.get_current_stream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *full)
