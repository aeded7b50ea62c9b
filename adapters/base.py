"""The delta interface and the shared machinery for layer-wise deltas.

A :class:`Delta` is an ``nn.Module`` holding only its own parameters. It reaches into the frozen
backbone through forward hooks that it registers in :meth:`Delta.attach` and removes in
:meth:`Delta.detach`; the backbone's modules and weights are never replaced or edited, which is
why detaching gives back bit-identical outputs.

Whether a delta acts in a forward pass is decided by the ``is_active`` callable its owner passes to
``attach`` (the :class:`~adapters.model.DeltaModel` answers it from its active task set), so many
deltas can sit on one backbone and only the active task's run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import DeltaConfig
from .errors import ConfigError
from .targets import Site, linear_dims
from .targets import resolve_sites as _resolve_sites

IsActive = Callable[[], bool]


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a delta method supports, declared once on its class (``capabilities = ...``).

    Shared code asks these flags instead of testing types or overrides, and
    ``tests/test_capabilities.py`` checks every registered method's declaration against what it
    really does, so a wrong flag fails a test rather than a user.

      identity_at_init  a fresh delta leaves the backbone's outputs unchanged (prefix and prompt
                        tuning add attended positions, so cannot; a fresh fusion adds the mean)
      site_terms        adds ``h <- h + term(x, h)`` at module outputs (a :class:`SiteDelta`)
      input_transform   changes the input embeddings (prompt tuning: :meth:`Delta.transform_inputs`)
      mixed_batches     can share a batch with other tasks' examples (:mod:`adapters.mixed`)
      fusable           an AdapterFusion can weigh its per-module terms (needs ``site_terms``)
      folds             :meth:`Delta.fold` replaces a training-time reparameterisation when frozen
      composite         built over other tasks' deltas (fusion): not a ``--method`` of its own
      decoders          can act on a decoder-only backbone (False where it selects by a query over
                        the input: a decoder's training input holds the answer, a generated one not;
                        such a method is refused when a task is added, with DECODER_REFUSAL)
      linear_units      its site modules name each trained linear map and its output for an input,
                        ``linear_outputs(x, h) -> [(weight, bias or None, output)]`` in the order the
                        maps run, the last output being the site's term: what a strategy that masks
                        a map's output units reads (``migu``)
      why_not_mixed     shown when a user mixes a method that cannot be mixed
    """

    identity_at_init: bool = True
    site_terms: bool = False
    input_transform: bool = False
    mixed_batches: bool = False
    fusable: bool = False
    folds: bool = False
    composite: bool = False
    decoders: bool = True
    linear_units: bool = False
    why_not_mixed: str = "it changes the attention rather than adding a term at sites"


# why a method declaring ``decoders=False`` is refused on a decoder-only backbone (when a task is
# added, and by a strategy's check before a run starts)
DECODER_REFUSAL = ("{method} chooses what acts on each input by a query over that input, but on a decoder-only backbone "
                   "({backbone!r}) a training input holds its answer while a generated one does not, so training and "
                   "generation would choose differently; use an encoder or an encoder-decoder (T5)")


class FrozenRef:
    """A reference to a module of the frozen backbone (or another task) that is *not* registered
    as a submodule: it is not in the holder's ``state_dict``, ``parameters()`` or parameter count,
    and the holder never saves, casts or trains it. ``ref()`` gives the module.

    This is the sanctioned way for a delta to read frozen weights at run time (DoRA needs the base
    weight's column norms, a fusion calls its sources' terms): hold ``FrozenRef(module)``, not the
    module or a tensor, so that moving the backbone to another device is seen at once."""

    __slots__ = ("_module",)

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    def __call__(self) -> nn.Module:
        return self._module


