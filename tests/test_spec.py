"""Model specs, presets and the summary table."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from cnnlab.config import config_from_dict, load_config
from cnnlab.errors import ConfigError, SpecError
from cnnlab.spec import PRESETS, ConvBlock, FcBlock, ModelSpec, count_params, layer_table, load_spec_toml, spec_from_dict
from cnnlab.summary import format_summary

GOLDEN = Path(__file__).parent / "golden"


def test_lab_preset_has_the_reports_parameter_count():
    assert count_params(PRESETS["lab2-3c3f-bn"], (1, 28, 28), 10) == 59_734


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_built_model_matches_the_table(name):
    import torch

    from cnnlab.model import build_model

    spec = PRESETS[name]
    model = build_model(spec, (1, 28, 28), 10)
    assert sum(p.numel() for p in model.parameters()) == count_params(spec, (1, 28, 28), 10)
    # every row's output shape is what the real network produces
    x = torch.zeros(2, 1, 28, 28)
    shapes = []
    for layer in model:
        x = layer(x)
        if type(layer).__name__ != "Flatten":
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [r.out_shape for r in layer_table(spec, (1, 28, 28), 10)]


def test_presets_follow_the_report():
    bn3, plain3, two3, two2 = (PRESETS[k] for k in ("lab2-3c3f-bn", "lab2-3c3f", "lab2-2c3f", "lab2-2c2f"))
    assert all(b.bn for b in bn3.conv + bn3.fc)
    assert not any(b.bn for b in plain3.conv + plain3.fc)
    assert [b.bn for b in two3.fc] == [False, True] and [b.width for b in two3.fc] == [128, 48]
    assert [b.bn for b in two2.fc] == [True] and [b.width for b in two2.fc] == [128]
    assert all(b.dropout == 0.75 for p in PRESETS.values() for b in p.conv)
    # the inferred flatten sizes the report typed by hand: 24*4*4 and 12*6*6
    assert layer_table(bn3, (1, 28, 28), 10)[14].args["in_features"] == 24 * 4 * 4
    assert [r for r in layer_table(two3, (1, 28, 28), 10) if r.kind == "Linear"][0].args["in_features"] == 12 * 6 * 6


def test_summary_golden():
    text = format_summary(PRESETS["lab2-3c3f-bn"], (1, 28, 28), 10)
    golden = GOLDEN / "summary-lab2-3c3f-bn.txt"
    if os.environ.get("CNNLAB_UPDATE_GOLDEN"):
        golden.write_text(text + "\n")
    assert text + "\n" == golden.read_text()
    # the rows add up to the printed total
    rows = [int(m.group(1).replace(",", "")) for m in re.finditer(r"\]\s+([\d,]+)$", text, re.M)]
    total = int(re.search(r"Total params: ([\d,]+)", text).group(1).replace(",", ""))
    assert sum(rows) == total == 59_734
    assert "Estimated Total Size (MB): 0.46" in text and "Forward/backward pass size (MB): 0.22" in text


def test_summary_cli(capsys):
    from cnnlab.cli import main

    assert main(["summary", "--preset", "lab2-3c3f-bn"]) == 0
    out = capsys.readouterr().out
    assert "Total params: 59,734" in out and "Linear-21" in out


def test_any_input_size_and_classes():
    rows = layer_table(PRESETS["lab2-2c2f"], (1, 40, 32), 3)
    assert rows[-1].out_shape == (3,)
    assert next(r for r in rows if r.kind == "MaxPool2d").out_shape == (6, 20, 16)  # first pool halves 40x32


def test_feature_map_too_small_names_the_block_and_shapes():
    with pytest.raises(SpecError, match=r"conv3: input feature map 12x1x1 .* smaller than the 3x3 kernel"):
        layer_table(PRESETS["lab2-3c3f"], (1, 8, 8), 10)
    spec = ModelSpec((ConvBlock(4, kernel=3, pool=4),))
    with pytest.raises(SpecError, match=r"conv1: feature map 4x3x3 .* smaller than the 4x4 max-pool"):
        layer_table(spec, (1, 5, 5), 10)


@pytest.mark.parametrize("data, message", [
    ({"conv": [{"out_channels": 6, "kernal": 3}]}, r"model.conv\[0\]: unknown key\(s\) kernal"),
    ({"conv": [{"out_channels": "6"}]}, r"`out_channels` must be int, got str"),
    ({"conv": [{"out_channels": 6, "bn": 1}]}, r"`bn` must be bool"),
    ({"conv": [{"out_channels": True}]}, r"`out_channels` must be int, got bool"),
    ({"fc": [{"width": 0}]}, r"`width` must be >= 1"),
    ({"fc": [{"width": 8, "dropout": 1.0}]}, r"drop probability"),
    ({"conv": [{}]}, r"missing required key `out_channels`"),
    ({"layers": []}, r"unknown key\(s\) layers"),
])
def test_bad_specs_are_rejected(data, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict(data)


def test_spec_toml_file(tmp_path):
    p = tmp_path / "net.toml"
    p.write_text("[[conv]]\nout_channels = 4\npadding = 1\npool = 2\n[[fc]]\nwidth = 16\nbn = true\n")
    spec = load_spec_toml(p)
    assert spec == ModelSpec((ConvBlock(4, padding=1, pool=2),), (FcBlock(16, bn=True),))
    p.write_text("[[conv]\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec_toml(p)


def test_config_round_trip_and_overrides(tmp_path):
    from cnnlab.config import dump_config

    cfg = config_from_dict({"model": {"preset": "lab2-3c3f", "bn": True, "conv_dropout": 0.25},
                            "train": {"epochs": 2, "lr": 1}})
    assert all(b.bn for b in cfg.model.conv + cfg.model.fc)
    assert all(b.dropout == 0.25 for b in cfg.model.conv)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    p = tmp_path / "c.toml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize("data, message", [
    ({"trian": {}}, r"unknown section\(s\) trian"),
    ({"train": {"epoch": 3}}, r"unknown key\(s\) epoch"),
    ({"train": {"epochs": "3"}}, r"`epochs` must be int"),
    ({"train": {"epochs": 0}}, r"epochs must be >= 1"),
    ({"train": {"eval_mode": "test"}}, r"eval_mode must be one of"),
    ({"model": {"preset": "lab3"}}, r"unknown preset 'lab3'"),
    ({"model": {"preset": "lab2-3c3f", "conv_dropout": 1.5}}, r"conv_dropout: must be a drop probability"),
    ({"model": {}}, r"give a `preset`"),
])
def test_bad_configs_are_rejected(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)
