"""The one typed configuration builder (``typed_config``): values checked against field types,
numeric strings accepted where YAML makes them, errors naming source, field, type and value,
unknown keys with a suggestion, overrides blamed for their own mistakes."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

import pytest

import typed_config
from typed_config import ConfigError


@dataclass
class Inner:
    rate: float = 0.1
    steps: int = 10
    name: str = "x"
    flag: bool = False


@dataclass
class Root:
    inner: Inner = field(default_factory=Inner)
    betas: tuple[float, float] = (0.9, 0.95)
    profile: tuple[int, ...] = ()
    horizons: list[int] = field(default_factory=lambda: [96])
    resources: dict[str, float] = field(default_factory=dict)
    free: dict[str, Any] = field(default_factory=dict)
    uri: str | None = None


@pytest.mark.parametrize("data, expected", [
    ({"inner": {"rate": "1e-2"}}, ("inner", "rate", 0.01)),        # YAML 1.1 reads 1e-2 as a string
    ({"inner": {"rate": 1}}, ("inner", "rate", 1.0)),
    ({"inner": {"steps": "64"}}, ("inner", "steps", 64)),          # a quoted number
    ({"inner": {"steps": 64.0}}, ("inner", "steps", 64)),
    ({"inner": {"steps": "1e3"}}, ("inner", "steps", 1000)),
])
def test_numbers_are_coerced_to_the_field_type(data, expected):
    cfg = typed_config.build(Root, data, "f.yaml")
    section, key, value = expected
    got = getattr(getattr(cfg, section), key)
    assert got == value and type(got) is type(value)


def test_containers_and_optionals():
    cfg = typed_config.build(Root, {"betas": ["0.8", 0.9], "profile": [3, "5"], "horizons": [96, 192],
                                    "resources": {"trainer": 1}, "free": {"anything": [1, "a"]}, "uri": None})
    assert cfg.betas == (0.8, 0.9) and cfg.profile == (3, 5) and cfg.horizons == [96, 192]
    assert cfg.resources == {"trainer": 1.0} and isinstance(cfg.resources["trainer"], float)
    assert cfg.free == {"anything": [1, "a"]} and cfg.uri is None
    assert typed_config.build(Root, {"uri": "http://h"}).uri == "http://h"
    assert typed_config.build(Root, None) == Root()


@pytest.mark.parametrize("data, message", [
    ({"inner": {"rate": "fast"}}, "f.yaml: inner.rate: expected float, got 'fast' (str)"),
    ({"inner": {"steps": 1.5}}, "f.yaml: inner.steps: expected int, got 1.5 (float)"),
    ({"inner": {"steps": True}}, "f.yaml: inner.steps: expected int, got True (bool)"),
    ({"inner": {"flag": "yes"}}, "f.yaml: inner.flag: expected bool, got 'yes' (str): write true or false"),
    ({"inner": {"flag": 1}}, "f.yaml: inner.flag: expected bool, got 1 (int)"),
    ({"inner": {"name": 2024}}, "f.yaml: inner.name: expected str, got 2024 (int): quote it in YAML"),
    ({"betas": [0.9]}, "f.yaml: betas: expected tuple[float, float], got [0.9] (list): 2 items needed"),
    ({"horizons": 96}, "f.yaml: horizons: expected list[int], got 96 (int)"),
    ({"horizons": [96, "long"]}, "f.yaml: horizons[1]: expected int, got 'long' (str)"),
    ({"resources": {"trainer": "one"}}, "f.yaml: resources.trainer: expected float, got 'one' (str)"),
    ({"inner": [1, 2]}, "f.yaml: inner: expected a mapping of keys, got [1, 2] (list)"),
    ({"uri": 5}, "f.yaml: uri: expected str or null, got 5 (int)"),
    ({"inner": {"rtae": 0.1}}, "f.yaml: unknown key 'rtae' in section 'inner' (did you mean 'rate'?)"),
    ({"bogus": 1}, "f.yaml: unknown key 'bogus' in section 'root'; known: inner, betas"),
])
def test_bad_values_name_source_field_type_and_value(data, message):
    with pytest.raises(ConfigError) as err:
        typed_config.build(Root, data, "f.yaml")
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_load_blames_the_file_or_the_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner: {rate: 3e-4, steps: 7}\n")
    cfg = typed_config.load(Root, path, ["inner.steps=20", "free.new_key=3", "betas=[0.5, 0.6]"])
    assert (cfg.inner.rate, cfg.inner.steps, cfg.free, cfg.betas) == (3e-4, 20, {"new_key": 3}, (0.5, 0.6))
    with pytest.raises(ConfigError, match=r"override 'inner.stepz=3': unknown key 'stepz' in section 'inner' \(did you mean 'steps'\?\)"):
        typed_config.load(Root, path, ["inner.stepz=3"])
    with pytest.raises(ConfigError, match=r"override 'inner.steps=lots': inner.steps: expected int"):
        typed_config.load(Root, path, ["inner.steps=lots"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        typed_config.load(Root, path, ["inner.steps"])
    path.write_text("inner: {rate: quick}\n")
    with pytest.raises(ConfigError, match=f"{path}: inner.rate: expected float"):
        typed_config.load(Root, path, ["inner.steps=20"])
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        typed_config.load(Root, path)
    with pytest.raises(ConfigError, match="does not exist"):
        typed_config.load(Root, tmp_path / "missing.yaml")


def test_yaml_round_trip_is_exact(tmp_path):
    cfg = typed_config.build(Root, {"betas": [0.8, 0.9], "profile": [2, 4], "inner": {"rate": "1e-5"}})
    path = tmp_path / "r.yaml"
    path.write_text(typed_config.to_yaml(cfg))
    assert typed_config.load(Root, path) == cfg


@dataclass
class WithLiteral:
    method: "typing.Literal['zscore', 'max']" = "zscore"


def test_literal_fields_take_one_of_their_values():
    import preprocessing.config as pc

    assert pc.config_from_dict({"normalize": {"method": "max"}}).normalize.method == "max"
    with pytest.raises(ConfigError, match=r"normalize.method: expected one of 'zscore', 'max', 'none', got 'mean'"):
        pc.config_from_dict({"normalize": {"method": "mean"}}, "pre.yaml")
    # the case: val_fraction written 1e-2 in YAML reaches the job as a float
    assert pc.config_from_dict({"pack": {"val_fraction": "1e-2"}}).pack.val_fraction == 0.01


def test_every_shipped_config_loads_with_its_typed_class():
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.quickstart.config import load_quickstart_config
    from pipeline.scaling_laws.sweep import SweepConfig

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 8
    for path in configs:
        if path.name.startswith("quickstart"):
            qs = load_quickstart_config(path)
            load_config(qs.train.config, qs.train.overrides)
        elif path.name.startswith("sweep"):
            SweepConfig.from_yaml(path)
        else:
            load_config(path)


def test_quickstart_config_errors_name_the_file(tmp_path):
    from pipeline.quickstart.config import load_quickstart_config

    path = tmp_path / "qs.yaml"
    path.write_text("eval: {stride: often}\n")
    with pytest.raises(ConfigError, match=f"{path}: eval.stride: expected int, got 'often'"):
        load_quickstart_config(path)
    path.write_text("preprocess: {pack: {val_fraction: 1e-2}}\neval: {workers: 2}\n")
    qs = load_quickstart_config(path)
    assert qs.preprocess.pack.val_fraction == 0.01 and qs.eval.workers == 2


@pytest.mark.parametrize("text, expected", [
    ("http://alice:pw0rd@host:5000/api", "http://alice:***@host:5000/api"),
    ("postgresql+psycopg2://u:p%40ss@db/mlflow", "postgresql+psycopg2://u:***@db/mlflow"),
    ("tracking_uri: https://bob:x@h\nother: s3://bucket/key", "tracking_uri: https://bob:***@h\nother: s3://bucket/key"),
    ("https://h/p?token=abc&x=1", "https://h/p?token=***&x=1"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Signature=f00&X-Amz-Expires=60", "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Expires=60"),
    ("http://127.0.0.1:5000 and sqlite:////tmp/a.db", "http://127.0.0.1:5000 and sqlite:////tmp/a.db"),  # nothing to hide
])
def test_secrets_in_uris_are_redacted(text, expected):
    assert typed_config.redact_secrets(text) == expected


def test_config_text_and_mlflow_params_hide_credentials_but_the_config_keeps_them():
    from pipeline.config import load_config

    cfg = load_config(None, ["tracking.tracking_uri=http://alice:pw0rd@h:5000"])
    assert cfg.tracking.tracking_uri == "http://alice:pw0rd@h:5000"  # still usable
    assert "pw0rd" not in cfg.to_yaml() and "alice:***@h" in cfg.to_yaml()
    assert cfg.flat()["tracking.tracking_uri"] == "http://alice:***@h:5000"