class Delta(nn.Module):
    """Base class of every delta method.

    Class attributes a method sets:
      config_class   its :class:`DeltaConfig` subclass (its ``method`` is the registry name)
      capabilities   a :class:`Capabilities`: what shared code may do with it
    """

    config_class: ClassVar[type[DeltaConfig]]
    capabilities: ClassVar[Capabilities] = Capabilities()

    @classmethod
    def create(cls, config: DeltaConfig, model: Any) -> "Delta":
        """Build the delta for a :class:`~adapters.model.DeltaModel`. Most methods need only the
        backbone; a method built over other tasks (fusion) overrides this to look them up."""
        return cls(config, model.backbone)

    @classmethod
    def positions_added(cls, config: DeltaConfig) -> int:
        """Token positions this method prepends to every input (prompt tuning's soft tokens), so
        callers can check an input length against the backbone's position table. Default 0."""
        return 0

    def sources(self) -> tuple[str, ...]:
        """Names of other tasks this delta uses (they cannot be removed while it exists)."""
        return ()

    def on_train_step(self, step: int, total: int) -> None:
        """Called by the training loop before each step while this delta is active (e.g. a
        temperature schedule); never called in evaluation. The default does nothing."""

    def __init__(self, config: DeltaConfig, backbone: nn.Module) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self._handles: list[RemovableHandle] = []

    # -- hooking into the backbone -------------------------------------------------------------
    def attach(self, backbone: nn.Module, is_active: IsActive) -> None:
        """Register this delta's hooks on ``backbone``. Subclasses override :meth:`_hooks`."""
        if self._handles:
            raise RuntimeError(f"{type(self).__name__} is already attached")
        self._handles = list(self._hooks(backbone, is_active))

    def detach(self) -> None:
        """Remove every hook this delta registered."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hooks(self, backbone: nn.Module, is_active: IsActive) -> list[RemovableHandle]:
        return []

    # -- optional stages -------------------------------------------------------------------------
    def transform_inputs(
        self, embeds: torch.Tensor, mask: torch.Tensor, extra: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], int] | None:
        """Change the input embeddings (prompt tuning). Returns (embeds, mask, extra, n_prepended)
        or None when the delta does not touch the inputs (the default)."""
        return None

    @classmethod
    def stack_inputs(cls, deltas: list["Delta | None"]) -> nn.Module | None:
        """For mixed-task batches, a module applying each example's own input transform (prompt
        tuning): ``forward(embeds, mask, extra, batch) -> (embeds, mask, extra, n_prepended)``.
        ``deltas``: this method's delta of each task (None where a task has none). None (the
        default) when the method changes nothing in the inputs, or cannot be mixed."""
        return None

    @classmethod
    def summed_config(cls, config: DeltaConfig, n: int) -> DeltaConfig | None:
        """The config of one delta that computes exactly a weighted sum of ``n`` deltas of ``config``
        (``fusion.merge_tasks(how="cat")``), filled by :meth:`load_sum`; None (the default) when
        the method has no such form."""
        return None

    def load_sum(self, sources: list["Delta"], weights: list[float]) -> None:
        """Set this delta, built from :meth:`summed_config`, to the weighted sum of ``sources``."""
        raise NotImplementedError(f"{type(self).__name__} has no summed form")

    def fold(self) -> None:
        """Called when the task is frozen, for methods that declare ``capabilities.folds``:
        replace training-time reparameterisations by their result (prefix tuning's MLP)."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclasses.dataclass(frozen=True)
class LayerwiseConfig(DeltaConfig):
    """Fields shared by layer-wise methods.

    targets:    roles / blocks / module paths (see :func:`adapters.targets.resolve_sites`)
    layers:     block indices to use (negative counts from the end); None = all
    skip_first: AdapterDrop (Rücklé et al. 2021): no delta in the first n blocks, so the forward
                pass of those blocks is the backbone's own (and can be shared across tasks)
    """

    targets: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    skip_first: int = 0

    def validate(self) -> None:
        if not self.targets:
            raise ConfigError(f"{self.method}: targets must name at least one role or module")
        check_no_repeats(self.method, "targets", self.targets)
        check_no_repeats(self.method, "layers", self.layers)
        if self.skip_first < 0:
            raise ConfigError(f"{self.method}: skip_first must be >= 0, got {self.skip_first}")


def check_no_repeats(method: str, field: str, values: tuple | None) -> None:
    """A target or layer named twice is refused, not merged: a repeated target had put the delta
    on the same module twice (its term added twice), a repeated layer was dropped without a word."""
    twice = sorted({v for v in values or () if list(values).count(v) > 1}, key=str)
    if twice:
        raise ConfigError(f"{method}: {field} {list(values)} name {twice} more than once")


def site_dims(backbone: nn.Module, site: Site) -> tuple[int, int]:
    """(dimension of the site's input x, dimension of the output h it adds to)."""
    hidden = backbone.config.hidden_size
    inp = backbone.get_submodule(site.input)
    out = backbone.get_submodule(site.output)
    d_in = (linear_dims(inp) or (hidden, hidden))[0]
    d_out = (linear_dims(out) or (hidden, hidden))[1]
    return d_in, d_out


class SiteDelta(Delta):
    """A layer-wise delta: at every site, ``h <- h + contribution(x, h)``.

    ``x`` is the input of the site's input module and ``h`` the output of its output module (the
    same module for a role such as "query"; a sub-layer and its output projection for a block such
    as "ffn"). Subclasses build one module per site in :meth:`build_site`; that module's
    ``forward(x, h)`` returns the term to add. Deltas at the same module apply in attach order, each
    seeing the previous one's result, which is how a sequential combination composes.
    """

    capabilities = Capabilities(site_terms=True, mixed_batches=True, fusable=True)

    def __init__(self, config: LayerwiseConfig, backbone: nn.Module) -> None:
        super().__init__(config, backbone)
        self.sites = self.resolve_sites(backbone)
        self.site_modules = nn.ModuleDict(
            {s.key: self.build_site(s, *site_dims(backbone, s), backbone) for s in self.sites}
        )
        # Inputs captured by a pre-hook for block sites, consumed by the output hook of the same
        # forward pass. Transient: empty between forward passes.
        self._captured: dict[str, torch.Tensor] = {}

    def resolve_sites(self, backbone: nn.Module) -> list[Site]:
        """Where this delta acts; by default the config's targets in its layers."""
        c = self.config
        return _resolve_sites(backbone, c.targets, c.layers, c.skip_first)

    def build_site(self, site: Site, d_in: int, d_out: int, backbone: nn.Module) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def stack_sites(cls, sites: list[nn.Module | None]) -> nn.Module | None:
        """One module that computes, for a mixed-task batch, every example's own contribution.

        ``sites``: this method's site module of each task at one site (None where a task has
        none; its examples get 0). The returned module's ``forward(x, h, batch)`` reads the
        per-example task slot from ``batch.idx`` (see :mod:`adapters.mixed`). Return None (the
        default) when the sites cannot be stacked; mixed batches then run each task's examples
        through its own site module, one task at a time."""
        return None

    def contribution(self, key: str, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The term added to ``h`` at site ``key``."""
        return self.site_modules[key](x, h)

    def _hooks(self, backbone: nn.Module, is_active: IsActive) -> list[RemovableHandle]:
        handles = []
        for site in self.sites:
            handles.extend(self._site_hooks(backbone, site, is_active))
        return handles

    def _site_hooks(self, backbone: nn.Module, site: Site, is_active: IsActive) -> list[RemovableHandle]:
        key = site.key
        return hook_site(backbone, site, is_active, lambda x, h: self.contribution(key, x, h), self._captured)


def hook_site(
    backbone: nn.Module,
    site: Site,
    is_active: IsActive,
    contribution: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    captured: dict[str, torch.Tensor],
) -> list[RemovableHandle]:
    """Hooks that make ``h <- h + contribution(x, h)`` at one site while ``is_active()``.

    Shared by every layer-wise delta, mixed-task batches (:mod:`adapters.mixed`) and fusion, so
    all read ``x`` and ``h`` at exactly the same places. ``captured`` carries a block site's input
    from its pre-hook to the output hook of the same forward pass."""
    return hook_output(backbone, site.output, [site.input], is_active,
                       lambda xs, h: contribution(xs[site.input], h), captured, prefix=site.key)


def hook_output(
    backbone: nn.Module,
    output: str,
    inputs: list[str],
    is_active: IsActive,
    term: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
    captured: dict[str, torch.Tensor],
    prefix: str = "",
) -> list[RemovableHandle]:
    """Hooks that make ``h <- h + term(xs, h)`` at module ``output`` while ``is_active()``.

    ``xs`` maps each module path in ``inputs`` to that module's input in the same forward pass
    (``output`` itself may be one of them: then its own input). Fusion uses this to see, at one
    module, the inputs of every fused delta's site there."""
    handles = []
    keys = {m: f"{prefix}|{m}" for m in inputs}
    for m in dict.fromkeys(inputs):
        if m == output:
            continue

        def capture(_mod: nn.Module, args: tuple, kwargs: dict[str, Any], key: str = keys[m]) -> None:
            if is_active():
                captured[key] = _first_tensor(args, kwargs)

        handles.append(backbone.get_submodule(m).register_forward_pre_hook(capture, with_kwargs=True))

    def apply(_mod: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> Any:
        if not is_active():
            return None
        xs = {m: _first_tensor(args, kwargs) if m == output else captured.pop(keys[m]) for m in dict.fromkeys(inputs)}
        h = out[0] if isinstance(out, tuple) else out
        new = h + term(xs, h).to(h.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handles.append(backbone.get_submodule(output).register_forward_hook(apply, with_kwargs=True))
    return handles


def _first_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
