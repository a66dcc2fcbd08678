"""Summary and graph of any nn.Module (cnnlab.summary.summarize, cnnlab.report.graph.module_dot),
checked against torchinfo on the lab's network, a residual CNN and a depthwise CNN with frozen layers."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from cnnlab.errors import SpecError  # noqa: E402
from cnnlab.model import build_model  # noqa: E402
from cnnlab.report import graph  # noqa: E402
from cnnlab.spec import layer_table, preset  # noqa: E402
from cnnlab.summary import ModuleLayer, format_summary, module_layers, summarize  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "summary-lab2-3c3f-bn.txt"


class Block(nn.Module):
    """conv-bn-relu-conv-bn, plus the input (or its 1x1 projection), then relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = nn.Conv2d(cin, cout, 1, stride=stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        skip = x if self.proj is None else self.proj(x)
        return F.relu(torch.add(skip, y))


class ResNet(nn.Module):
    """RGB 32x32 -> stem -> two residual blocks -> global average pooling -> Linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = Block(16, 16)
        self.block2 = Block(16, 32, stride=2)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(x.mean((2, 3)), 1))


class Depthwise(nn.Module):
    """Depthwise (groups=C) + pointwise convs, the first ones frozen, a conv used twice and a
    parameter of the root's own."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.dw = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24)
        self.bn = nn.BatchNorm2d(24)
        self.pw = nn.Conv2d(24, 48, 1, bias=False)
        self.shared = nn.Conv2d(48, 48, 3, padding=1, groups=48)  # runs twice
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(48, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 10))
        self.scale = nn.Parameter(torch.ones(1))
        for m in (self.stem, self.dw, self.bn):
            m.requires_grad_(False)

    def forward(self, x):
        x = F.relu(self.bn(self.dw(self.stem(x))))
        x = self.shared(self.shared(self.pw(x)))
        return self.head(self.pool(x)) * self.scale


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace this
            x = -x
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def lab_net():
    return build_model(preset("lab2-3c3f-bn"), (1, 28, 28), 10)


NETWORKS = {"lab": (lab_net, (1, 28, 28)), "resnet": (ResNet, (3, 32, 32)), "depthwise": (Depthwise, (3, 32, 32))}


def _torchinfo(model, in_shape):
    torchinfo = pytest.importorskip("torchinfo")
    fast = getattr(model, "fast", None)
    if fast is not None:
        model.fast = False  # the lab Net's fused C forward would hide its layers from torchinfo's hooks
    try:
        s = torchinfo.summary(model, input_size=(1, *in_shape), verbose=0, device="cpu")
    finally:
        if fast is not None:
            model.fast = fast
    return s.total_params, s.trainable_params, s.total_mult_adds


# ---------------------------------------------------------------------------- counts against torchinfo

@pytest.mark.parametrize("name", list(NETWORKS))
def test_counts_match_torchinfo(name):
    make, in_shape = NETWORKS[name]
    torch.manual_seed(0)
    model = make()
    want = _torchinfo(model, in_shape)
    text, rows, stats = summarize(model, in_shape)
    assert (stats["total_params"], stats["trainable_params"], stats["total_mult_adds"]) == want
    assert stats["non_trainable_params"] == want[0] - want[1]
    assert f"Total params: {want[0]:,}\n" in text and f"Trainable params: {want[1]:,}\n" in text
    assert f"Non-trainable params: {want[0] - want[1]:,}\n" in text and f"Total mult-adds: {want[2]:,}\n" in text
    # the hooks alone agree as well (a lab Net goes by its spec in summarize)
    hooked = module_layers(model, in_shape)
    assert all(isinstance(r, ModuleLayer) for r in hooked)
    assert (sum(r.params for r in hooked if not r.repeat), sum(r.trainable for r in hooked if not r.repeat),
            sum(r.mult_adds for r in hooked)) == want


