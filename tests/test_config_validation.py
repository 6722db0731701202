"""`PacaConfig` and `paca.wrap` check every input up front, with messages naming the field,
the bad value and the fix; a refused wrap leaves the model untouched."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import paca
from paca.config import PacaConfig, PacaConfigError
from paca.layer import PacaLayer
from paca.selection import register_strategy, select_columns, validate_indices


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _refused(match: str, **kw) -> str:
    with pytest.raises(PacaConfigError, match=match) as err:
        PacaConfig(**kw)
    assert isinstance(err.value, TypeError) and isinstance(err.value, ValueError)
    return str(err.value)


@pytest.mark.parametrize("bad", [0, -3, True, False, 1.5, 8.0, "8", None, [8]])
def test_r_must_be_a_positive_int(bad):
    msg = _refused(r"PacaConfig\.r", r=bad)
    assert repr(bad) in msg and "r=8" in msg


@pytest.mark.parametrize("bad", ["abc", 1.5, "1", True, None, 2.0])
def test_seed_must_be_an_int(bad):
    msg = _refused(r"PacaConfig\.seed must be an int", seed=bad)
    assert repr(bad) in msg and "seed=0" in msg


def test_integer_like_values_are_accepted_as_plain_ints():
    np = pytest.importorskip("numpy")
    cfg = PacaConfig(r=np.int64(3), seed=torch.tensor(7), indices={"a": torch.tensor([4, 1])})
    assert cfg.r == 3 and type(cfg.r) is int and cfg.seed == 7 and type(cfg.seed) is int
    assert cfg.indices == {"a": [4, 1]} and all(type(i) is int for i in cfg.indices["a"])
    assert PacaConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    ("indices", "match"),
    [
        ({"a": [1.7, 2.2]}, r"indices\['a'\]\[0\] must be an int, got 1\.7.*not truncated"),
        ({"a": [1, 2.0]}, r"indices\['a'\]\[1\] must be an int, got 2\.0"),
        ({"a": "abc"}, r"indices\['a'\] must be a list of column indices, got 'abc'"),
        ({"a": [1, 1, 2]}, r"indices\['a'\] must be distinct.*repeats \[1\]"),
        ({"a": [-1, 2]}, r"indices\['a'\]\[0\] is -1.*>= 0"),
        ({"a": []}, r"indices\['a'\] is empty"),
        ({"a": [True, 2]}, r"indices\['a'\]\[0\] must be an int, got True"),
        ({"a": torch.tensor([1.0, 2.0])}, r"indices\['a'\] must hold ints.*float32"),
        ({"a": 3}, r"indices\['a'\] must be a list"),
        ({3: [1]}, r"indices keys must be qualified module names"),
        ([1, 2], r"PacaConfig\.indices must map module names to column lists"),
    ],
)
def test_indices_are_ints_distinct_and_never_truncated(indices, match):
    _refused(match, indices=indices)


def test_indices_beyond_the_layer_are_refused_at_wrap_naming_the_module():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'a' must lie in \[0, 8\).*\[9\] do not"):
        paca.wrap(model, PacaConfig(r=2, target_modules=["a"], indices={"a": [1, 9]}))
    assert not any(isinstance(m, PacaLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_strategy_returning_floats_is_refused_not_truncated():
    @register_strategy("_floaty")
    def _floaty(name, module, r, seed, n, **_):
        return [0.5 + i for i in range(r)]

    with pytest.raises(TypeError, match=r"'m': item 0 must be an int, got 0\.5"):
        select_columns("_floaty", "m", None, 2, 0, 8)
    with pytest.raises(TypeError, match="float32 tensor"):
        validate_indices(torch.tensor([0.0, 1.0]), 8, "m")


@pytest.mark.parametrize(
    ("field", "bad", "match"),
    [
        ("target_modules", [1, 2], r"target_modules must hold module names.*item 0 is 1 \(int\)"),
        ("target_modules", 5, r"target_modules must be a module name list.*got 5 \(int\)"),
        ("target_modules", [], r"target_modules is empty"),
        ("target_modules", "", r"target_modules is the empty string"),
        ("target_modules", ["all-linear", "q"], r"'all-linear' must be given\s+alone"),
        ("target_modules", ["q", ""], r"item 1 is '' \(str\)"),
        ("exclude_modules", 5, r"exclude_modules must be a module name list.*got 5"),
        ("exclude_modules", [None], r"exclude_modules must hold module names.*None"),
        ("modules_to_save", [3], r"modules_to_save must be a list of module names"),
        ("selection", 3, r"selection must be a strategy name.*got 3 \(int\)"),
        ("selection_options", [1], r"selection_options must be a dict"),
        ("selection_options", {"x": object()}, r"selection_options must be JSON values"),
        ("delta_dtype", "int8", r"delta_dtype must be one of"),
    ],
)
def test_other_fields_are_checked(field, bad, match):
    _refused(match, **{field: bad})


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
@pytest.mark.parametrize("pattern", ["(", "q_proj[", "*x"])
def test_invalid_regex_names_the_pattern_and_the_regex_error(field, pattern):
    try:
        re.compile(pattern)
    except re.error as e:
        reason = str(e)
    msg = _refused(rf"PacaConfig\.{field}=", **{field: pattern})
    assert repr(pattern) in msg and reason in msg and "re.escape" in msg


def test_assignment_is_checked_and_wrap_rechecks_mutated_lists():
    cfg = PacaConfig(r=2, target_modules=["a"])
    with pytest.raises(PacaConfigError, match=r"PacaConfig\.r"):
        cfg.r = "3"
    assert cfg.r == 2
    cfg.target_modules.append(7)  # bypasses __setattr__
    model = Net()
    with pytest.raises(PacaConfigError, match=r"item 1 is 7 \(int\)"):
        paca.wrap(model, cfg)
    assert not any(isinstance(m, PacaLayer) for m in model.modules())


def test_dataclass_api_and_json_round_trip_keep_working():
    cfg = PacaConfig(
        r=4, target_modules=("b", "a"), exclude_modules=r"x\.\d", seed=3,
        selection="weight_norm", selection_options={"largest": False},
        indices={"a": [5, 1]}, delta_dtype=None, modules_to_save="head",
    )  # fmt: skip
    assert cfg.target_modules == ["a", "b"] and cfg.modules_to_save == ["head"]
    d = cfg.to_dict()
    assert d["peft_type"] == "PACA"
    assert PacaConfig.from_dict(d) == cfg
    assert PacaConfig.from_json(cfg.to_json()) == cfg
    assert PacaConfig(target_modules=None).target_modules == "all-linear"
    with pytest.raises(PacaConfigError, match=r"unknown PacaConfig field\(s\) \['rank'\]"):
        PacaConfig.from_dict({"rank": 4})
    with pytest.raises(PacaConfigError, match="expects a dict"):
        PacaConfig.from_dict([("r", 4)])  # type: ignore[arg-type]
    with pytest.raises(PacaConfigError, match="not valid JSON"):
        PacaConfig.from_json("{r: 4")
    with pytest.raises(PacaConfigError, match=r"PacaConfig\.seed"):
        PacaConfig.from_dict({"seed": "1"})


def test_torch_dtype_is_accepted_for_delta_dtype_and_saved_as_a_name():
    assert PacaConfig(delta_dtype=torch.bfloat16).delta_dtype == "bfloat16"


# --- wrap's own arguments ------------------------------------------------------------
@pytest.mark.parametrize("name", ["", "a.b", "1x", "a-b", "a b", 5, None])
def test_adapter_names_must_be_identifiers(name):
    model = Net()
    with pytest.raises(PacaConfigError, match="valid Python identifier") as err:
        paca.wrap(model, PacaConfig(r=2), adapter_name=name)
    assert repr(name) in str(err.value) and "'task_2'" in str(err.value)
    assert not any(isinstance(m, PacaLayer) for m in model.modules())
    pm = paca.wrap(model, PacaConfig(r=2))
    with pytest.raises(PacaConfigError, match="valid Python identifier"):
        pm.add_adapter(name, PacaConfig(r=2))  # type: ignore[arg-type]
    with pytest.raises(PacaConfigError, match="valid Python identifier"):
        pm.load_adapter("/nonexistent", name)  # type: ignore[arg-type]
    assert list(pm.paca_configs) == ["default"]


@pytest.mark.parametrize("bad", [123, 1.5, object(), ["cpu"]])
def test_backend_must_be_a_name_or_a_backend(bad):
    model = Net()
    with pytest.raises(PacaConfigError, match=r"backend must be a backend name.*Backend instance"):
        paca.wrap(model, PacaConfig(r=2), backend=bad)
    assert not any(isinstance(m, PacaLayer) for m in model.modules())
    pm = paca.wrap(model, PacaConfig(r=2))
    with pytest.raises(PacaConfigError, match=r"to_backend\(backend\) must be a backend name"):
        pm.to_backend(bad)


def test_a_backend_class_instead_of_an_instance_says_so():
    cls = type(paca.get_backend())
    with pytest.raises(PacaConfigError, match=rf"class {cls.__name__}, not an instance.*'cpu'"):
        paca.wrap(Net(), PacaConfig(r=2), backend=cls)
    pm = paca.wrap(Net(), PacaConfig(r=2), backend=paca.get_backend())  # an instance works
    assert pm.backend is paca.get_backend()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"config": {"r": 2}}, r"config must be a paca\.PacaConfig.*PacaConfig\.from_dict"),
        ({"config": 8}, r"config must be a paca\.PacaConfig or None, got int"),
        ({"move_to_device": "yes"}, r"move_to_device must be True or False"),
        ({"loss_fn": 3}, r"loss_fn must be callable"),
        ({"calibration": torch.zeros(2, 8)}, r"calibration must be an iterable of batches"),
        ({"calibration": 5}, r"calibration must be an iterable of batches"),
    ],
)
def test_wrap_arguments_are_checked(kwargs, match):
    model = Net()
    with pytest.raises(PacaConfigError, match=match):
        paca.wrap(model, **kwargs)
    assert not any(isinstance(m, PacaLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_wrap_refuses_a_non_module():
    with pytest.raises(PacaConfigError, match=r"model must be a torch\.nn\.Module, got dict"):
        paca.wrap({"a": 1})  # type: ignore[arg-type]


def test_unknown_strategy_is_refused_before_any_layer_is_replaced():
    model = Net()
    with pytest.raises(ValueError, match=r"unknown PaCA selection strategy 'norm'.*weight_norm"):
        paca.wrap(model, PacaConfig(r=2, selection="norm"))
    assert not any(isinstance(m, PacaLayer) for m in model.modules())
    # with every module's indices given, no strategy runs: a saved adapter still loads
    cfg = PacaConfig(r=2, selection="gone", target_modules=["a"], indices={"a": [0, 1]})
    assert paca.wrap(Net(), cfg).model.a.paca_idx["default"].tolist() == [0, 1]


def test_excluded_targets_do_not_warn_as_misspelled(recwarn):
    paca.wrap(Net(), PacaConfig(r=2, target_modules=["a", "b"], exclude_modules=["b"]))
    assert not [w for w in recwarn if "matched no module" in str(w.message)]


# --- property: any value either builds a JSON-round-tripping config or a clear error ------
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

_ANY = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 40)
    | st.floats(allow_nan=True)
    | st.text(max_size=6)
    | st.sampled_from(["all-linear", "(", "a|b", "q_proj", r"x\.\d"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    field=st.sampled_from(
        [
            "r",
            "seed",
            "target_modules",
            "exclude_modules",
            "selection",
            "indices",
            "selection_options",
            "delta_dtype",
            "modules_to_save",
        ]
    ),  # fmt: skip
    value=_ANY,
)
def test_any_value_gives_a_config_or_a_field_naming_error(field, value):
    try:
        cfg = PacaConfig(**{field: value})
    except PacaConfigError as e:
        assert f"PacaConfig.{field}" in str(e)
        return
    assert PacaConfig.from_json(cfg.to_json()) == cfg
    if field in {"r", "seed"}:
        assert type(getattr(cfg, field)) is int and getattr(cfg, field) == value
