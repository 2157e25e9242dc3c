"""Capture intermediate features of a model by dotted module path.

Feature distillation (FitNets, attention transfer, Patient-KD, TinyBERT) compares what a student
and a teacher compute *inside* the network. This module reads those tensors with forward hooks on
modules named the way ``nn.Module.get_submodule`` names them (``"layer3.1.conv2"``,
``"encoder.layer.4"``), so the models need no changes.

>>> with FeatureCapture(model, ["layer2", "layer3"]) as cap:
...     logits = model(x)
...     feats = cap.features          # {"layer2": Tensor, "layer3": Tensor}
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "INPUT_MARKER",
    "OUTPUT_PREFIX",
    "Address",
    "FeatureCapture",
    "Selector",
    "list_modules",
    "map_layers",
    "parse_address",
    "probe_shapes",
    "resolve_module",
    "select_tensor",
]

Selector = int | str | Callable[[Any], Tensor] | None

_ACCEPTED = (
    "a Tensor, a tuple/list (element 0 is taken), a dict or HuggingFace ModelOutput ('logits', "
    "else 'last_hidden_state', else the first value), a dataclass (first non-None field) or an "
    "object with a `.logits` attribute"
)
_SELECTOR_HINT = (
    "pass a selector: an int index (selector=0), a key or attribute name "
    "(selector='last_hidden_state'), or a callable (selector=lambda out: out.hidden_states[-1])"
)


# --------------------------------------------------------------------------------------------
# module lookup
# --------------------------------------------------------------------------------------------


def list_modules(model: nn.Module) -> list[str]:
    """Return the dotted path of every submodule of ``model`` (the root itself excluded)."""
    return [name for name, _ in model.named_modules() if name]


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule of ``model`` at dotted ``path`` (``""`` is ``model`` itself).

    Integer parts index into ``nn.Sequential`` / ``nn.ModuleList`` (``"features.3"``,
    ``"layer3.1.conv2"``), exactly as :meth:`torch.nn.Module.get_submodule` does.

    Raises:
        ValueError: ``path`` names no module; the message lists the closest existing names.
    """
    if not isinstance(path, str):
        raise TypeError(
            f"module path must be a str like 'layer3.1.conv2', got {type(path).__name__}: {path!r}"
        )
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    if isinstance(module, nn.Module):
        return module
    names = list_modules(model)
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
    hint = f"closest: {close}" if close else "no similar names"
    raise ValueError(
        f"no module at path '{path}' in {type(model).__name__} ({hint}). "
        f"Use a dotted path of submodule names; kdkit.capture.list_modules(model) lists all "
        f"{len(names)} of them. A field of the model's output needs no module: "
        f"{', '.join(OUTPUT_FIELDS)}."
    )


# --------------------------------------------------------------------------------------------
# addresses: what a term reads
# --------------------------------------------------------------------------------------------

OUTPUT_PREFIX = "output."
"""An address starting with this names a field of the model's output, not a module."""
INPUT_MARKER = ":input"
"""Appended to a module path, the address reads the module's input instead of its output."""
OUTPUT_FIELDS = (
    "output.hidden_states[i] (hidden_states[0] is the embedding output)",
    "output.attentions[i] (eager attention only)",
    "output.last_hidden_state",
    "output.logits",
)
_ADDRESS = re.compile(r"^(?P<base>[^\[\]:]*)(?P<input>:input)?(?P<items>(?:\[[^\]]*\])*)$")
_ITEM = re.compile(r"""\[\s*(?:(?P<int>-?\d+)|"(?P<dq>[^"]*)"|'(?P<sq>[^']*)')\s*\]""")
_FLAGS = {"hidden_states": "output_hidden_states", "attentions": "output_attentions"}