def test_known_numbers():
    """The numbers torchinfo 1.8.0 gives, written out, so a torchinfo upgrade that changes its
    definitions shows up here."""
    torch.manual_seed(0)
    assert summarize(lab_net(), (1, 28, 28))[2]["total_mult_adds"] == 240_334
    s = summarize(ResNet(), (3, 32, 32))[2]
    # conv: (weight + bias) x output positions; BatchNorm, Linear: their parameters
    assert (s["total_params"], s["trainable_params"], s["total_mult_adds"]) == (19_978, 19_978, 8_856_106)
    assert s["total_mult_adds"] == (448 * 32 * 32 + 32 + 2 * 2304 * 32 * 32 + 2 * 32  # stem, block1
                                    + (4608 + 9216 + 544) * 16 * 16 + 2 * 64 + 330)  # block2, fc
    d = summarize(Depthwise(), (3, 32, 32))[2]
    assert (d["total_params"], d["trainable_params"], d["total_mult_adds"]) == (3_823, 2_863, 1_291_518)
    # stem 672 + dw 240 + bn 48 are frozen
    assert d["total_params"] - d["trainable_params"] == 672 + 240 + 48 == d["non_trainable_params"]
    # the shared depthwise conv (432 + 48 params on 16x16) counts its parameters once, its mult-adds twice
    rows = module_layers(Depthwise(), (3, 32, 32))
    shared = [r for r in rows if r.block == "shared"]
    assert [r.repeat for r in shared] == [False, True] and [r.mult_adds for r in shared] == [480 * 256] * 2
    dw = next(r for r in rows if r.block == "dw")
    assert (dw.params, dw.trainable, dw.mult_adds, dw.out_shape) == (240, 0, 240 * 16 * 16, (24, 16, 16))
    root = next(r for r in rows if r.block == "model")  # its own parameter, counted, no mult-adds
    assert (root.params, root.mult_adds, root.index) == (1, 0, len(rows))


# ---------------------------------------------------------------------------- no side effects

def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_summary_and_graph_change_nothing(name):
    make, in_shape = NETWORKS[name]
    torch.manual_seed(0)
    model = make()
    model.train()
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    bns[0].eval()  # one submodule in another mode than its parent: each flag comes back as it was
    for bn in bns:  # running stats that a training-mode forward on zeros would move
        bn.running_mean.fill_(0.5)
    modes = [m.training for m in model.modules()]
    fast = getattr(model, "fast", None)
    before = _state(model)
    summarize(model, in_shape)
    module_layers(model, in_shape)
    graph.module_dot(model, in_shape)
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    assert getattr(model, "fast", None) == fast
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------- the lab's table, the CLI

def test_lab_table_unchanged_and_cli_adds_mult_adds(capsys):
    import cnnlab
    from cnnlab.cli import main
    from cnnlab.spec import PRESETS

    golden = GOLDEN.read_text()
    assert format_summary(PRESETS["lab2-3c3f-bn"], (1, 28, 28), 10) + "\n" == golden
    text, rows, stats = summarize(PRESETS["lab2-3c3f-bn"], (1, 28, 28), 10, mult_adds=False)
    assert text + "\n" == golden and rows == layer_table(PRESETS["lab2-3c3f-bn"], (1, 28, 28), 10)
    assert main(["summary", "--preset", "lab2-3c3f-bn"]) == 0
    out = capsys.readouterr().out
    assert "Total mult-adds: 240,334\n" in out
    assert out.replace("Total mult-adds: 240,334\n", "") == golden  # only that line more
    s = cnnlab.summary("lab2-3c3f-bn")
    assert (s.total_params, s.trainable_params, s.non_trainable_params, s.mult_adds) == (59_734, 59_734, 0, 240_334)
    # a lab Net has the spec's table, whatever its hooks would say
    assert summarize(lab_net())[0] == summarize(PRESETS["lab2-3c3f-bn"], (1, 28, 28), 10)[0]
    with pytest.raises(SpecError, match="built for input"):
        summarize(lab_net(), (1, 32, 32))


def test_api_summary_of_any_module():
    import cnnlab

    torch.manual_seed(0)
    model = Depthwise()
    s = cnnlab.summary(model, input_shape=(3, 32, 32))
    want = summarize(model, (3, 32, 32))
    assert s.text == want[0] and list(s.layers) == want[1]
    assert (s.total_params, s.trainable_params, s.non_trainable_params, s.mult_adds) == (
        want[2]["total_params"], want[2]["trainable_params"], want[2]["non_trainable_params"],
        want[2]["total_mult_adds"])
    assert s.non_trainable_params == 960 and "Non-trainable params: 960" in s._repr_html_()
    with pytest.raises(SpecError, match="does not run on an input of shape"):
        summarize(ResNet(), (1, 32, 32))


