"""The one strict JSON reader of patient records (CLI and HTTP alike): hostile documents get one clean line."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from client.recommender import RecommenderInputError, read_patient
from fednano.cli import app
from shared import strict_json
from tests.test_recommender import example_dict, write_json


@pytest.fixture
def cli_policy(monkeypatch):
    """The CLI with a stand-in policy: these records are refused before any policy is asked."""
    import client.recommender

    monkeypatch.setattr(client.recommender, "load_policy", lambda bundle, trust: object())
    return ["recommend", "--policy", "bundle", "--trust", "key.pub"]


@pytest.mark.parametrize(("text", "expected"), [
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 64 levels"),
    ('{"age_years": ' + "6" * 5000 + "}", "key 'age_years': a number of 5000 digits; at most 40"),
    ('{"age_years": 1e400}', "key 'age_years': a number too large for a double"),
    ('{"catalogue": ["NP00", -Infinity]}', "key 'catalogue': -Infinity is not a JSON number"),
])
def test_hostile_json_is_refused_with_one_line_and_no_traceback(tmp_path, cli_policy, text, expected):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(RecommenderInputError) as info:
        read_patient(path)
    assert len(info.value.lines) == 1 and info.value.lines[0].startswith(f"{path}: {expected}")
    result = CliRunner().invoke(app, [*cli_policy, "--patient", str(path)])
    assert result.exit_code == 1 and result.stderr.startswith(f"error: {path}: {expected}")
    assert "Traceback" not in result.output


def test_a_record_with_50000_keys_is_read_in_linear_time(tmp_path):
    record = example_dict() | {f"k{i}": i for i in range(50_000)}
    path = write_json(tmp_path / "p.json", record)
    started = time.perf_counter()
    with pytest.raises(RecommenderInputError) as info:
        read_patient(path)
    assert time.perf_counter() - started < 5  # was 35 s: the duplicate-key check was quadratic
    assert info.value.lines[0] == f"{path}: field k0: Extra inputs are not permitted"
    assert len(info.value.lines) == 21 and info.value.lines[-1] == f"{path}: ... and 49980 more problems"
    repeated = tmp_path / "repeated.json"
    repeated.write_text(path.read_text()[:-1] + ', "k49999": 0}')
    started = time.perf_counter()
    with pytest.raises(RecommenderInputError, match="key 'k49999' appears more than once"):
        read_patient(repeated)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize(("text", "expected"), [
    ('{"a": 1, "a": 2}', "key 'a' appears more than once in one object"),
    ('{"a": [1, [2, NaN]]}', "key 'a': NaN is not a JSON number"),
    ('[1e400]', "a number too large for a double"),
    ('{"a": {"b": -1e999}}', "key 'b': a number too large for a double"),
    ('{"' + "x" * 500 + '": 1, "' + "x" * 500 + '": 2}', "key 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...'"),
])
def test_strict_json_names_the_key_and_never_repeats_a_long_one(text, expected):
    with pytest.raises(strict_json.StrictJsonError) as info:
        strict_json.loads(text)
    assert str(info.value).startswith(expected) and len(str(info.value)) < 200


def test_strict_json_keeps_ordinary_documents_and_brackets_inside_strings():
    text = '{"note": "' + "[" * 100 + '", "values": [1, 2.5, -3e-7, null, true], "nested": {"a": {"b": []}}}'
    assert strict_json.loads(text) == {"note": "[" * 100, "values": [1, 2.5, -3e-7, None, True],
                                       "nested": {"a": {"b": []}}}
