"""Fake HPU graphs (mirrors the bridge's ``hpu/graphs.py``).

No graph is compiled or replayed: every call still runs the Python module, so outputs
are always correct. What is emulated is the *bookkeeping* and the user-visible contract:

* ``wrap_in_hpu_graph(module, asynchronous=False, disable_tensor_cache=False,
  dry_run=False, max_graphs=None)`` replaces ``module.forward``; the first call per input
  signature records ``("graph_capture", key)``, later ones ``("graph_replay", key)``; when
  ``max_graphs`` graphs are cached, new signatures run un-graphed (``("graph_bypass",
  key)``). ``bypass_hpu_graphs=True`` / ``warmup_mode=True`` kwargs are popped like the
  real ones. Adds ``module.clear_cache()`` and ``module.clear_inputs()``.
  Like the real replay, the returned outputs are the tensors returned by the capture call,
  refreshed in place (``FAKE_HPU_GRAPH_ALIAS_OUTPUTS=0`` turns that off): keeping a
  reference to an earlier output and calling again with the same shapes overwrites it.
* ``ModuleCacher(max_graphs=10)(model, use_lfu=False, inplace=True, ...)``: graphs only
  while ``model.training and torch.is_grad_enabled() and use_lazy_mode`` where
  ``use_lazy_mode = os.environ.get("PT_HPU_LAZY_MODE", "1") == "1"`` read in ``__init__``
  -- literally the bridge's check (gaudi-facts.md section 3; note its "1" default even
  under SW >= 1.21, listed as unconfirmed there). Gradients are real (the module runs).
* ``HPUGraph`` / ``graph`` / ``make_graphed_callables``: record events; replay of a raw
  ``HPUGraph`` re-executes nothing.

HPU graphs are lazy-mode only (docs; gaudi-facts.md section 3): using them in eager mode
warns.
"""

import collections
import copy
import inspect
import itertools
import os
import warnings
from functools import wraps

import torch

from habana_frameworks import _fake_config, _fake_events
from habana_frameworks.torch.utils.internal import is_lazy

from . import streams as _streams

__all__ = [
    "HPUGraph",
    "graph",
    "make_graphed_callables",
    "wrap_in_hpu_graph",
    "wrap_in_hpu_graph_func",
    "ModuleCacher",
    "input_hash",
    "is_current_stream_capturing",
]

_graph_ids = itertools.count()


def _warn_if_eager(what):
    if not is_lazy():
        warnings.warn(
            f"{what}: HPU graphs are a lazy-mode feature (PT_HPU_LAZY_MODE=1); "
            "in eager/torch.compile mode they are not supported. [fake Gaudi SDK]",
            UserWarning,
            stacklevel=3,
        )


def _autocast_enabled():
    from habana_frameworks.torch import hpu

    return hpu.is_autocast_hpu_enabled()


