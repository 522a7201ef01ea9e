"""`convserve import` of ONNX files written by torch.onnx.export at test time.

Each imported model is run by our core and compared with the PyTorch module itself (and the
importer compares it with ONNX Runtime before writing). Refusals are checked for their one-line
message naming the node, the op and the attribute.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from convserve.core.interop import UnsupportedModel
from convserve.core.interop.convert import import_model
from convserve.core.model import Model

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
nn = torch.nn

TOLERANCE = 1e-4


def export(module, path, shape, *, dynamo=False, batch=2, **kwargs) -> None:
    """torch.onnx.export of `module` in eval mode on a random NCHW batch."""
    module.eval()
    x = torch.randn(batch, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, (x,), str(path), dynamo=True, **kwargs)
        else:
            kwargs.setdefault("dynamic_axes", {"x": {0: "N"}, "y": {0: "N"}})
            torch.onnx.export(
                module, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                **kwargs,
            )  # fmt: skip


def check_against_torch(module, out_path, shape, batch=2, seed=1) -> Model:
    """Load the written file and compare it with the PyTorch module on a random batch."""
    model = Model.load(out_path)
    x = np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    ours = model.predict(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    assert ours.shape == expected.shape
    assert np.abs(ours - expected).max() <= TOLERANCE * max(1.0, np.abs(expected).max())
    return model


def randomize_batchnorm(module) -> None:
    """Non-trivial running statistics, or a fold would go untested."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-1, 1, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)


class MixedNet(nn.Module):
    """BatchNorm, Dropout, stride-2 padded conv, 'same' conv, average pooling, tanh, sigmoid."""

    def __init__(self, size: int = 28, softmax: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(12, 6, 3, padding="same")
        self.pool = nn.AvgPool2d(2)
        side = ((size + 1) // 2) // 2
        self.fc1 = nn.Linear(6 * side * side, 32)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(32, 10)
        self.softmax = softmax
        randomize_batchnorm(self)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.tanh(self.conv2(x))
        x = torch.sigmoid(self.pool(self.conv3(x)))
        x = self.fc2(self.drop(torch.relu(self.fc1(torch.flatten(x, 1)))))
        return torch.softmax(x, dim=1) if self.softmax else x


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_mixed_net_imports_exactly_at_each_opset(tmp_path, opset):
    torch.manual_seed(opset)
    net = MixedNet(softmax=False)  # logits: a wrong dense-row order could not hide
    export(net, tmp_path / "net.onnx", (1, 28, 28), opset_version=opset)
    report = import_model(tmp_path / "net.onnx", tmp_path / "net.safetensors")
    assert report.max_diff is not None and report.max_diff <= TOLERANCE
    model = check_against_torch(net, tmp_path / "net.safetensors", (1, 28, 28))
    layers = model.architecture.layers
    # conv1+bn1+relu fused into one conv; stride-2 pad-1 on an even input: a grown 4x4 'same'
    assert [(la.type, la.activation) for la in layers[:2]] == [
        ("conv2d", "relu"),
        ("conv2d", "tanh"),
    ]
    assert layers[1].kernel_size == (4, 4) and layers[1].padding == "same"
    assert not any(la.type == "dropout" for la in layers)
    assert any("4x4 kernel" in note for note in report.notes)


def test_unfolded_batchnorm_and_odd_input(tmp_path):
    """do_constant_folding=False keeps BatchNormalization nodes (and Identity-shared weights)."""
    torch.manual_seed(5)
    net = MixedNet(size=27)
    export(net, tmp_path / "net.onnx", (1, 27, 27), opset_version=11, do_constant_folding=False)
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "net.onnx")).graph.node}
    assert "BatchNormalization" in ops
    import_model(tmp_path / "net.onnx", tmp_path / "net.safetensors")
    model = check_against_torch(net, tmp_path / "net.safetensors", (1, 27, 27))
    assert model.architecture.layers[1].kernel_size == (3, 3)  # odd input: plain TF 'same'


def test_default_dynamo_exporter_with_external_data(tmp_path):
    pytest.importorskip("onnxscript")
    torch.manual_seed(7)
    net = MixedNet()
    export(net, tmp_path / "net.onnx", (1, 28, 28), dynamo=True)
    import_model(tmp_path / "net.onnx", tmp_path / "net.safetensors", labels=list("abcdefghij"))
    model = check_against_torch(net, tmp_path / "net.safetensors", (1, 28, 28))
    assert model.labels == list("abcdefghij")


class Flattens(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 5, 3)
        self.fc = nn.Linear(5 * 6 * 6, 7)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        if self.how == "view":
            x = x.view(x.size(0), -1)
        elif self.how == "nhwc":
            x = x.permute(0, 2, 3, 1).flatten(1)
        else:
            x = nn.Flatten()(x)
        return self.fc(x)


@pytest.mark.parametrize(
    "how,dynamic", [("view", True), ("view", False), ("nhwc", True), ("flatten", True)]
)
def test_flatten_variants_permute_dense_rows_only_when_needed(tmp_path, how, dynamic):
    torch.manual_seed(11)
    net = Flattens(how)
    extra = {} if dynamic else {"dynamic_axes": None}
    export(net, tmp_path / "f.onnx", (3, 8, 8), **extra)
    import_model(tmp_path / "f.onnx", tmp_path / "f.safetensors")
    check_against_torch(net, tmp_path / "f.safetensors", (3, 8, 8))


