"""BVLC's Caffe AlexNet: a .caffemodel written with the protobuf library (random weights, the
layer and the legacy layers encodings) converts into our paper network with two towers, whose
logits equal a hand-written PyTorch build with Caffe's conventions (BGR, LRN k=1 with alpha
divided by the window, ceil-rounded pooling, C,H,W flattening)."""

import numpy as np
import pytest

from alexnet_jax import caffe, convert, data, evaluate, run_files, train
from alexnet_jax.errors import CheckpointError
from alexnet_jax.run_files import template_state

torch = pytest.importorskip("torch")
descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")

# Field numbers and types of caffe.proto (upstream BVLC/caffe), the subset a .caffemodel of
# AlexNet uses; built as a descriptor here so that no generated code is needed.
F = descriptor_pb2.FieldDescriptorProto
SCHEMA = {
    "BlobShape": [("dim", 1, F.TYPE_INT64, F.LABEL_REPEATED, None, True)],
    "BlobProto": [
        ("shape", 7, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, "BlobShape", False),
        ("data", 5, F.TYPE_FLOAT, F.LABEL_REPEATED, None, True),
        ("num", 1, F.TYPE_INT32, F.LABEL_OPTIONAL, None, False),
        ("channels", 2, F.TYPE_INT32, F.LABEL_OPTIONAL, None, False),
        ("height", 3, F.TYPE_INT32, F.LABEL_OPTIONAL, None, False),
        ("width", 4, F.TYPE_INT32, F.LABEL_OPTIONAL, None, False),
    ],
    "ConvolutionParameter": [
        ("num_output", 1, F.TYPE_UINT32, F.LABEL_OPTIONAL, None, False),
        ("pad", 3, F.TYPE_UINT32, F.LABEL_REPEATED, None, False),
        ("kernel_size", 4, F.TYPE_UINT32, F.LABEL_REPEATED, None, False),
        ("group", 5, F.TYPE_UINT32, F.LABEL_OPTIONAL, None, False),
        ("stride", 6, F.TYPE_UINT32, F.LABEL_REPEATED, None, False),
    ],
    "LRNParameter": [
        ("local_size", 1, F.TYPE_UINT32, F.LABEL_OPTIONAL, None, False),
        ("alpha", 2, F.TYPE_FLOAT, F.LABEL_OPTIONAL, None, False),
        ("beta", 3, F.TYPE_FLOAT, F.LABEL_OPTIONAL, None, False),
        ("k", 5, F.TYPE_FLOAT, F.LABEL_OPTIONAL, None, False),
    ],
    "PoolingParameter": [
        ("pool", 1, F.TYPE_INT32, F.LABEL_OPTIONAL, None, False),
        ("kernel_size", 2, F.TYPE_UINT32, F.LABEL_OPTIONAL, None, False),
        ("stride", 3, F.TYPE_UINT32, F.LABEL_OPTIONAL, None, False),
    ],
    "LayerParameter": [
        ("name", 1, F.TYPE_STRING, F.LABEL_OPTIONAL, None, False),
        ("type", 2, F.TYPE_STRING, F.LABEL_OPTIONAL, None, False),
        ("bottom", 3, F.TYPE_STRING, F.LABEL_REPEATED, None, False),
        ("top", 4, F.TYPE_STRING, F.LABEL_REPEATED, None, False),
        ("blobs", 7, F.TYPE_MESSAGE, F.LABEL_REPEATED, "BlobProto", False),
        ("convolution_param", 106, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, "ConvolutionParameter", False),
        ("lrn_param", 118, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, "LRNParameter", False),
        ("pooling_param", 121, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, "PoolingParameter", False),
    ],  # fmt: skip
    "V1LayerParameter": [
        ("bottom", 2, F.TYPE_STRING, F.LABEL_REPEATED, None, False),
        ("top", 3, F.TYPE_STRING, F.LABEL_REPEATED, None, False),
        ("name", 4, F.TYPE_STRING, F.LABEL_OPTIONAL, None, False),
        ("type", 5, F.TYPE_INT32, F.LABEL_OPTIONAL, None, False),  # an enum on the wire
        ("blobs", 6, F.TYPE_MESSAGE, F.LABEL_REPEATED, "BlobProto", False),
        ("convolution_param", 10, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, "ConvolutionParameter", False),
        ("lrn_param", 18, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, "LRNParameter", False),
        ("pooling_param", 19, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, "PoolingParameter", False),
    ],  # fmt: skip
    "NetParameter": [
        ("name", 1, F.TYPE_STRING, F.LABEL_OPTIONAL, None, False),
        ("layers", 2, F.TYPE_MESSAGE, F.LABEL_REPEATED, "V1LayerParameter", False),
        ("layer", 100, F.TYPE_MESSAGE, F.LABEL_REPEATED, "LayerParameter", False),
    ],
}


