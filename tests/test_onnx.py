"""to_onnx: every public layer exported, run in onnxruntime and compared with torch."""

from __future__ import annotations

import sys
import warnings
from collections import OrderedDict

import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipnets
from lipnets.errors import ExportError, LipnetsWarning
from lipnets.export import to_onnx
from zoo import models


def run(proto: onnx.ModelProto, *inputs: torch.Tensor) -> list[torch.Tensor]:
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    feeds = {name: x.numpy() for name, x in zip(names, inputs, strict=True)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def exporter(proto: onnx.ModelProto) -> str:
    return {p.key: p.value for p in proto.metadata_props}["lipnets.exporter"]


def grafted() -> nn.Module:
    act = lipnets.GraftedReLU((6,), mask=torch.tensor([1, 0, 1, 0, 0, 1]), max_slope=0.9)
    with torch.no_grad():
        act.slope.uniform_(-2.0, 2.0)  # some clamped by max_slope
        act.intercept.normal_()
    return nn.Sequential(lipnets.BjorckLinear(4, 6), act)


# (name, model factory, per-sample input shape)
LAYERS = [
    ("BjorckLinear", lambda: nn.Sequential(lipnets.BjorckLinear(5, 8)), (5,), True),
    ("CayleyLinear", lambda: nn.Sequential(lipnets.CayleyLinear(8, 5)), (8,), True),
    ("BCOPConv2d-stride", lambda: lipnets.BCOPConv2d(4, 8, 3, stride=2), (4, 6, 6), False),
    ("CayleyConv2d-size-from-example", lambda: lipnets.CayleyConv2d(4, 4, 3), (4, 8, 8), True),
    (
        "CayleyConv2d-stride",
        lambda: lipnets.CayleyConv2d(2, 8, 3, stride=2, input_size=(8, 8)),
        (2, 8, 8),
        True,
    ),
    (
        "FrequencyConv2d",
        lambda: lipnets.CayleyConv2d(3, 3, 3, input_size=(4, 6)).to_vanilla(),
        (3, 4, 6),
        True,
    ),
    (
        "MaxMin-GroupSort-FullSort-InvertibleDownsample",
        lambda: nn.Sequential(
            lipnets.MaxMin(),
            lipnets.InvertibleDownsample(2),
            lipnets.GroupSort(3),
            nn.Flatten(),
            lipnets.FullSort(),
        ),
        (6, 2, 4),
        True,
    ),
    ("L2NormPool2d-overlap", lambda: lipnets.L2NormPool2d(3, 2, padding=1), (2, 7, 5), True),
    ("GraftedReLU", grafted, (4,), True),
    (
        "groupsort-mlp",
        lambda: models.build("groupsort-mlp", input_shape=(1, 4, 4), num_outputs=3, width=8),
        (1, 4, 4),
        True,
    ),
    (
        "lipconvnet-bcop",
        lambda: models.build(
            "lipconvnet", input_shape=(1, 4, 4), num_outputs=3, width=2, depth=1, stages=1
        ),
        (1, 4, 4),
        False,
    ),
    (
        "lipconvnet-cayley",
        lambda: models.build(
            "lipconvnet",
            input_shape=(1, 4, 4),
            num_outputs=3,
            conv="cayley",
            width=2,
            depth=1,
            stages=1,
        ),
        (1, 4, 4),
        True,
    ),
]


@pytest.mark.parametrize(("name", "make", "shape", "_"), LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_exports_and_matches_in_onnxruntime(name, make, shape, _):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(3, *shape)
    if name.startswith("MaxMin"):
        x[0, 0] = x[0, 1]  # ties
    proto = to_onnx(model, x)
    onnx.checker.check_model(proto)
    assert exporter(proto) == "dynamo"
    if name.startswith("L2NormPool2d"):
        # Note [ONNX export of L2NormPool2d]: torch.onnx.export of the layer itself writes
        # a plain AveragePool (divisor_override dropped), which divides by the window size
        assert "AveragePool" not in {n.op_type for n in proto.graph.node}
    # dynamic batch: other sizes than the example's, compared here, not by to_onnx
    for batch in (1, 5):
        y = torch.randn(batch, *shape)
        (out,) = run(proto, y)
        with torch.no_grad():
            torch.testing.assert_close(out, model.eval()(y), rtol=1e-5, atol=1e-5)


def test_float64_export_matches():
    # Every layer onnxruntime runs in float64 (it has no float64 Conv: BCOP is refused,
    # below), in one model: one export instead of ten.
    torch.manual_seed(1)
    act = lipnets.GraftedReLU((10,), mask=torch.arange(10) % 3 == 0, max_slope=0.9)
    with torch.no_grad():
        act.slope.uniform_(-2.0, 2.0)
    model = nn.Sequential(
        lipnets.CayleyConv2d(2, 8, 3, stride=2),  # size read from the example
        lipnets.MaxMin(),
        lipnets.L2NormPool2d(3, 1, padding=1),
        lipnets.InvertibleDownsample(2),
        lipnets.CayleyConv2d(32, 32, 1, input_size=(3, 4)),
        nn.Flatten(),
        lipnets.BjorckLinear(384, 12),
        lipnets.GroupSort(3),
        lipnets.CayleyLinear(12, 10),
        lipnets.FullSort(),
        act,
    ).double()
    x = torch.randn(2, 2, 12, 16, dtype=torch.float64)
    proto = to_onnx(model, x)
    y = torch.randn(3, 2, 12, 16, dtype=torch.float64)
    (out,) = run(proto, y)
    assert out.dtype == torch.float64
    with torch.no_grad():
        want = model.eval()(y)
    # 1e-6 (to_onnx's float64 tolerance), not 1e-12, because the export itself rounds:
    # onnxruntime's DFT for lengths that are not a power of two is accurate to ~1e-7, and
    # the dynamo exporter folds GraftedReLU's clamp with float32 bounds (0.9 -> 0.89999998)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    # without those two the float64 export is exact to rounding
    exact = nn.Sequential(*model[1:4], nn.Flatten(), lipnets.BjorckLinear(384, 12).double())
    z = torch.randn(3, 8, 6, 8, dtype=torch.float64)
    (out,) = run(to_onnx(exact, z), z)
    with torch.no_grad():
        torch.testing.assert_close(out, exact.eval()(z), rtol=1e-12, atol=1e-12)


def test_float64_conv_is_refused_clearly():
    model = lipnets.BCOPConv2d(2, 2, 3).double()
    with pytest.raises(ExportError, match=r"onnxruntime cannot run.*no float64 Conv"):
        to_onnx(model, torch.randn(1, 2, 4, 4, dtype=torch.float64))


def test_path_opset_and_torchscript_exporter(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(lipnets.BjorckLinear(4, 6), lipnets.GroupSort(2))
    x = torch.randn(2, 4)
    path = tmp_path / "model.onnx"
    proto = to_onnx(model, x, path, opset=18, dynamo=False)
    assert exporter(proto) == "torchscript"
    loaded = onnx.load(path)
    assert loaded.opset_import[0].version == 18
    (out,) = run(loaded, torch.cat([x, x]))
    torch.testing.assert_close(out, model.eval()(torch.cat([x, x])), rtol=1e-5, atol=1e-6)
    # a fixed batch when asked
    fixed = to_onnx(model, x, dynamic_batch=False)
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


def test_several_inputs_and_outputs():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = lipnets.CayleyLinear(3, 4)

        def forward(self, a, b):
            return self.fc(a) + b, lipnets.functional.max_min(b)

    model = Two()
    a, b = torch.randn(2, 3), torch.randn(2, 4)
    proto = to_onnx(model, (a, b))
    a5, b5 = torch.randn(5, 3), torch.randn(5, 4)
    outs = run(proto, a5, b5)
    with torch.no_grad():
        for got, want in zip(outs, model(a5, b5), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_falls_back_to_torchscript_with_a_warning(monkeypatch):
    real = torch.onnx.export

    def no_dynamo(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo exporter unavailable")
        return real(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    with pytest.warns(LipnetsWarning, match="dynamo ONNX exporter failed.*unavailable"):
        proto = to_onnx(nn.Sequential(lipnets.BjorckLinear(4, 4)), torch.randn(2, 4))
    assert exporter(proto) == "torchscript"


def test_both_exporters_failing_is_an_export_error():
    model = lipnets.CayleyConv2d(2, 2, 3, input_size=(4, 4))  # complex FFT: no TorchScript
    with pytest.raises(ExportError, match=r"torchscript exporter: .*view_as_complex"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            to_onnx(model, torch.randn(1, 2, 4, 4), dynamo=False)


def test_refusals_name_the_layer():
    hooked = nn.Sequential(nn.Flatten(), lipnets.BjorckLinear(4, 4))
    hooked[1].register_forward_hook(lambda *_: None)
    with pytest.raises(ExportError, match=r"^1 \(BjorckLinear\) has forward hooks"):
        to_onnx(hooked, torch.randn(2, 4))

    class SumPool(nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, 2, divisor_override=1)

    with pytest.raises(ExportError, match=r"^pool \(SumPool\) calls avg_pool2d.*divisor_override"):
        to_onnx(nn.Sequential(OrderedDict(pool=SumPool())), _img())

    class MyPool(lipnets.L2NormPool2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ExportError, match=r"^0 \(MyPool\) has hooks or a forward of its own"):
        to_onnx(nn.Sequential(MyPool(2)), _img())

    shared = lipnets.CayleyConv2d(2, 2, 3)

    class TwoSizes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = shared

        def forward(self, x):
            return self.conv(x).sum() + self.conv(x[..., :2, :2]).sum()

    with pytest.raises(ExportError, match=r"conv \(CayleyConv2d\) is called at input sizes"):
        to_onnx(TwoSizes(), _img(), dynamic_batch=False)


def _img() -> torch.Tensor:
    return torch.randn(1, 2, 4, 4)


def test_mismatch_is_an_export_error():
    class Counter(nn.Module):  # Python state: each call scales by its call number
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * self.calls

    with pytest.raises(ExportError, match=r"output 0 of the ONNX model differs .* rtol=0.0001"):
        to_onnx(Counter(), torch.ones(2, 3))
    # the FFT export in float32 is accurate to about 1e-6, not to 1e-12
    conv = lipnets.CayleyConv2d(2, 2, 3, input_size=(6, 6))
    with pytest.raises(ExportError, match="differs"):
        to_onnx(conv, torch.randn(1, 2, 6, 6), rtol=1e-12)


def test_arguments_are_checked():
    model = lipnets.MaxMin()
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        to_onnx(lambda x: x, torch.randn(2, 2))
    with pytest.raises(TypeError, match="example must be a tensor"):
        to_onnx(model, [[1.0, 2.0]])
    with pytest.raises(ValueError, match="opset must be an int >= 7, got 3"):
        to_onnx(model, torch.randn(2, 2), opset=3)
    with pytest.raises(ValueError, match="rtol must be a finite number > 0"):
        to_onnx(model, torch.randn(2, 2), rtol=0)
    with pytest.raises(ValueError, match="0-dim"):
        to_onnx(model, torch.tensor(1.0))
    with pytest.raises(TypeError, match="check must be a bool"):
        to_onnx(model, torch.randn(2, 2), check="yes")


def test_missing_packages_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"needs onnxruntime: .*lipnets\[onnx\]"):
        to_onnx(lipnets.MaxMin(), torch.randn(2, 2))
    # without the check onnxruntime is not needed; the model is left as it was
    model = nn.Sequential(lipnets.BjorckLinear(4, 4), lipnets.MaxMin()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    to_onnx(model, torch.randn(2, 4), check=False)
    assert model.training and model[0].training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model[0]).__name__ == "ParametrizedBjorckLinear"
