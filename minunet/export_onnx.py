"""The U-Net as an ONNX graph, built node by node with ``onnx.helper`` (``onnx_model``), for other tools.

The graph follows ``UNet.forward`` layer by layer; every weight is an initializer under its minunet
name (``enc0.conv1.weight``...), in the layouts ONNX shares with PyTorch:

    image (N, Cin, H, W)
    enc{i}:      Conv 3x3 pad 1 -> Relu -> Conv 3x3 pad 1 -> Relu   = skip{i}    (i = 0 .. D-1)
                 MaxPool 2x2 stride 2
    bottleneck:  Conv -> Relu -> Conv -> Relu
    dec{i}:      ConvTranspose 2x2 stride 2 (W: Cin, Cout, 2, 2)    (i = D-1 .. 0)
                 Concat([skip{i}, up], axis 1): the skip first, as ``backend.upconv2x2_forward`` writes them
                 Conv -> Relu -> Conv -> Relu
    head:        Conv 1x1 -> logits (N, 1, H, W); Sigmoid -> probability with ``sigmoid``

The model has no normalisation layer, so there is none to export. Float16 weights stay float16 in
the file (half its size) and a Cast node turns each into float32 before use: the arithmetic is
float32 whatever the storage, as in minunet. ``onnx`` is the optional extra ``minunet[onnx]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minunet.atomicfile import atomic_write
from minunet.errors import ConfigError

OPSET = 17
IR_VERSION = 8  # the IR version of opset 17 (onnx 1.12): what tools of that age and newer read
INPUT = "image"


def onnx_model(model, size: int = 256, dynamic: bool = False, sigmoid: bool = False, weights_dtype="float32",
               meta=None):
    """An ``onnx.ModelProto`` of ``model``'s forward (checked with ``onnx.checker``): input ``image``
    (1, Cin, size, size), or (N, Cin, H, W) with ``dynamic`` (H and W multiples of 2**depth);
    output ``logits`` or, with ``sigmoid``, ``probability``. ``meta`` goes into the metadata as JSON."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise ConfigError("exporting to ONNX needs the onnx package: pip install 'minunet[onnx]'") from None
    from minunet import __version__

    nodes, inits = [], []

    def weight(name):
        a = np.asarray(model.backend.to_host(model.params[name])).astype(weights_dtype)
        inits.append(numpy_helper.from_array(a, name))
        if a.dtype == np.float32:
            return name
        nodes.append(helper.make_node("Cast", [name], [f"{name}.f32"], name=f"{name}.cast", to=TensorProto.FLOAT))
        return f"{name}.f32"

    def conv(x, prefix, k=3, relu=True, y=None):
        y = y or f"{prefix}.out"
        nodes.append(helper.make_node("Conv", [x, weight(f"{prefix}.weight"), weight(f"{prefix}.bias")], [y],
                                      name=prefix, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[1, 1]))
        if not relu:
            return y
        nodes.append(helper.make_node("Relu", [y], [f"{prefix}.relu"], name=f"{prefix}.relu"))
        return f"{prefix}.relu"

    def double(x, prefix):
        return conv(conv(x, f"{prefix}.conv1"), f"{prefix}.conv2")

    x, skips = INPUT, []
    for i in range(model.depth):
        skips.append(double(x, f"enc{i}"))
        x = f"pool{i}"
        nodes.append(helper.make_node("MaxPool", [skips[i]], [x], name=x, kernel_shape=[2, 2], strides=[2, 2]))
    x = double(x, "bottleneck")
    for i in reversed(range(model.depth)):
        up = f"dec{i}.up"
        nodes.append(helper.make_node("ConvTranspose", [x, weight(f"{up}.weight"), weight(f"{up}.bias")],
                                      [f"{up}.out"], name=up, kernel_shape=[2, 2], strides=[2, 2]))
        nodes.append(helper.make_node("Concat", [skips[i], f"{up}.out"], [f"dec{i}.cat"], name=f"dec{i}.cat", axis=1))
        x = double(f"dec{i}.cat", f"dec{i}")
    out = conv(x, "head", k=1, relu=False, y="logits")
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", [out], ["probability"], name="sigmoid"))
        out = "probability"

    n, h, w = ("N", "H", "W") if dynamic else (1, size, size)
    graph = helper.make_graph(
        nodes, "minunet_unet",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [n, model.in_channels, h, w])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [n, 1, h, w])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                          producer_name="minunet", producer_version=__version__,
                          doc_string="U-Net from minunet: 8-bit grey image / 255 in, per-pixel "
                                     + ("probability" if sigmoid else "logit") + " out")
    if meta is not None:
        helper.set_model_props(m, {"minunet": json.dumps(meta)})
    onnx.checker.check_model(m, full_check=True)
    return m


def save_onnx(out, model, meta, weights_dtype, size, dynamic, sigmoid) -> tuple[Path, dict]:
    """Write ``onnx_model(...)`` to ``out`` (atomically); (path, what config.json says of the graph)."""
    m = onnx_model(model, size, dynamic, sigmoid, weights_dtype, meta)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(m.SerializeToString()))
    shape = ["N", model.in_channels, "H", "W"] if dynamic else [1, model.in_channels, size, size]
    info = {"opset": OPSET, "input": INPUT, "input_shape": shape, "output_name": m.graph.output[0].name}
    return path, info