@dataclasses.dataclass(frozen=True)
class Address:
    """What a term reads, parsed once from its text (see :func:`parse_address`).

    ``module`` is the dotted module path (None for a field of the model's output), ``field`` the
    output field (None for a module), ``input`` whether the module's input is read, and
    ``items`` the indices / keys taken from that value in turn.
    """

    text: str
    module: str | None
    field: str | None
    input: bool
    items: tuple[int | str, ...]

    @property
    def output_flag(self) -> str | None:
        """The Hugging Face call argument this address needs (``output_hidden_states`` /
        ``output_attentions``), or None."""
        return _FLAGS.get(self.field or "")

    def pick(self, value: Any) -> Tensor:
        """The tensor this address names inside a module's output (or input, or the model's
        output field)."""
        for item in self.items:
            try:
                if isinstance(item, str) and not isinstance(value, Mapping):
                    value = getattr(value, item)
                else:
                    value = value[item]
            except (IndexError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(
                    f"address {self.text!r}: cannot take [{item!r}] out of {_describe(value)} "
                    f"({err}); use an index or key the value has."
                ) from None
        return _checked(value, value, self.text)

    def read_output(self, output: Any) -> Tensor:
        """The field this address names in a model's ``output``."""
        field = self.field or ""
        value = output.get(field) if isinstance(output, Mapping) else getattr(output, field, None)
        if value is None or (isinstance(value, (tuple, list)) and not value):
            why = ""
            if field == "attentions":
                why = (
                    " With the default sdpa (or flash) attention a Hugging Face model returns no "
                    "attention probabilities: load it with attn_implementation='eager' "
                    "(model.set_attn_implementation('eager')), or read the query/key projections "
                    "(...attention.self.query / .key) with a transformer attention loss."
                )
            flag = self.output_flag
            ask = (
                f" (the Distiller passes {flag}=True to models whose forward takes it)"
                if flag
                else ""
            )
            raise ValueError(
                f"address {self.text!r}: the model's output ({_describe(output)}) has no "
                f"{field!r}{ask}.{why}"
            )
        return self.pick(value)


def parse_address(text: str) -> Address:
    """Parse what a term reads. One syntax for all:

    * ``"bert.encoder.layer.3"``: the output of the module at that dotted path (a tuple / dict
      output gives its first tensor, as :func:`select_tensor` does);
    * ``"bert.encoder.layer.3.attention.self[1]"``, ``'encoder["key"]'``: an item of that
      module's output (indices and keys may be chained: ``"m[0][1]"``);
    * ``"bert.encoder.layer.3:input"`` (:data:`INPUT_MARKER`): the module's input (its first
      positional argument; ``":input[1]"`` the second, ``':input["hidden_states"]'`` a keyword);
    * ``"output.hidden_states[2]"``, ``"output.attentions[-1]"`` (:data:`OUTPUT_PREFIX`): a
      field of the model's own output, no hook needed. Indices follow Hugging Face:
      ``hidden_states[0]`` is the embedding output and ``hidden_states[i]`` layer ``i - 1``'s
      (0-based), ``attentions[i]`` layer ``i``'s probabilities ``[B, H, L, L]``.
    """
    if not isinstance(text, str):
        raise TypeError(
            f"a term reads a str address like 'layer3.1.conv2', 'm.attention.self[1]' or "
            f"'output.hidden_states[2]', got {type(text).__name__}: {text!r}"
        )
    match = _ADDRESS.match(text)
    items_text = match["items"] if match else ""
    items = [m for m in _ITEM.finditer(items_text)] if match else []
    if match is None or "".join(m[0] for m in items) != items_text:
        raise ValueError(
            f"cannot parse address {text!r}; use a module path ('encoder.layer.3'), an item of "
            "its output ('encoder.layer.3.attention.self[1]', 'm[\"key\"]'), its input "
            f"('encoder.layer.3{INPUT_MARKER}') or an output field ('output.hidden_states[2]')."
        )
    keys = tuple(int(m["int"]) if m["int"] is not None else m["dq"] or m["sq"] or "" for m in items)
    base = match["base"]
    if base.startswith(OUTPUT_PREFIX):
        if match["input"]:
            raise ValueError(
                f"address {text!r}: {INPUT_MARKER} applies to modules, not to output fields."
            )
        return Address(text, None, base[len(OUTPUT_PREFIX) :], False, keys)
    return Address(text, base, None, bool(match["input"]), keys)


# --------------------------------------------------------------------------------------------
# picking one tensor out of a module's output
# --------------------------------------------------------------------------------------------


def _describe(output: Any) -> str:
    if isinstance(output, Mapping):
        return f"{type(output).__name__} with keys {list(output.keys())}"
    if isinstance(output, (tuple, list)):
        kinds = [type(v).__name__ for v in output]
        return f"{type(output).__name__} of length {len(output)} ({kinds})"
    if isinstance(output, Tensor):
        return f"Tensor of shape {tuple(output.shape)}"
    return type(output).__name__


def _checked(result: Any, output: Any, selector: Selector) -> Tensor:
    if not isinstance(result, Tensor):
        raise TypeError(
            f"selector {selector!r} picked a {type(result).__name__} out of "
            f"{_describe(output)}, expected a Tensor; {_SELECTOR_HINT}"
        )
    return result


def select_tensor(output: Any, selector: Selector = None) -> Tensor:
    """Pick one tensor out of a module (or model) output.

    ``selector`` is

    * ``None``: a Tensor is returned as-is; a tuple/list gives element 0; a Mapping (dict,
      HuggingFace ``ModelOutput``, which subclasses ``OrderedDict``) gives ``'logits'`` if present,
      else ``'last_hidden_state'``, else its first value; an object with ``.logits`` gives that;
      a dataclass gives its first non-None field.
    * ``int``: index into a tuple/list (or into the values of a Mapping).
    * ``str``: key of a Mapping, else attribute name.
    * callable: ``selector(output)``.

    Raises:
        TypeError: the output cannot be reduced to a Tensor with this selector; the message names
            the received type (and keys) and suggests a selector.
    """
    if selector is None:
        if isinstance(output, Tensor):
            return output
        if isinstance(output, (tuple, list)) and len(output) > 0:
            return _checked(output[0], output, selector)
        if isinstance(output, Mapping) and len(output) > 0:
            for key in ("logits", "last_hidden_state"):
                if key in output:
                    return _checked(output[key], output, selector)
            return _checked(next(iter(output.values())), output, selector)
        if isinstance(getattr(output, "logits", None), Tensor):
            return output.logits
        if dataclasses.is_dataclass(output) and not isinstance(output, type):
            for field in dataclasses.fields(output):
                value = getattr(output, field.name)
                if value is not None:
                    return _checked(value, output, selector)
        raise TypeError(
            f"cannot take a tensor from {_describe(output)}; accepted without a selector: "
            f"{_ACCEPTED}. Otherwise {_SELECTOR_HINT}"
        )

    # bool is an int subclass, and selector=True is always a mistake
    if isinstance(selector, int) and not isinstance(selector, bool):
        if isinstance(output, (tuple, list)):
            if -len(output) <= selector < len(output):
                return _checked(output[selector], output, selector)
        elif isinstance(output, Mapping):
            values = list(output.values())
            if -len(values) <= selector < len(values):
                return _checked(values[selector], output, selector)
        else:
            raise TypeError(
                f"int selector {selector} needs a tuple, list or Mapping, got {_describe(output)}"
                f"; use selector=None for a Tensor output, or a callable"
            )
        raise TypeError(
            f"int selector {selector} is out of range for {_describe(output)}; {_SELECTOR_HINT}"
        )

    if isinstance(selector, str):
        if isinstance(output, Mapping):
            if selector in output:
                return _checked(output[selector], output, selector)
        elif hasattr(output, selector):
            return _checked(getattr(output, selector), output, selector)
        raise TypeError(
            f"selector '{selector}' is neither a key nor an attribute of {_describe(output)}; "
            f"{_SELECTOR_HINT}"
        )

    if callable(selector):
        return _checked(selector(output), output, selector)

    raise TypeError(
        f"selector must be None, an int, a str or a callable, got {type(selector).__name__}: "
        f"{selector!r}"
    )


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------


def _remove_handles(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class FeatureCapture:
    """Record the output (or input) of named submodules on every forward.

    Args:
        model: the model to hook.
        paths: dotted module paths (see :func:`resolve_module`).
        selector: how to pick a tensor when a module returns a tuple / dict / ModelOutput (see
            :func:`select_tensor`); one selector for all paths or a dict ``{path: selector}``
            (paths missing from the dict use ``None``).
        capture: ``"output"`` (forward hook) or ``"input"`` (forward pre-hook; the positional
            arguments are the output to select from, or the keyword arguments when the module
            was called with keywords only).

    ``features`` holds the tensors of the most recent forward of ``model``: it is emptied when
    ``model`` starts a forward. A module called several times in one forward keeps its last call.
    Tensors are not detached, so losses on student features backpropagate.

    Hooks are removed by :meth:`close`, on leaving a ``with`` block (also when an exception
    passes through), and when this object is garbage-collected; the hook closures hold no
    reference to it, so dropping the last reference is enough.
    """

    def __init__(
        self,
        model: nn.Module,
        paths: Sequence[str],
        *,
        selector: Selector | Mapping[str, Selector] = None,
        capture: Literal["output", "input"] = "output",
    ) -> None:
        if isinstance(paths, str):
            paths = [paths]
        paths = list(paths)
        if len(set(paths)) != len(paths):
            dupes = sorted({p for p in paths if paths.count(p) > 1})
            raise ValueError(f"FeatureCapture paths must be unique; repeated: {dupes}")
        if capture not in ("output", "input"):
            raise ValueError(f"capture must be 'output' or 'input', got {capture!r}")
        if isinstance(selector, Mapping):
            unknown = sorted(set(selector) - set(paths))
            if unknown:
                raise ValueError(
                    f"selector dict names paths that are not captured: {unknown}; "
                    f"captured paths: {paths}"
                )
            selectors = {p: selector.get(p) for p in paths}
        else:
            selectors = dict.fromkeys(paths, selector)

        modules = {p: resolve_module(model, p) for p in paths}

        self.paths: tuple[str, ...] = tuple(paths)
        self.capture = capture
        self._store: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        store = self._store
        handles = self._handles

        # emptied at the start of each model forward so a path skipped this time leaves no
        # stale tensor from an earlier batch
        handles.append(model.register_forward_pre_hook(_ClearStore(store), prepend=True))
        for path, module in modules.items():
            handles.append(_register(module, path, selectors[path], capture, store))
        self._finalizer = weakref.finalize(self, _remove_handles, handles)

    @property
    def features(self) -> dict[str, Tensor]:
        """``{path: tensor}`` from the most recent forward (a copy of the internal dict)."""
        return dict(self._store)

    def clear(self) -> None:
        """Forget the captured tensors (releases their autograd graphs)."""
        self._store.clear()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Remove all hooks; idempotent. Captured tensors stay readable."""
        self._finalizer()

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"FeatureCapture(paths={list(self.paths)}, capture={self.capture!r}, {state})"


class _ClearStore:
    """Forward pre-hook on the model: empties the store at the start of each forward."""

    def __init__(self, store: dict[str, Tensor] | None) -> None:
        self.store = store

    def __call__(self, _module: nn.Module, _args: Any) -> None:
        if self.store is not None:
            self.store.clear()

    def __getstate__(self) -> dict[str, Any]:
        # A pickled / deep-copied model takes its hooks along, but inert: the captured tensors
        # (non-leaf, not copyable) and the capture they fed belong to the original.
        return {**self.__dict__, "store": None}


class _Capture(_ClearStore):
    """Forward hook (or pre-hook, for inputs) writing the selected tensor into the store.

    A plain class rather than a closure, so a student that carries hooks (the hooks API
    between ``on_train_begin`` and ``close``) can still be pickled, saved and deep-copied.
    """

    def __init__(
        self, store: dict[str, Tensor], path: str, selector: Selector, capture: str
    ) -> None:
        super().__init__(store)
        self.path, self.selector, self.capture = path, selector, capture

    def __call__(self, _module: nn.Module, args: Any, extra: Any) -> Any:
        if self.store is None:
            return None
        if self.capture == "output":
            value = extra
        else:  # HF layers are often called as layer(hidden_states=...), with no positional args
            value = args if args or not extra else extra
        try:
            self.store[self.path] = select_tensor(value, self.selector)
        except TypeError as err:
            raise TypeError(f"FeatureCapture at '{self.path}' ({self.capture}): {err}") from err
        return None


class _CaptureAndElide(_Capture):
    """Forward pre-hook: records the module's first positional input, then hands the module that
    input with no tokens (the second-to-last axis cut to length 0), so it computes nothing.
    On a language model's lm_head: the hidden states are read, and no logits are computed."""

    def __call__(self, module: nn.Module, args: Any, kwargs: Any) -> Any:
        if self.store is None:
            return None
        if not args or not isinstance(args[0], Tensor) or args[0].dim() < 2:
            raise ValueError(
                f"'{self.path}': the module was called without a positional input tensor of "
                "at least 2 dims (hidden states [..., tokens, H]), so it cannot run on zero "
                f"tokens; got {_describe(args)}. A fused term reads the input of a head "
                "called as head(hidden_states)."
            )
        self.store[self.path] = args[0]
        return (args[0].narrow(-2, 0, 0), *args[1:]), kwargs


def _register(
    module: nn.Module, path: str, selector: Selector, capture: str, store: dict[str, Tensor]
) -> RemovableHandle:
    hook = _Capture(store, path, selector, capture)
    if capture == "output":
        return module.register_forward_hook(hook)
    return module.register_forward_pre_hook(hook, with_kwargs=True)


class StepCapture:
    """What fixed addresses of ``model`` read during one call at a time (what a training step
    reads): ``output, features = capture(forward, inputs)``.

    The addresses (:func:`parse_address`) are parsed and their modules resolved once, here.
    Each call registers one plain hook per module address, runs ``forward`` on ``inputs`` (a
    tensor, a tuple of positional arguments or a dict of keyword arguments), removes the hooks
    again (also when it raises), and reads the output-field addresses from the output; the
    model carries no hooks between calls. When an address reads ``output.hidden_states`` or
    ``output.attentions`` and ``model.forward`` takes ``output_hidden_states`` /
    ``output_attentions``, the call passes them as True (``call_kwargs``). ``features`` is a
    fresh ``{address: tensor}`` (not detached; a module called several times keeps its last
    call). Lighter per call than a :class:`FeatureCapture`, which also serves long-lived
    captures (a pre-hook emptying its store, a finalizer).

    ``elide`` names ``"module:input"`` addresses (no items) whose module, once its input is
    recorded, runs on zero tokens (the second-to-last axis of its first input cut to length 0):
    how a fused-linear term reads a language model's lm_head input while no logits are computed.
    """

    def __init__(
        self, model: nn.Module, addresses: Sequence[str], *, elide: Collection[str] = ()
    ) -> None:
        parsed = [parse_address(a) for a in addresses]
        for text in elide:
            a = parse_address(text)
            if text not in addresses or not a.input or a.items:
                raise ValueError(
                    f"StepCapture: elide={text!r} must be one of the captured addresses, of the "
                    f"form 'module{INPUT_MARKER}' (no items); captured: {list(addresses)}."
                )
        self.elide = frozenset(elide)
        self.modules = [
            (a.text, resolve_module(model, a.module), a.pick if a.items else None, a.input)
            for a in parsed
            if a.module is not None
        ]
        self.fields = [a for a in parsed if a.field is not None]
        check_attention_output(model, self.fields)
        accepted = _keywords(model)
        self.call_kwargs = {
            flag: True
            for flag in dict.fromkeys(a.output_flag for a in self.fields)
            if flag is not None and (accepted is None or flag in accepted)
        }

    def __call__(self, forward: Callable[..., Any], inputs: Any) -> tuple[Any, dict[str, Tensor]]:
        features: dict[str, Tensor] = {}
        handles = [
            module.register_forward_pre_hook(
                (_CaptureAndElide if text in self.elide else _Capture)(
                    features, text, selector, "input"
                ),
                with_kwargs=True,
            )
            if reads_input
            else module.register_forward_hook(_Capture(features, text, selector, "output"))
            for text, module, selector, reads_input in self.modules
        ]
        try:
            output = call_with(forward, inputs, self.call_kwargs)
        finally:
            for handle in handles:
                handle.remove()
        for address in self.fields:
            features[address.text] = address.read_output(output)
        return output, features


def call_with(forward: Callable[..., Any], inputs: Any, kwargs: Mapping[str, Any]) -> Any:
    """``forward(x, **kwargs)``, ``forward(*x, **kwargs)`` for a tuple/list, ``forward(**x,
    **kwargs)`` for a mapping."""
    if isinstance(inputs, Mapping):
        return forward(**inputs, **kwargs)
    if isinstance(inputs, (tuple, list)):
        return forward(*inputs, **kwargs)
    return forward(inputs, **kwargs)


def check_attention_output(model: nn.Module, fields: Sequence[Address]) -> None:
    """Refuse, at construction, to read ``output.attentions`` of a Hugging Face model whose
    attention implementation returns no probabilities (sdpa, flash)."""
    if not any(a.field == "attentions" for a in fields):
        return
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in (None, "eager"):
        raise ValueError(
            f"a term reads output.attentions of {type(model).__name__}, whose attention "
            f"implementation is {impl!r}: it returns no attention probabilities (only eager "
            "attention does). Load the model with attn_implementation='eager' (or call "
            "model.set_attn_implementation('eager')), or read the query/key projections "
            "(...attention.self.query / .key) with a transformer attention loss, which works "
            "with any implementation."
        )


def _keywords(model: nn.Module) -> set[str] | None:
    """The keyword names ``model.forward`` takes; None when it takes ``**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


# --------------------------------------------------------------------------------------------
# shape probing
# --------------------------------------------------------------------------------------------


def probe_shapes(
    model: nn.Module,
    paths: Sequence[str],
    example_input: Any,
    *,
    selector: Selector | Mapping[str, Selector] = None,
    capture: Literal["output", "input"] = "output",
) -> dict[str, torch.Size]:
    """Run one dry forward of ``model`` and return ``{path: feature shape}``.

    Without ``selector`` and ``capture``, ``paths`` may be any addresses (:func:`parse_address`:
    ``"m[1]"``, ``"m:input"``, ``"output.hidden_states[2]"``).

    ``example_input`` is a Tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict
    (``model(**x)``). The forward runs under ``torch.no_grad()`` in eval mode, so BatchNorm
    running statistics are not updated and Dropout is off; every submodule's train/eval flag is
    restored afterwards (also when the forward raises).

    Raises:
        ValueError: a path was not reached by the forward.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            if selector is None and capture == "output":  # any address (parse_address)
                features = StepCapture(model, paths)(model, example_input)[1]
            else:
                with FeatureCapture(model, paths, selector=selector, capture=capture) as cap:
                    call_with(model, example_input, {})
                    features = cap.features
    finally:
        for module, training in modes:
            module.training = training
    missing = [p for p in paths if p not in features]
    if missing:
        raise ValueError(
            f"modules {missing} of {type(model).__name__} were not called during the probe "
            f"forward, so their shapes are unknown; pick modules the forward actually runs "
            f"(kdkit.capture.list_modules(model) lists all)"
        )
    return {p: features[p].shape for p in paths}


# --------------------------------------------------------------------------------------------
# layer mapping for layer-wise distillation
# --------------------------------------------------------------------------------------------


def map_layers(
    student_pattern: str,
    teacher_pattern: str,
    num_student_layers: int,
    num_teacher_layers: int,
    strategy: Literal["uniform", "skip", "last"] = "uniform",
) -> list[tuple[str, str]]:
    """Pair student layers with teacher layers for layer-wise (hidden-state) distillation.

    Patterns are addresses (:func:`parse_address`) formatted with ``{i}`` = the 0-based layer
    index, e.g. ``"encoder.layer.{i}"`` (module outputs), except in a pattern reading
    ``output.hidden_states``, where ``{i}`` is the Hugging Face index of that layer's output,
    the layer index + 1 (``hidden_states[0]`` is the embedding output):
    ``map_layers("output.hidden_states[{i}]", "output.hidden_states[{i}]", 2, 4)`` gives
    ``[("output.hidden_states[1]", "output.hidden_states[2]"), ("output.hidden_states[2]",
    "output.hidden_states[4]")]``: the outputs of student layers 0, 1 and teacher layers 1, 3.
    ``output.attentions[{i}]`` is indexed by layer, as module paths are.
    With ``n`` student layers and ``N`` teacher layers:

    * ``"uniform"`` (TinyBERT's uniform mapping, Jiao et al. 2020): with 1-indexed layers,
      student layer ``m`` learns from teacher layer ``g(m) = m * N / n`` (every ``N / n``-th
      teacher layer, ending at the last). When ``n`` does not divide ``N``, ``g(m)`` is rounded
      to the nearest layer (ties to the even one, Python's ``round``), so the deepest teacher
      layer is always used and the others stay evenly spread. 0-indexed: 12 -> 6 gives teacher
      1, 3, 5, 7, 9, 11; 12 -> 4 gives 2, 5, 8, 11; 12 -> 5 gives 1, 4, 6, 9, 11. The same rule
      as :func:`pair_layers`, which applies it to lists of paths.
    * ``"skip"`` (PKD-Skip, Sun et al. 2019, "Patient Knowledge Distillation for BERT Model
      Compression"): the ``"uniform"`` pairs without the final one (the final layer is
      distilled through the logits), i.e. student layers ``0..n-2``.
      12 -> 6: student 0..4 <- teacher 1, 3, 5, 7, 9.
    * ``"last"`` (PKD-Last, same paper): the ``n - 1`` teacher layers just before the final one,
      ``N-n .. N-2``, paired with student layers ``0..n-2``. 12 -> 6: teacher 6, 7, 8, 9, 10.

    Returns:
        ``[(student_path, teacher_path), ...]`` in student-layer order.

    Raises:
        ValueError: non-positive counts, more student than teacher layers, fewer than two
            student layers for ``"skip"`` / ``"last"``, an unknown strategy, or a pattern
            without ``{i}``.
    """
    for name, value in (
        ("num_student_layers", num_student_layers),
        ("num_teacher_layers", num_teacher_layers),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    n, big_n = num_student_layers, num_teacher_layers
    if n > big_n:
        raise ValueError(
            f"num_student_layers ({n}) exceeds num_teacher_layers ({big_n}); a student layer "
            f"needs a distinct teacher layer to learn from. Swap the arguments if they are "
            f"reversed, or pair layers by hand."
        )
    for name, pattern in (
        ("student_pattern", student_pattern),
        ("teacher_pattern", teacher_pattern),
    ):
        if "{i}" not in pattern or {"{", "}"} & set(pattern.replace("{i}", "")):
            raise ValueError(
                f"{name} must contain '{{i}}' for the layer index and no other braces, got "
                f"{pattern!r} (e.g. 'encoder.layer.{{i}}')"
            )
    uniform = list(enumerate(_uniform_indices(big_n, n)))
    if strategy == "uniform":
        pairs = uniform
    elif strategy in ("skip", "last"):
        if n < 2:
            raise ValueError(
                f"strategy '{strategy}' pairs student layers 0..n-2 and so needs at least 2 "
                f"student layers, got num_student_layers={n}; use strategy='uniform'"
            )
        if strategy == "skip":
            pairs = uniform[:-1]
        else:
            pairs = [(j, big_n - n + j) for j in range(n - 1)]
    else:
        raise ValueError(f"strategy must be one of 'uniform', 'skip', 'last', got {strategy!r}")
    s_off, t_off = _hidden_offset(student_pattern), _hidden_offset(teacher_pattern)
    return [
        (student_pattern.format(i=s + s_off), teacher_pattern.format(i=t + t_off)) for s, t in pairs
    ]


def _hidden_offset(pattern: str) -> int:
    """1 for a pattern reading ``output.hidden_states`` (index 0 is the embeddings), else 0."""
    return int(pattern.startswith(f"{OUTPUT_PREFIX}hidden_states"))


def pair_layers(
    student_paths: Sequence[str],
    teacher_paths: Sequence[str],
    *,
    exclude_first_and_last: bool = False,
) -> tuple[list[str], list[str]]:
    """Pair two lists of layer paths for a feature term, shallowest to deepest.

    Lists of equal length pair in order. Otherwise the longer list is sampled down to the
    shorter one's length with :func:`map_layers`' ``"uniform"`` rule (TinyBERT's mapping,
    keeping the deepest layer): 12 -> 6 keeps layers 1, 3, 5, 7, 9, 11, 12 -> 5 keeps
    1, 4, 6, 9, 11 (0-indexed).

    ``exclude_first_and_last`` first drops the first and the last entry of each list, as the
    attention-transfer callback of the seed library does by default for lists of hidden states
    (the first is the embedding / stem output, the last feeds the logits, which other terms
    already match).
    """
    for name, paths in (("student_paths", student_paths), ("teacher_paths", teacher_paths)):
        if isinstance(paths, str):
            raise TypeError(
                f"pair_layers: {name} is the string {paths!r}; pass a list of layer paths, "
                f"e.g. [{paths!r}]."
            )
    student, teacher = list(student_paths), list(teacher_paths)
    if exclude_first_and_last:
        for name, paths in (("student", student), ("teacher", teacher)):
            if len(paths) < 3:
                raise ValueError(
                    f"exclude_first_and_last needs at least 3 {name} layers to keep one, got "
                    f"{paths}; list more layers or set exclude_first_and_last=False."
                )
        student, teacher = student[1:-1], teacher[1:-1]
    n = min(len(student), len(teacher))
    if n == 0:
        raise ValueError(
            f"cannot pair layers: student {student} and teacher {teacher} must both be "
            "non-empty; kdkit.capture.list_modules(model) lists the module paths."
        )

    def uniform(paths: list[str]) -> list[str]:
        return [paths[i] for i in _uniform_indices(len(paths), n)]

    return uniform(student), uniform(teacher)


def _uniform_indices(total: int, count: int) -> list[int]:
    """0-indexed layers ``g(m) - 1`` with ``g(m) = round(m * total / count)``, ``m = 1..count``.

    TinyBERT's uniform mapping (``g(m) = m * N / M`` when ``M`` divides ``N``); otherwise the
    nearest layer, ties to the even one. The last index is always ``total - 1``.
    """
    return [round(m * total / count) - 1 for m in range(1, count + 1)]