def caffe_messages():
    from google.protobuf import descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto(name="caffe_subset.proto", package="caffe",
                                              syntax="proto2")  # fmt: skip
    for message, entries in SCHEMA.items():
        proto = file.message_type.add(name=message)
        for name, number, kind, label, type_name, packed in entries:
            field = proto.field.add(name=name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = f".caffe.{type_name}"
            if packed:
                field.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {m: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{m}"))
            for m in SCHEMA}  # fmt: skip


def random_caffe_weights(rng, num_classes=1000):
    weights = {}
    for name, shape in caffe.CAFFE_SHAPES.items():
        shape = (num_classes,) + shape[1:] if shape[0] is None else shape
        fan_in = int(np.prod(shape[1:]))
        weights[name] = (rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32),
                         rng.normal(0, 0.1, shape[0]).astype(np.float32))  # fmt: skip
    return weights


def write_caffemodel(path, weights, legacy=False):
    """bvlc_alexnet's layers, as Caffe writes them (``layer``, or ``layers`` with legacy
    4-D blob dimensions)."""
    m = caffe_messages()
    net = m["NetParameter"](name="AlexNet")
    order = ["conv1", "norm1", "pool1", "conv2", "norm2", "pool2", "conv3", "conv4", "conv5",
             "pool5", "fc6", "fc7", "fc8"]  # fmt: skip
    v1_types = {"conv": 4, "norm": 15, "pool": 17, "fc": 14}
    for name in order:
        layer = net.layers.add() if legacy else net.layer.add()
        layer.name = name
        kind = name.rstrip("0123456789")
        if legacy:
            layer.type = v1_types[kind]
        else:
            layer.type = {"conv": "Convolution", "norm": "LRN", "pool": "Pooling",
                          "fc": "InnerProduct"}[kind]  # fmt: skip
        if kind == "norm":
            layer.lrn_param.local_size, layer.lrn_param.alpha = 5, 1e-4
            layer.lrn_param.beta = 0.75
        elif kind == "pool":
            layer.pooling_param.pool, layer.pooling_param.kernel_size = 0, 3
            layer.pooling_param.stride = 2
        else:
            if kind == "conv":
                layer.convolution_param.group = caffe.GROUPS.get(name, 1)
            for array in weights[name]:
                blob = layer.blobs.add()
                if legacy:
                    dims = (1,) * (4 - array.ndim) + array.shape
                    blob.num, blob.channels, blob.height, blob.width = dims
                else:
                    blob.shape.dim.extend(array.shape)
                # ``data``, the packed floats, parsed by protobuf from their wire form: the same
                # message as ``blob.data.extend(array.ravel().tolist())``, byte for byte, in
                # 1-5 s a file for AlexNet's 61 M values instead of 9 on the EPYC.
                number = blob.DESCRIPTOR.fields_by_name["data"].number
                floats = array.astype("<f4").tobytes()
                blob.MergeFromString(varint(number << 3 | 2) + varint(len(floats)) + floats)
    with open(path, "wb") as f:
        f.write(net.SerializeToString())