class Assorted(nn.Module):
    """Input normalization in the graph, ZeroPad2d + conv, bias-less conv + BN, ceil-mode max
    pooling, count_include_pad=False average pooling, global pooling, Linear + BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.2, 0.5, 0.7]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.3, 0.2, 0.25]).view(1, 3, 1, 1))
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool1 = nn.MaxPool2d(2, ceil_mode=True)
        self.pool2 = nn.AvgPool2d(3, 2, padding=1, count_include_pad=False)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 6)
        self.bn3 = nn.BatchNorm1d(6)
        randomize_batchnorm(self)

    def forward(self, x):
        x = (x / 255.0 - self.mean) / self.std
        x = torch.relu(self.conv1(self.pad(x)))  # 18 -> 9 ('same' on the padded input)
        x = self.pool1(torch.relu(self.bn2(self.conv2(x))))  # 9 -> 5, ceil_mode
        x = self.gap(self.pool2(x)).flatten(1)
        return torch.sigmoid(self.bn3(self.fc(x)))


def test_assorted_ops_and_input_normalization(tmp_path):
    torch.manual_seed(13)
    net = Assorted()
    export(net, tmp_path / "a.onnx", (3, 18, 18))
    import_model(tmp_path / "a.onnx", tmp_path / "a.safetensors")
    model = Model.load(tmp_path / "a.safetensors")
    arch = model.architecture
    assert arch.scale == pytest.approx(1 / 255) and arch.mean == pytest.approx((0.2, 0.5, 0.7))
    assert arch.std == pytest.approx((0.3, 0.2, 0.25))
    pixels = np.random.default_rng(2).integers(0, 256, (3, 18, 18, 3)).astype(np.uint8)
    with torch.no_grad():
        expected = net(torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
    assert np.abs(model.predict(pixels) - expected).max() <= TOLERANCE


def refusal(tmp_path, module, shape, **kwargs) -> str:
    export(module, tmp_path / "r.onnx", shape, **kwargs)
    with pytest.raises(UnsupportedModel) as caught:
        import_model(tmp_path / "r.onnx", tmp_path / "r.safetensors")
    assert not (tmp_path / "r.safetensors").exists()
    message = str(caught.value)
    assert "\n" not in message
    return message


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)) + x, 1))


def head(*layers):
    return nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(3))


@pytest.mark.parametrize(
    "module,shape,fragments",
    [
        (lambda: head(nn.Conv2d(2, 4, 3, dilation=2)), (2, 9, 9), ["(Conv)", "dilations=[2, 2]"]),
        (lambda: head(nn.Conv2d(2, 4, 3, groups=2)), (2, 9, 9), ["(Conv)", "group=2"]),
        (lambda: head(nn.MaxPool2d(3, 3, ceil_mode=True)), (2, 7, 7), ["(MaxPool)", "ceil_mode=1"]),
        (
            lambda: head(nn.AvgPool2d(3, 2, padding=1)),
            (2, 9, 9),
            ["(AveragePool)", "count_include_pad=1"],
        ),
        (
            lambda: head(nn.MaxPool2d(3, 2, padding=1)),
            (2, 8, 8),
            ["(MaxPool)", "pads [top 1, bottom 1"],
        ),
        (
            lambda: head(nn.Conv2d(2, 4, 3), nn.LeakyReLU()),
            (2, 6, 6),
            ["(LeakyRelu)", "unsupported op"],
        ),
        (Residual, (2, 6, 6), ["(Add)", "residual", "sequential"]),
        (
            lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Softmax(dim=1)),
            (2, 5, 5),
            ["(Softmax)", "axis=1"],
        ),
    ],
)
def test_unsupported_constructs_are_refused_by_name(tmp_path, module, shape, fragments):
    torch.manual_seed(0)
    net = module()
    net(torch.randn(1, *shape))  # materialize lazy layers
    message = refusal(tmp_path, net, shape)
    assert message.startswith(("ONNX node '", "ONNX graph: "))
    for fragment in fragments:
        assert fragment in message, message


def test_lstm_is_refused(tmp_path):
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(6, 4, batch_first=True)

        def forward(self, x):
            return self.lstm(x.flatten(1, 2))[0][:, -1]

    message = refusal(tmp_path, Seq(), (1, 5, 6), dynamic_axes=None)
    assert message.startswith("ONNX node '") and "(LSTM): unsupported op" in message, message


def test_garbage_and_truncated_files_are_one_line_errors(tmp_path):
    torch.manual_seed(0)
    export(MixedNet(), tmp_path / "ok.onnx", (1, 28, 28))
    data = (tmp_path / "ok.onnx").read_bytes()
    for name, payload in (("cut.onnx", data[: len(data) // 2]), ("junk.onnx", b"\x00junk" * 40)):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(UnsupportedModel) as caught:
            import_model(tmp_path / name, tmp_path / "x.safetensors")
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "x.safetensors").exists()


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    import onnx

    torch.manual_seed(0)
    export(MixedNet(), tmp_path / "ok.onnx", (1, 28, 28))
    model = onnx.load(str(tmp_path / "ok.onnx"))
    init = model.graph.initializer[0]
    init.data_location = onnx.TensorProto.EXTERNAL
    init.ClearField("raw_data")
    entry = init.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    (tmp_path / "evil.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(UnsupportedModel, match="external data"):
        import_model(tmp_path / "evil.onnx", tmp_path / "x.safetensors")


def test_a_conversion_that_disagrees_with_the_source_is_not_written(tmp_path):
    from convserve.core.interop import convert

    torch.manual_seed(0)
    export(MixedNet(softmax=False), tmp_path / "n.onnx", (1, 28, 28))
    run, runtime = convert._onnx_runner((tmp_path / "n.onnx").read_bytes(), True)
    import_model(tmp_path / "n.onnx", tmp_path / "n.safetensors")
    ours = Model.load(tmp_path / "n.safetensors")
    assert convert.verify(ours, run, runtime) <= TOLERANCE

    def off(x):
        return run(x) + 1e-3

    with pytest.raises(UnsupportedModel, match="differs from"):
        convert.verify(ours, off, runtime)