# ---------------------------------------------------------------------------- graph

_EDGE = re.compile(r"^\s*(\w+) -> (\w+);$", re.M)
_LABEL = re.compile(r"^\s*(\w+) \[label=\"([^\"]*)\"", re.M)


def _edges(src: str) -> list[tuple[str, str]]:
    return [m.groups() for m in _EDGE.finditer(src)]


def test_graph_of_a_residual_network_shows_the_skip():
    src, why = graph.module_dot(ResNet(), (3, 32, 32), "resnet")
    assert why == ""
    labels = dict(_LABEL.findall(src))
    edges = _edges(src)
    preds: dict[str, set[str]] = {}
    succs: dict[str, set[str]] = {}
    for a, b in edges:
        preds.setdefault(b, set()).add(a)
        succs.setdefault(a, set()).add(b)
    adds = [n for n, label in labels.items() if label.startswith("add ")]
    assert sorted(adds) == ["n_add", "n_add_1"]
    # block1's skip is the identity: the stem's output feeds both block1.conv1 and the add, which
    # also gets the block's last layer (not the immediately previous node only)
    assert preds["n_add"] == {"n_stem_2", "n_block1_bn2"}
    assert succs["n_stem_2"] == {"n_block1_conv1", "n_add"}
    # block2's skip goes through its 1x1 projection, from block1's output
    assert preds["n_add_1"] == {"n_block2_proj", "n_block2_bn2"}
    assert preds["n_block2_proj"] == preds["n_block2_conv1"] and len(preds["n_block2_proj"]) == 1
    assert succs[next(iter(preds["n_block2_proj"]))] == {"n_block2_conv1", "n_block2_proj"}
    # function and method calls are nodes, with their output shapes; layers carry their parameters
    assert labels["n_mean"] == "mean   [32]" and labels["n_flatten"] == "flatten   [32]"
    assert any(label.startswith("relu   [16, 32, 32]") for label in labels.values())
    assert labels["n_block2_proj"] == "block2.proj: Conv2d   [32, 16, 16]   544 params"
    assert labels["input"] == "input [3, 32, 32]" and ('label="resnet"' in src)
    assert "subgraph cluster_" in src and 'label="block2"' in src


def test_graph_marks_frozen_layers():
    src, why = graph.module_dot(Depthwise(), (3, 32, 32))
    labels = dict(_LABEL.findall(src))
    assert why == "" and labels["n_dw"] == "dw: Conv2d   [24, 16, 16]   240 params (frozen)"
    assert labels["n_scale"] == "scale   [1]   1 params" and ("n_scale", "n_mul") in _edges(src)
    assert sum(1 for label in labels.values() if label.startswith("shared: ")) == 2  # each call is a node


def test_graph_falls_back_to_the_layer_list():
    model = DataDependent()
    src, why = graph.module_dot(model, (1, 8, 8))
    assert why.startswith("torch.fx could not trace the model: ") and why.endswith("; the graph shows the layer list")
    assert "\n" not in why
    rows = module_layers(model, (1, 8, 8))
    assert [r.name for r in rows] == ["Conv2d-1", "Linear-2"]
    assert "  input -> n1 -> n2;\n" in src and '"Conv2d-1   [4, 6, 6]   40 params"' in src
    with pytest.raises(SpecError, match="does not run"):
        graph.module_dot(model, (1, 5, 5))


def test_graph_of_a_lab_net_is_the_spec_graph():
    net = lab_net()
    src, why = graph.module_dot(net, (1, 28, 28), "bn")
    assert why == ""
    assert src == graph.dot_source(layer_table(preset("lab2-3c3f-bn"), (1, 28, 28), 10), (1, 28, 28), "bn")
    with pytest.raises(SpecError, match="built for input"):
        graph.module_dot(net, (1, 32, 32))


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot is not installed")
@pytest.mark.parametrize("make", [ResNet, Depthwise, DataDependent])
def test_graph_renders(make, monkeypatch):
    monkeypatch.delenv("CNNLAB_DOT", raising=False)
    src, _ = graph.module_dot(make(), (1, 8, 8) if make is DataDependent else (3, 32, 32))
    png, why = graph.render_png(src)
    assert why == "" and png[:8] == b"\x89PNG\r\n\x1a\n"