def varint(value):
    """``value`` as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def torch_caffe_alexnet(weights):
    """BVLC's AlexNet written in torch.nn with Caffe's own conventions: BGR input, LRN with
    k=1 and alpha divided by the window (PyTorch's convention is Caffe's), ceil-rounded
    max-pooling, grouped convolutions, flattening as (C, H, W)."""
    nn = torch.nn
    lrn = lambda: nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)  # noqa: E731
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
    net = nn.Sequential(
        nn.Conv2d(3, 96, 11, 4), nn.ReLU(), lrn(), pool(),
        nn.Conv2d(96, 256, 5, padding=2, groups=2), nn.ReLU(), lrn(), pool(),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1, groups=2), nn.ReLU(), pool(), nn.Flatten(),
        nn.Linear(9216, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, weights["fc8"][0].shape[0]),
    ).eval()  # fmt: skip
    learned = [m for m in net if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        for module, name in zip(learned, caffe.LAYERS, strict=True):
            module.weight.copy_(torch.from_numpy(weights[name][0]))
            module.bias.copy_(torch.from_numpy(weights[name][1]))
    return net


@pytest.fixture(scope="module")
def caffe_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("caffe")
    weights = random_caffe_weights(np.random.default_rng(0), num_classes=10)
    write_caffemodel(folder / "alexnet.caffemodel", weights)
    write_caffemodel(folder / "legacy.caffemodel", weights, legacy=True)
    return folder, weights


@pytest.mark.parametrize("name", ["alexnet", "legacy"])
def test_caffemodel_converts_to_logits_equal_to_caffes(caffe_files, name):
    folder, weights = caffe_files
    layers = caffe.read_caffemodel(str(folder / f"{name}.caffemodel"))
    variables, lrn = caffe.caffe_to_flax(layers)
    assert lrn == pytest.approx({"lrn_size": 5, "lrn_k": 1.0, "lrn_alpha": 2e-5, "lrn_beta": 0.75})
    from alexnet_jax.model import AlexNet

    model = AlexNet(num_classes=10, variant="paper", groups=2, **lrn)
    bgr = np.random.default_rng(1).uniform(-120, 130, (2, 3, 227, 227)).astype(np.float32)
    with torch.no_grad():
        expected = torch_caffe_alexnet(weights)(torch.from_numpy(bgr)).numpy()
    rgb = bgr[:, ::-1].transpose(0, 2, 3, 1)  # our model takes RGB, NHWC
    ours = np.asarray(model.apply(variables, rgb))
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_caffes_ceil_pooling_equals_ours_at_227():
    """Caffe rounds pooled sizes up, XLA and our spatial sizes down: at 227 they agree."""
    from alexnet_jax.model import spatial_sizes

    x = torch.zeros(1, 1, 227, 227)
    sizes = []
    for conv in (torch.nn.Conv2d(1, 1, 11, 4), torch.nn.Conv2d(1, 1, 5, padding=2),
                 torch.nn.Conv2d(1, 1, 3, padding=1)):  # fmt: skip
        x = torch.nn.MaxPool2d(3, 2, ceil_mode=True)(conv(x))
        sizes.append(x.shape[-1])
    ours = spatial_sizes("paper", 227)
    assert sizes == [ours["conv1"], ours["conv2"], ours["conv5"]] == [27, 13, 6]


@pytest.mark.slow
def test_a_caffe_workdir_predicts_evaluates_and_fine_tunes(caffe_files, tmp_path):
    folder, weights = caffe_files
    mean = np.random.default_rng(2).uniform(90, 130, (3, 256, 256)).astype(np.float32)
    write_mean_file(tmp_path / "mean.binaryproto", mean)
    workdir = tmp_path / "converted"
    variables, _ = caffe.caffe_to_flax(caffe.read_caffemodel(str(folder / "alexnet.caffemodel")))
    convert.main([str(folder / "alexnet.caffemodel"), "--from", "caffe", "--workdir",
                  str(workdir), "--mean_file", str(tmp_path / "mean.binaryproto")])  # fmt: skip
    config = run_files.load_run_config(str(workdir))
    assert (config.model.variant, config.model.groups, config.model.lrn_k) == ("paper", 2, 1.0)
    assert config.input.normalization == "mean_image"
    rgb_mean = np.load(workdir / "mean_image.npy")
    np.testing.assert_allclose(rgb_mean, mean[::-1, 14:241, 14:241].transpose(1, 2, 0))

    from PIL import Image

    photo = np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    config.dataset = "image_folder"  # predict as an image-folder run reads its files
    (result,) = evaluate.predict_files(config, str(workdir), [str(tmp_path / "photo.png")])
    pixels = data.load_image(str(tmp_path / "photo.png"), config).astype(np.float32)
    bgr_minus_mean = (pixels - rgb_mean)[..., ::-1].transpose(2, 0, 1)[None].copy()
    with torch.no_grad():
        logits = torch_caffe_alexnet(weights)(torch.from_numpy(bgr_minus_mean))
        probs = torch.softmax(logits, -1)[0].numpy()
    # Our top 5 are Caffe's top 5 with its probabilities (classes whose probabilities tie
    # within float32 rounding, or underflow to 0 or denormals, may come in either order).
    ours = [int(name) for name, _ in result["top"]]
    np.testing.assert_allclose([p for _, p in result["top"]], probs[ours], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(probs[ours], np.sort(probs)[::-1][:5], rtol=1e-3, atol=1e-6)

    # --mode=eval on an image folder of 10 classes (the converted head's), both crop counts.
    from tests.test_prepared import photo_folder

    ten = photo_folder(tmp_path / "ten", classes=10, per_class=1, val_per_class=1)
    config.data_dir, config.batch_size, config.eval_batch_size = str(ten), 4, 4
    centre, crops = evaluate.evaluate_checkpoint(config, str(workdir), "latest")
    assert (centre["count"], crops["count"], centre["step"]) == (10, 10, 0)

    # Fine-tuning from it: every layer copied, a new head for 3 classes.
    tune = config.copy_and_resolve_references()
    tune.update(dict(num_classes=3, init_from=str(workdir)))
    fresh = template_state(tune)
    tuned = train.init_from(fresh, tune)
    for layer in caffe.LAYERS[:-1]:
        np.testing.assert_array_equal(tuned.params[layer]["kernel"],
                                      np.asarray(variables["params"][layer]["kernel"]))  # fmt: skip
    assert tuned.params["fc8"]["kernel"].shape == (4096, 3)


def write_mean_file(path, mean_bgr):
    blob = caffe_messages()["BlobProto"]()
    blob.num, blob.channels, blob.height, blob.width = (1,) + mean_bgr.shape
    blob.data.extend(mean_bgr.ravel().tolist())
    path.write_bytes(blob.SerializeToString())


def test_bad_caffemodels_are_named(caffe_files, tmp_path):
    folder, weights = caffe_files
    data_bytes = (folder / "alexnet.caffemodel").read_bytes()
    (tmp_path / "torn.caffemodel").write_bytes(data_bytes[: len(data_bytes) // 2])
    with pytest.raises(CheckpointError, match="torn.caffemodel.* is not a readable"):
        caffe.read_caffemodel(str(tmp_path / "torn.caffemodel"))
    bad = dict(weights, conv3=(np.zeros((384, 128, 3, 3), np.float32), weights["conv3"][1]))
    write_caffemodel(tmp_path / "odd.caffemodel", bad)
    with pytest.raises(CheckpointError, match=r"'conv3' weight has shape \(384, 128, 3, 3\)"):
        caffe.caffe_to_flax(caffe.read_caffemodel(str(tmp_path / "odd.caffemodel")))
    (tmp_path / "notes.caffemodel").write_text("hello, not a protobuf at all")
    with pytest.raises(CheckpointError, match="notes.caffemodel"):
        caffe.read_caffemodel(str(tmp_path / "notes.caffemodel"))
