"""Generic ONNX ops of the executor (compressor/onnx_ops.py) against onnxruntime, one-node models, fresh inputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sparsec.compressor.errors import UnsupportedOpError
from sparsec.compressor.onnx_ops import SUPPORTED, run_op, supported

NP2ONNX = {np.float32: TensorProto.FLOAT, np.int64: TensorProto.INT64, np.bool_: TensorProto.BOOL, np.int32: TensorProto.INT32}


def f(*shape):
    return lambda r: r.standard_normal(shape).astype(np.float32)


def pos(*shape):
    return lambda r: (r.random(shape) + 0.1).astype(np.float32)


def i64(*vals):
    return lambda r: np.array(vals, dtype=np.int64)


def ints(lo, hi, *shape):
    return lambda r: r.integers(lo, hi, size=shape).astype(np.int64)


# (id, op, input makers (None = omitted), attrs, opset, n_outputs)
CASES = [
    ("add-bcast", "Add", [f(3, 4), f(4)], {}, 17, 1),
    ("sub", "Sub", [f(2, 3), f(2, 1)], {}, 17, 1),
    ("mul", "Mul", [f(2, 3), f(1, 3)], {}, 13, 1),
    ("div", "Div", [f(2, 3), pos(2, 3)], {}, 17, 1),
    ("div-int", "Div", [ints(-20, 20, 6), lambda r: np.array([3, -3, 4, -4, 7, 2], np.int64)], {}, 17, 1),
    ("mod-int", "Mod", [ints(-20, 20, 6), lambda r: np.array([3, -3, 4, -4, 7, 2], np.int64)], {}, 17, 1),
    ("fmod", "Mod", [f(6), pos(6)], {"fmod": 1}, 17, 1),
    ("pow", "Pow", [pos(2, 3), f(2, 3)], {}, 17, 1),
    ("pow-scalar", "Pow", [f(2, 3), lambda r: np.array(2.0, np.float32)], {}, 17, 1),
    ("max3", "Max", [f(2, 3), f(3), f(2, 1)], {}, 17, 1),
    ("sqrt", "Sqrt", [pos(5)], {}, 17, 1),
    ("reciprocal", "Reciprocal", [pos(5)], {}, 17, 1),
    ("erf", "Erf", [f(5)], {}, 17, 1),
    ("tanh", "Tanh", [f(5)], {}, 17, 1),
    ("sigmoid", "Sigmoid", [f(5)], {}, 17, 1),
    ("gelu", "Gelu", [f(7)], {}, 20, 1),
    ("gelu-tanh", "Gelu", [f(7)], {"approximate": "tanh"}, 20, 1),
    ("softmax", "Softmax", [f(2, 3, 5)], {"axis": 1}, 13, 1),
    ("softmax-11", "Softmax", [f(2, 3, 5)], {"axis": 1}, 11, 1),
    ("logsoftmax", "LogSoftmax", [f(2, 5)], {}, 17, 1),
    ("leakyrelu", "LeakyRelu", [f(6)], {"alpha": 0.2}, 17, 1),
    ("clip", "Clip", [f(6), lambda r: np.array(-0.5, np.float32), lambda r: np.array(0.5, np.float32)], {}, 17, 1),
    ("clip-min-only", "Clip", [f(6), lambda r: np.array(-0.5, np.float32), None], {}, 17, 1),
    ("matmul-batched", "MatMul", [f(2, 3, 4), f(4, 5)], {}, 17, 1),
    ("matmul-1d", "MatMul", [f(4), f(2, 4, 3)], {}, 17, 1),
    ("gemm", "Gemm", [f(3, 4), f(5, 4), f(5)], {"transB": 1, "alpha": 0.5, "beta": 2.0}, 17, 1),
    ("transpose", "Transpose", [f(2, 3, 4)], {"perm": [2, 0, 1]}, 17, 1),
    ("transpose-default", "Transpose", [f(2, 3, 4)], {}, 17, 1),
    ("reshape-0-1", "Reshape", [f(2, 3, 4), i64(0, -1)], {}, 17, 1),
    ("flatten", "Flatten", [f(2, 3, 4)], {"axis": 2}, 17, 1),
    ("squeeze-13", "Squeeze", [f(2, 1, 3, 1), i64(-1)], {}, 13, 1),
    ("squeeze-11", "Squeeze", [f(2, 1, 3, 1)], {"axes": [1]}, 11, 1),
    ("unsqueeze-13", "Unsqueeze", [f(2, 3), i64(0, -1)], {}, 13, 1),
    ("unsqueeze-11", "Unsqueeze", [f(2, 3)], {"axes": [1]}, 11, 1),
    ("shape", "Shape", [f(2, 3, 4)], {}, 17, 1),
    ("shape-start", "Shape", [f(2, 3, 4)], {"start": 1, "end": -1}, 17, 1),
    ("concat", "Concat", [f(2, 3), f(2, 1)], {"axis": -1}, 17, 1),
    ("split-18", "Split", [f(6, 2)], {"axis": 0, "num_outputs": 3}, 18, 3),
    ("split-13", "Split", [f(6, 2), i64(2, 4)], {"axis": 0}, 13, 2),
    ("slice", "Slice", [f(5, 6), i64(1, -4), i64(100, -1), i64(0, 1), i64(2, 1)], {}, 17, 1),
    ("slice-neg-step", "Slice", [f(5, 6), i64(-1), i64(-100), i64(1), i64(-2)], {}, 17, 1),
    ("gather", "Gather", [f(5, 3), lambda r: np.array([[0, -1], [2, 4]], np.int64)], {"axis": 0}, 17, 1),
    ("gather-scalar", "Gather", [f(5, 3), lambda r: np.array(-2, np.int64)], {"axis": 1}, 17, 1),
    ("gather-elements", "GatherElements", [f(3, 4), ints(0, 4, 3, 2)], {"axis": 1}, 17, 1),
    ("where", "Where", [lambda r: r.random((3, 4)) > 0.5, f(3, 4), f(4)], {}, 17, 1),
    ("equal", "Equal", [ints(0, 3, 6), ints(0, 3, 6)], {}, 17, 1),
    ("less", "Less", [f(6), f(6)], {}, 17, 1),
    ("not", "Not", [lambda r: r.random(5) > 0.5], {}, 17, 1),
    ("cast-f2i", "Cast", [f(6)], {"to": TensorProto.INT64}, 17, 1),
    ("cast-i2f", "Cast", [ints(-5, 5, 6)], {"to": TensorProto.FLOAT}, 17, 1),
    ("cast-bool", "Cast", [f(6)], {"to": TensorProto.BOOL}, 17, 1),
    ("expand", "Expand", [f(3, 1), i64(2, 1, 4)], {}, 17, 1),
    ("tile", "Tile", [f(2, 3), i64(2, 1)], {}, 17, 1),
    ("range", "Range", [lambda r: np.array(2, np.int64), lambda r: np.array(11, np.int64), lambda r: np.array(3, np.int64)], {}, 17, 1),
    ("constantofshape", "ConstantOfShape", [i64(2, 3)], {"value": numpy_helper.from_array(np.array([1.5], np.float32))}, 17, 1),
    ("trilu", "Trilu", [f(4, 5), lambda r: np.array(1, np.int64)], {"upper": 0}, 17, 1),
    ("cumsum", "CumSum", [f(2, 5), lambda r: np.array(1, np.int64)], {"exclusive": 1, "reverse": 1}, 17, 1),
    ("reducemean-18", "ReduceMean", [f(2, 3, 4), i64(-1)], {"keepdims": 1}, 18, 1),
    ("reducemean-13", "ReduceMean", [f(2, 3, 4)], {"axes": [1], "keepdims": 0}, 13, 1),
    ("reducesum-13", "ReduceSum", [f(2, 3, 4), i64(0, 2)], {"keepdims": 0}, 13, 1),
    ("reducemax-all", "ReduceMax", [f(2, 3)], {"keepdims": 0}, 18, 1),
    ("argmax", "ArgMax", [f(3, 5)], {"axis": 1, "keepdims": 0}, 17, 1),
    ("topk", "TopK", [f(3, 6), i64(2)], {"axis": -1}, 17, 2),
    ("layernorm", "LayerNormalization", [f(2, 3, 8), f(8), f(8)], {"epsilon": 1e-5}, 17, 1),
    ("conv2d", "Conv", [f(1, 2, 7, 7), f(4, 2, 3, 3), f(4)], {"pads": [1, 1, 1, 1], "strides": [2, 2]}, 17, 1),
    ("conv-same", "Conv", [f(1, 4, 6, 6), f(4, 1, 3, 3)], {"auto_pad": "SAME_UPPER", "group": 4}, 17, 1),
    ("maxpool", "MaxPool", [f(1, 2, 6, 6)], {"kernel_shape": [2, 2], "strides": [2, 2]}, 17, 1),
    ("avgpool", "AveragePool", [f(1, 2, 5, 5)], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, 17, 1),
    ("gap", "GlobalAveragePool", [f(1, 3, 4, 4)], {}, 17, 1),
    ("batchnorm", "BatchNormalization", [f(2, 3, 4), f(3), f(3), f(3), pos(3)], {}, 17, 1),
    ("pad-const", "Pad", [f(2, 3), i64(0, 1, 1, 2), lambda r: np.array(0.5, np.float32)], {}, 17, 1),
    ("pad-reflect", "Pad", [f(1, 2, 5), i64(0, 0, 2, 0, 0, 1)], {"mode": "reflect"}, 17, 1),
    ("onehot", "OneHot", [ints(0, 5, 4), i64(5), lambda r: np.array([0.0, 1.0], np.float32)], {}, 17, 1),
    ("einsum", "Einsum", [f(2, 3, 4), f(2, 4, 5)], {"equation": "bij,bjk->bik"}, 17, 1),
    ("nonzero", "NonZero", [lambda r: (r.random((3, 4)) > 0.5).astype(np.float32)], {}, 17, 1),
    ("scatternd", "ScatterND", [f(4, 3), lambda r: np.array([[1], [3]], np.int64), f(2, 3)], {}, 17, 1),
    ("hardswish", "HardSwish", [f(6)], {}, 17, 1),
]


def _ort(op_type, arrays, attrs, opset, n_out, out_types):
    ins, names = [], []
    for i, a in enumerate(arrays):
        if a is None:
            names.append("")
            continue
        nm = f"in{i}"
        names.append(nm)
        ins.append(helper.make_tensor_value_info(nm, NP2ONNX[a.dtype.type], list(a.shape)))
    # declared output types come from our result: onnxruntime refuses the model if they are wrong
    outs = [helper.make_tensor_value_info(f"out{i}", out_types[i], None) for i in range(n_out)]
    node = helper.make_node(op_type, names, [o.name for o in outs], **attrs)
    g = helper.make_graph([node], "g", ins, outs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {f"in{i}": a for i, a in enumerate(arrays) if a is not None})


@pytest.mark.parametrize("cid,op_type,makers,attrs,opset,n_out", CASES, ids=[c[0] for c in CASES])
def test_op_matches_onnxruntime(cid, op_type, makers, attrs, opset, n_out):
    seed = int(np.random.default_rng().integers(1 << 31))
    r = np.random.default_rng(seed)
    arrays = [None if m is None else m(r) for m in makers]
    py_attrs = {k: (numpy_helper.to_array(v) if hasattr(v, "dims") else v) for k, v in attrs.items()}
    got = run_op(op_type, "", [None if a is None else torch.from_numpy(np.asarray(a)) for a in arrays], py_attrs, opset, cid, num_outputs=n_out)
    types = [NP2ONNX[t.numpy().dtype.type] for t in got[:n_out]]
    ref = _ort(op_type, arrays, attrs, opset, n_out, types)
    assert len(got) >= n_out, cid
    for a, b in zip(ref, got):
        b = b.numpy()
        assert a.shape == b.shape, (cid, seed, a.shape, b.shape)
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=f"{cid} seed={seed}")
        else:
            assert a.dtype == b.dtype or (a.dtype.kind == b.dtype.kind), (cid, a.dtype, b.dtype)
            np.testing.assert_array_equal(b, a, err_msg=f"{cid} seed={seed}")


def test_unknown_op_names_node():
    with pytest.raises(UnsupportedOpError, match="node 'n42'"):
        run_op("NoSuchOp", "", [torch.zeros(2)], {}, 17, "n42")
    assert not supported("NoSuchOp")
    assert all(supported(o, d) for d, ops in SUPPORTED.items() for o in ops)
