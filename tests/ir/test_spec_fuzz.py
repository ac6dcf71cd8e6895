"""Hypothesis fuzzes the loader: random and mutated specs never raise anything but SpecError."""

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.ir.test_spec import BASE
from trainplan.errors import SpecError
from trainplan.ir.loading import validate
from trainplan.ir.spec import Spec

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "a100-80g", "gpt", "1f1b", "bf16", "40 GiB", "lm", "sgd"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))


ALL_PATHS = list(_paths(BASE))


def _mutate(data, path, value, delete):
    node = data
    for key in path[:-1]:
        node = node[key]
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return data


def _check(data):
    try:
        validate(Spec, data, "fuzz.yaml")
    except SpecError as exc:
        text = str(exc)
        assert text.startswith("fuzz.yaml") and "Traceback" not in text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_PATHS), values, st.booleans())
def test_mutated_specs_fail_only_with_spec_errors(path, value, delete):
    _check(_mutate(copy.deepcopy(BASE), path, value, delete))


@settings(max_examples=200, deadline=None)
@given(values)
def test_random_documents_fail_only_with_spec_errors(doc):
    _check(doc)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(ALL_PATHS), st.text(max_size=10), values)
def test_unknown_keys_are_reported(path, key, value):
    data = copy.deepcopy(BASE)
    parent = data
    for k in path:
        if not isinstance(parent.get(k), dict):
            break
        parent = parent[k]
    parent[key] = value
    _check(data)
