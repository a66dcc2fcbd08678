"""The run configuration: [data], [model], [train], each a small frozen dataclass.

A config file (TOML) looks like

    [data]
    name = "mnist"            # mnist | fashion-mnist | cifar10 | idx:DIR | npz:FILE | folder:DIR
    normalize = false         # per-channel mean/std of the training split (optional)
    [model]
    preset = "lab2-3c3f-bn"   # start from a preset...
    conv_dropout = 0.25       # ...and override (optional): bn, conv_dropout, fc_dropout
    # or give the blocks:  [[model.conv]] out_channels = 6 ...   [[model.fc]] width = 128
    # or any nn.Module:    factory = "examples/tiny_resnet.py:tiny_resnet"  + [model.args]
    [train]
    epochs = 10

Every key is checked: unknown keys and wrong types are errors that name the key and the
file, raised before any training starts. `resolve_model` applies preset + overrides, and
the resolved config (what config.toml in a run directory holds) keeps the full block lists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cnnlab.errors import ConfigError, SpecError
from cnnlab.factory import FactorySpec, factory_from_dict
from cnnlab.spec import PRESETS, ModelSpec, dataclass_from_table, spec_from_dict
from cnnlab.trackers import TRACKERS  # the names only: no tracker package is imported

EVAL_MODES = ("eval", "train")


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist"
    val_size: int = 5000  # held out from the training file, as the lab's 55k/5k split
    limit: int = 0  # train on the first N images of the (shuffled) training split; 0 = all
    # per-channel (x - mean) / std, with mean and std of the training split only; stored in the
    # run and applied again at eval, predict and export. Left out of config.toml when false.
    normalize: bool = False


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 50
    lr: float = 1e-3
    seed: int = 0
    # "eval": evaluate with model.eval() (correct). "train": as the lab did, with dropout and
    # BatchNorm still in training mode. Both are always recorded; this picks the headline.
    eval_mode: str = "eval"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # intra-op threads; 0 = torch's default
    # experiment trackers that also record the run (cnnlab.trackers): "tensorboard", "mlflow".
    # Left out of config.toml when empty, so run directories made before it still match.
    log: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = DataConfig()
    model: ModelSpec | FactorySpec = PRESETS["lab2-3c3f-bn"]  # FactorySpec: any nn.Module (cnnlab.factory)
    train: TrainConfig = TrainConfig()
    preset: str | None = "lab2-3c3f-bn"  # the preset the model started from, for labels only

    def to_dict(self) -> dict[str, Any]:
        model = self.model.to_dict()
        if self.preset:
            model = {"preset": self.preset, **model}
        data = dataclasses.asdict(self.data)
        if not data["normalize"]:
            del data["normalize"]
        train = dataclasses.asdict(self.train)
        if train["log"]:
            train["log"] = list(train["log"])
        else:
            del train["log"]
        return {"data": data, "model": model, "train": train}


MODEL_KEYS = ("preset", "conv", "fc", "bn", "conv_dropout", "fc_dropout", "factory", "args")


def resolve_model(data: Any, where: str = "model") -> tuple[ModelSpec | FactorySpec, str | None]:
    """[model] table -> (spec, preset name). Blocks given explicitly replace the preset's;
    `factory` (and `args`) name any nn.Module instead (cnnlab.factory; nothing is imported here)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    if "factory" in data:
        return factory_from_dict(data, where), None
    if "args" in data:
        raise ConfigError(f"{where}.args: args are a factory's keyword arguments; give `factory` too")
    unknown = sorted(set(data) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(MODEL_KEYS)}")
    name = data.get("preset")
    if name is not None:
        if name not in PRESETS:
            raise ConfigError(f"{where}.preset: unknown preset {name!r}; available: {', '.join(PRESETS)}")
        base = PRESETS[name].to_dict()
    elif "conv" not in data and "fc" not in data:
        raise ConfigError(f"{where}: give a `preset` or the `conv`/`fc` block lists")
    else:
        base = {"conv": [], "fc": []}
    blocks = {k: data.get(k, base[k]) for k in ("conv", "fc")}
    try:
        spec = spec_from_dict(blocks, where)
    except SpecError as e:
        raise ConfigError(str(e)) from None
    if "bn" in data:
        if not isinstance(data["bn"], bool):
            raise ConfigError(f"{where}.bn: must be true or false, got {data['bn']!r}")
        spec = ModelSpec(tuple(dataclasses.replace(b, bn=data["bn"]) for b in spec.conv),
                         tuple(dataclasses.replace(b, bn=data["bn"]) for b in spec.fc))
    for key, part in (("conv_dropout", "conv"), ("fc_dropout", "fc")):
        if key in data:
            p = data[key]
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ConfigError(f"{where}.{key}: must be a drop probability in [0, 1), got {p!r}")
            new = tuple(dataclasses.replace(b, dropout=float(p)) for b in getattr(spec, part))
            spec = dataclasses.replace(spec, **{part: new})
    return spec, name


def config_from_dict(data: Any, where: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(data) - {"data", "model", "train"})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; valid: data, model, train")
    spec, name = resolve_model(data.get("model", {"preset": "lab2-3c3f-bn"}), f"{where}: model")
    cfg = RunConfig(
        data=dataclass_from_table(DataConfig, data.get("data", {}), f"{where}: data", ConfigError),
        model=spec,
        train=_train_from_table(data.get("train", {}), f"{where}: train"),
        preset=name,
    )
    validate(cfg, where)
    return cfg


def _train_from_table(data: Any, where: str) -> TrainConfig:
    """[train]: its scalar keys typed as every table's, and `log`, a list of tracker names."""
    table = dict(data) if isinstance(data, dict) else data  # not a table: dataclass_from_table says so
    log = table.pop("log", ()) if isinstance(table, dict) else ()
    train = dataclass_from_table(TrainConfig, table, where, ConfigError)
    return dataclasses.replace(train, log=log_names(log, f"{where}: log"))


def log_names(value: Any, where: str = "log") -> tuple[str, ...]:
    """A list of tracker names as a tuple, each once; validate() checks the names."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: must be a list of tracker names, e.g. [\"tensorboard\", \"mlflow\"], "
                          f"got {value!r}")
    return tuple(dict.fromkeys(value))


def validate(cfg: RunConfig, where: str = "config") -> None:
    t, d = cfg.train, cfg.data
    for key, value, low in (("epochs", t.epochs, 1), ("batch_size", t.batch_size, 1), ("val_size", d.val_size, 1)):
        if value < low:
            raise ConfigError(f"{where}: {key} must be >= {low}, got {value}")
    if d.limit < 0:
        raise ConfigError(f"{where}: limit must be >= 0 (0 = all), got {d.limit}")
    if not t.lr > 0:
        raise ConfigError(f"{where}: lr must be > 0, got {t.lr}")
    if t.eval_mode not in EVAL_MODES:
        raise ConfigError(f"{where}: eval_mode must be one of {', '.join(EVAL_MODES)}, got {t.eval_mode!r}")
    if t.threads < 0:
        raise ConfigError(f"{where}: threads must be >= 0, got {t.threads}")
    for name in t.log:
        if name not in TRACKERS:
            raise ConfigError(f"{where}: log: unknown tracker {name!r}; available: {', '.join(TRACKERS)}")


def load_config(path) -> RunConfig:
    from cnnlab.fsutil import read_toml

    return config_from_dict(read_toml(path, ConfigError, "run configuration TOML file"), str(path))


def dump_config(cfg: RunConfig) -> str:
    import tomli_w

    return tomli_w.dumps(cfg.to_dict())