def _signature(obj):
    """Hashable description of an input structure (shapes, dtypes, strides, values)."""
    if isinstance(obj, (dict, collections.UserDict)):
        return ("dict", tuple((k, _signature(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return tuple(_signature(el) for el in obj)
    if torch.is_tensor(obj):
        return ("tensor", tuple(obj.shape), str(obj.dtype), tuple(obj.stride()))
    hash(obj)  # unhashable non-tensor inputs fail like the real input_hash
    return obj


def input_hash(obj):
    """Real: hash of shapes, view hashes and the autocast state."""
    return hash((_signature(obj), _autocast_enabled()))


def _key(owner, inputs):
    return (type(owner).__name__, (_signature(inputs), _autocast_enabled()))


def copy_to(dst, src):
    if type(dst) is not type(src):
        raise RuntimeError(f"HPU graph replay: output type changed ({type(dst)} -> {type(src)})")
    if isinstance(dst, dict):
        for (dk, dv), (sk, sv) in zip(dst.items(), src.items(), strict=True):
            assert dk == sk
            copy_to(dv, sv)
    elif isinstance(dst, (list, tuple)) and not isinstance(dst, torch.Size):
        for d, s in zip(dst, src, strict=True):
            copy_to(d, s)
    elif torch.is_tensor(dst):
        if dst.shape != src.shape:
            raise RuntimeError(
                "HPU graph replay produced an output of a different shape than the capture "
                f"({tuple(dst.shape)} vs {tuple(src.shape)}): data-dependent output shapes "
                "cannot be graphed. [fake Gaudi SDK]"
            )
        with torch.no_grad():
            dst.copy_(src)


class HPUGraph:
    """Recorder stand-in for the real ``HPUGraph`` (``replay`` re-executes nothing)."""

    def __init__(self):
        self.id = next(_graph_ids)
        self.captured = False
        self.replays = 0

    def capture_begin(self, dry_run=False):
        _warn_if_eager("HPUGraph.capture_begin")
        _fake_events.record("hpu_graph_capture_begin", self.id)

    def capture_end(self):
        self.captured = True
        _fake_events.record("hpu_graph_capture_end", self.id)

    def replay(self, asynchronous=False):
        if not self.captured:
            raise RuntimeError("HPUGraph.replay() called before capture_end()")
        self.replays += 1
        _fake_events.record("hpu_graph_replay", self.id)

    def replayV2(self, static_tlist, tlist, asynchronous=False):
        self.replay(asynchronous)

    def replayV3(self, tlistI, asynchronous=False):
        self.replay(asynchronous)

    def clear_inputs(self):
        return None

    def mark_user_outputs(self, static_tlist):
        return None

    def mark_user_inputs(self, static_tlist):
        return None

    def get_user_input_match_indices(self):
        return []

    def reset(self):
        self.captured = False


class graph:  # noqa: N801 - real name
    """Context manager capturing into ``hpu_graph`` (fake: records begin/end)."""

    default_capture_stream = None

    def __init__(self, hpu_graph, stream=None, dry_run=False):
        if self.__class__.default_capture_stream is None:
            self.__class__.default_capture_stream = _streams.Stream()
        self.capture_stream = stream if stream is not None else self.default_capture_stream
        self.hpu_graph = hpu_graph
        self.dry_run = dry_run
        self._ctx = None

    def __enter__(self):
        self._ctx = _streams.stream(self.capture_stream)
        self._ctx.__enter__()
        self.capture_stream.is_capture = True
        self.hpu_graph.capture_begin(self.dry_run)

    def __exit__(self, exc_type, exc_value, tb):
        self.hpu_graph.capture_end()
        self.capture_stream.is_capture = False
        self._ctx.__exit__(exc_type, exc_value, tb)


def make_graphed_callables(
    callables,
    sample_args,
    warmups=0,
    allow_unused_input=False,
    asynchronous=False,
    disable_tensor_cache=False,
    dry_run=False,
):
    """Fake: returns the callables unchanged (they run eagerly); records the call."""
    _warn_if_eager("make_graphed_callables")
    single = not isinstance(callables, tuple)
    n = 1 if single else len(callables)
    _fake_events.record("make_graphed_callables", n)
    return callables


def is_current_stream_capturing():
    return getattr(_streams.current_stream(), "is_capture", False)


def _wrapped_forward(cache, orig_fwd, owner, args, kwargs, max_graphs):
    warmup_mode = kwargs.pop("warmup_mode", False)
    if kwargs.pop("bypass_hpu_graphs", False):
        _fake_events.record("graph_bypass", _key(owner, (args, kwargs)))
        return orig_fwd(*args, **kwargs)
    kwargs.pop("cache_tensors_list", None)
    key = _key(owner, (args, kwargs))
    if key not in cache:
        if max_graphs is not None and len(cache) == max_graphs:
            _fake_events.record("graph_bypass", key)
            return orig_fwd(*args, **kwargs)
        outputs = orig_fwd(*args, **kwargs)
        cache[key] = outputs
        _fake_events.record("graph_capture", key)
        return outputs
    _fake_events.record("graph_replay", key)
    static = cache[key]
    if warmup_mode:
        return static
    if torch.is_grad_enabled() and getattr(owner, "training", False):
        warnings.warn(
            "wrap_in_hpu_graph replay with autograd enabled in training mode: real HPU graphs "
            "from wrap_in_hpu_graph do not propagate gradients (use ModuleCacher for "
            "training). [fake Gaudi SDK]",
            UserWarning,
            stacklevel=4,
        )
    if not _fake_config.GRAPH_ALIAS_OUTPUTS:
        return orig_fwd(*args, **kwargs)
    with torch.no_grad():
        fresh = orig_fwd(*args, **kwargs)
    copy_to(static, fresh)
    return static


def wrap_in_hpu_graph_func(
    func, asynchronous=False, disable_tensor_cache=False, dry_run=False, max_graphs=None
):
    """Function flavour of :func:`wrap_in_hpu_graph`."""
    _warn_if_eager("wrap_in_hpu_graph_func")
    cache = {}

    def forward(*args, **kwargs):
        return _wrapped_forward(cache, func, func, args, kwargs, max_graphs)

    return forward


def wrap_in_hpu_graph(
    module, asynchronous=False, disable_tensor_cache=False, dry_run=False, max_graphs=None
):
    """Wrap ``module.forward`` in (fake) HPU-graph capture/replay; returns ``module``."""
    _warn_if_eager("wrap_in_hpu_graph")
    env_tensor_cache = os.environ.get("PT_HPUGRAPH_DISABLE_TENSOR_CACHE")
    if env_tensor_cache is not None:
        disable_tensor_cache = env_tensor_cache == "1"
    _fake_events.record("wrap_in_hpu_graph", type(module).__name__)
    cache = {}
    orig_fwd = module.forward

    @wraps(orig_fwd)
    def forward(*args, **kwargs):
        return _wrapped_forward(cache, orig_fwd, module, args, kwargs, max_graphs)

    module.forward = forward

    def clear_cache():
        cache.clear()

    def clear_inputs():
        return None

    module.clear_cache = clear_cache
    module.clear_inputs = clear_inputs
    module._fake_hpu_graph_cache = cache
    module._fake_hpu_graph_options = {
        "asynchronous": asynchronous,
        "disable_tensor_cache": disable_tensor_cache,
        "dry_run": dry_run,
        "max_graphs": max_graphs,
    }
    return module


def _forward_params(function):
    params = collections.OrderedDict(inspect.signature(function).parameters)
    unsupported = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL)
    out = collections.OrderedDict()
    for key, p in params.items():
        assert p.kind not in unsupported, f"Unsupported argument type : {p.kind}"
        if p.kind == inspect.Parameter.VAR_KEYWORD:
            continue
        out[key] = p.default
    return out


class ModuleCacher(torch.nn.Module):
    """Fake training HPU-graph cacher: ``ht.hpu.ModuleCacher(max_graphs)(model=model, ...)``."""

    def __init__(self, max_graphs=10):
        super().__init__()
        self.max_graphs = max_graphs
        self.model_dict = {}
        self.cached_hits_dict = {}
        self.uncached_train_hits = 0
        self.uncached_eval_hits = 0
        self.iteration_cnt = -1
        self.forward_cnt = 0
        self.is_capturing = False
        self.hpugraph_tracing = False
        # Literally the bridge's check (not is_lazy()): default "1".
        self.use_lazy_mode = os.environ.get("PT_HPU_LAZY_MODE", "1") == "1"
        self.disable_tensor_cache = False
        self.dry_run = False
        self.inplace = True

    def set_iteration_count(self, iter_num):
        self.forward_cnt = iter_num

    def is_hpugraph_tracing(self):
        return self.hpugraph_tracing

    def capture_start(self):
        self.is_capturing = True

    def capture_end(self):
        self.is_capturing = False

    def forward(self, *args, **kwargs):
        self.iteration_cnt += 1
        model = self.__dict__["_fake_model"]
        use_cache = model.training and torch.is_grad_enabled() and self.use_lazy_mode
        if use_cache:
            key = _key(model, (args, kwargs))
            if key in self.model_dict:
                self.cached_hits_dict[key] = self.cached_hits_dict.get(key, 0) + 1
                _fake_events.record("graph_replay", key)
                return model.orig_forward(*args, **kwargs)
            if len(self.model_dict) < self.max_graphs:
                self.hpugraph_tracing = True
                try:
                    out = model.orig_forward(*args, **kwargs)
                finally:
                    self.hpugraph_tracing = False
                self.model_dict[key] = True
                self.cached_hits_dict[key] = 1
                _fake_events.record("graph_capture", key)
                return out
            _fake_events.record("graph_bypass", key)
        if model.training:
            self.uncached_train_hits += 1
        else:
            self.uncached_eval_hits += 1
        return model.orig_forward(*args, **kwargs)

    def __call__(
        self,
        model,
        use_lfu=False,
        inplace=True,
        allow_unused_input=False,
        asynchronous=False,
        have_grad_accumulation=False,
        log_frequency=100,
        verbose=False,
        disable_tensor_cache=False,
        dry_run=False,
    ):
        if isinstance(
            model, (torch.nn.parallel.DataParallel, torch.nn.parallel.DistributedDataParallel)
        ):
            raise AssertionError(
                "Use DataParallel/DistributedDataParallel only after wrapping with ModuleCacher"
            )
        _warn_if_eager("ModuleCacher")
        _fake_events.record("module_cacher", type(model).__name__)
        self.inplace = inplace
        if not inplace:
            model = copy.copy(model)
        model.is_hpugraph_tracing = self.is_hpugraph_tracing
        self.forward_params = _forward_params(model.forward)
        # Kept out of nn.Module registration to avoid a reference cycle in state_dict().
        self.__dict__["_fake_model"] = model
        self.use_lfu = use_lfu
        self.allow_unused_input = allow_unused_input
        self.asynchronous = asynchronous
        self.have_grad_accumulation = have_grad_accumulation
        self.verbose = verbose
        self.log_frequency = log_frequency
        env_tensor_cache = os.environ.get("PT_HPUGRAPH_DISABLE_TENSOR_CACHE")
        self.disable_tensor_cache = (
            disable_tensor_cache if env_tensor_cache is None else env_tensor_cache == "1"
        )
        env_dry_run = os.environ.get("PT_HPUGRAPH_ENABLE_DRY_RUN")
        self.dry_run = dry_run if env_dry_run is None else env_dry_run == "1"
        model.orig_forward = model.forward
        model.forward = self.forward
        model.set_iteration_count = self.set_iteration_count
        model.capture_start = self.capture_start
        model.capture_end = self.capture_end
        return model
