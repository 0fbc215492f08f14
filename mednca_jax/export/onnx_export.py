"""Med-NCA inference as one ONNX graph (``mednca.onnx``), built node by node with ``onnx.helper``.

Graph (opset 18), channels-first ``(B, C, h, w)`` inside::

    inputs   images (B, H, W) float32 [(B, H, W, n_in) when n_in > 1], preprocessed slices;
             H, W divisible by scales[0]
             fire_rate () float32: a cell updates where u > fire_rate (0: all, deterministic)
             seed () int64: selects the fire masks (same seed, same masks)
    output   logits (B, H, W, n_out) float32

    per level i:  img_i = downscale(images, scales[i])            (a strided Conv)
                  x = [img_i | zeros] (level 0) or [img_i | nearest-upsampled x][no input chans]
                  Loop steps_i times:  x = [img_i | (x + fc1(relu(fc0([x | conv(Pad_reflect(x))]))) * mask)[n_in:]]

The steps are an ONNX ``Loop`` (one body per level, not unrolled). Fire masks: ONNX's
RandomUniform(Like) take their seed as a static *attribute* (and onnxruntime keeps one
generator per node, so repeated runs of a session continue the stream instead of repeating
it), so a seed *input* cannot drive them. The masks are therefore a counter-based hash in
uint32 integer ops (``BitShift``, ``BitwiseXor``, ``Mul`` wrapping mod 2^32), a function of
(seed, level, step, cell index) only: reproducible across runs, sessions and machines, and
computable outside ONNX (:func:`fire_masks` gives the same masks in NumPy, which the NumPy
runtime accepts as explicit ``masks``). They are not the NumPy/PyTorch runtimes' streams: at
fire rates > 0 the ONNX results agree with them in distribution only.

Why ``onnx.helper`` rather than jax2onnx/torch.onnx: the graph is small (a dozen node kinds),
the Loop, the reflect Pad and the hash must come out exactly as written, and tracing
exporters either unroll the steps or have no path for a seeded counter-based mask; building
the graph by hand keeps every node visible and needs no extra dependency beyond ``onnx``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ONNX_FILE = "mednca.onnx"
OPSET = 18
# lowbias32 (a 32-bit integer finaliser with good avalanche): x ^= x>>16; x *= M1; x ^= x>>15;
# x *= M2; x ^= x>>16.
HASH_M1, HASH_M2 = 0x7FEB352D, 0x846CA68B
GOLDEN = 0x9E3779B9


# --------------------------------------------------------------------------- the masks, in NumPy
def _hash32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(HASH_M1)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(HASH_M2)
    return x ^ (x >> np.uint32(16))


def level_key(seed: int, level: int) -> np.uint32:
    """Key of level ``level`` for ``seed``: ``hash(low 32 bits of seed ^ (level+1) * GOLDEN)``."""
    with np.errstate(over="ignore"):
        return _hash32(np.uint32(seed & 0xFFFFFFFF) ^ np.uint32(((level + 1) * GOLDEN) & 0xFFFFFFFF))


def fire_uniform(seed: int, level: int, step: int, shape: Sequence[int]) -> np.ndarray:
    """The graph's ``u`` in (0, 1] for one step, ``(B, h, w)`` float32: with the cell index
    ``n = (b*h + y)*w + x``, ``u = 1 - (hash(n ^ hash(key + step)) >> 8) / 2^24``."""
    with np.errstate(over="ignore"):
        k = _hash32(level_key(seed, level) + np.uint32(step))
        n = np.arange(int(np.prod(shape)), dtype=np.uint32).reshape(tuple(shape))
        v = _hash32(n ^ k)
    return np.float32(1.0) - (v >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)


def fire_masks(seed: int, fire_rate: float, steps: Sequence[int], shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """The masks the graph draws: one bool ``(steps_i, B, h_i, w_i)`` per level (``shapes[i] =
    (B, h_i, w_i)``), for the runtimes' explicit ``masks`` argument."""
    return [np.stack([fire_uniform(seed, i, s, shape) > np.float32(fire_rate) for s in range(n)])
            for i, (n, shape) in enumerate(zip(steps, shapes))]


# --------------------------------------------------------------------------- graph building
class _Graph:
    """Collects nodes/initializers with unique names."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.n = 0

    def name(self, what: str) -> str:
        self.n += 1
        return f"{self.prefix}{what}_{self.n}"

    def op(self, op_type: str, inputs: Sequence[str], what: str = "", **attrs: Any) -> str:
        from onnx import helper

        out = self.name(what or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value: np.ndarray, what: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(what)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def hash32(self, x: str, consts: dict[str, str]) -> str:
        """lowbias32 of a uint32 tensor (``consts``: names of the shift/multiplier scalars)."""
        x = self.op("BitwiseXor", [x, self.op("BitShift", [x, consts["s16"]], direction="RIGHT")])
        x = self.op("Mul", [x, consts["m1"]])
        x = self.op("BitwiseXor", [x, self.op("BitShift", [x, consts["s15"]], direction="RIGHT")])
        x = self.op("Mul", [x, consts["m2"]])
        return self.op("BitwiseXor", [x, self.op("BitShift", [x, consts["s16"]], direction="RIGHT")])


def _downscale_kernel(factor: int, method: str, n_in: int) -> np.ndarray:
    """Depthwise ``(n_in, 1, f, f)`` kernel of a stride-``f`` downscale: bilinear without
    anti-aliasing samples each block's centre (even f: mean of the centre 2x2; odd f: the
    centre pixel); area is the block mean."""
    k = np.zeros((factor, factor), np.float32)
    if method == "area":
        k[:] = 1.0 / factor ** 2
    elif method == "bilinear":
        if factor % 2 == 0:
            lo = factor // 2 - 1
            k[lo:lo + 2, lo:lo + 2] = 0.25
        else:
            k[factor // 2, factor // 2] = 1.0
    else:
        raise ValueError(method)
    return np.ascontiguousarray(np.broadcast_to(k, (n_in, 1, factor, factor)))


def build_model(arrays: dict[str, np.ndarray], model_cfg: Any) -> Any:
    """The ONNX ``ModelProto`` of the whole inference from ``weights.npz``-style arrays
    (format 2: ``level{i}.perception.kernel (3, 3, C, F)`` ...) and the model config."""
    import onnx
    from onnx import TensorProto, helper

    c, n_in, n_out = model_cfg.channels, model_cfg.n_in, model_cfg.n_out
    steps, scales = list(model_cfg.steps), list(model_cfg.scales)
    g = _Graph("")
    if n_in == 1:
        images_vi = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", "H", "W"])
        full = g.op("Unsqueeze", ["images", g.const(np.array([1], np.int64))], "full")
    else:
        images_vi = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", "H", "W", n_in])
        full = g.op("Transpose", ["images"], "full", perm=[0, 3, 1, 2])
    inputs = [images_vi, helper.make_tensor_value_info("fire_rate", TensorProto.FLOAT, []),
              helper.make_tensor_value_info("seed", TensorProto.INT64, [])]
    consts = {"s16": g.const(np.uint32(16), "s16"), "s15": g.const(np.uint32(15), "s15"),
              "m1": g.const(np.uint32(HASH_M1), "m1"), "m2": g.const(np.uint32(HASH_M2), "m2")}
    seed32 = g.op("Cast", ["seed"], "seed32", to=TensorProto.UINT32)  # low 32 bits
    pads = g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    one = g.const(np.float32(1.0), "one")
    inv24 = g.const(np.float32(2.0 ** -24), "inv24")
    s8 = g.const(np.uint32(8), "s8")
    ch_start, ch_end, ch_axis = (g.const(np.array([n_in], np.int64)), g.const(np.array([c], np.int64)),
                                 g.const(np.array([1], np.int64)))
    x = ""
    for i in range(len(steps)):
        f = scales[i]
        img = full if f == 1 else g.op("Conv", [full, g.const(_downscale_kernel(f, model_cfg.downscale, n_in), f"down{i}")],
                                       f"img{i}", strides=[f, f], group=n_in)
        if i == 0:
            shape = g.op("Shape", [img])
            zshape = g.op("Add", [g.op("Mul", [shape, g.const(np.array([1, 0, 1, 1], np.int64))]),
                                  g.const(np.array([0, c - n_in, 0, 0], np.int64))])
            zeros = g.op("ConstantOfShape", [zshape], "zeros", value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))
            x = g.op("Concat", [img, zeros], "x0", axis=1)
        else:
            r = scales[i - 1] // f
            up = g.op("Resize", [x, "", g.const(np.array([1, 1, r, r], np.float32), "up")], f"up{i}", mode="nearest",
                      coordinate_transformation_mode="asymmetric", nearest_mode="floor")
            x = g.op("Concat", [img, g.op("Slice", [up, ch_start, ch_end, ch_axis])], f"x{i}", axis=1)
        # Cell index n = (b*h + y)*w + x as uint32, and the level's key (outside the loop).
        shape = g.op("Shape", [img])
        ones4 = g.const(np.array([1, 0, 1, 1], np.int64))
        cells = g.op("ReduceProd", [g.op("Add", [g.op("Mul", [shape, ones4]), g.const(np.array([0, 1, 0, 0], np.int64))])],
                     keepdims=0)
        idx = g.op("Range", [g.const(np.int64(0)), cells, g.const(np.int64(1))])
        idx = g.op("Reshape", [g.op("Cast", [idx], to=TensorProto.UINT32),
                               g.op("Add", [g.op("Mul", [shape, ones4]), g.const(np.array([0, 1, 0, 0], np.int64))])], f"idx{i}")
        key = g.hash32(g.op("BitwiseXor", [seed32, g.const(np.uint32(((i + 1) * GOLDEN) & 0xFFFFFFFF))]), consts)

        # Weights as ONNX Conv kernels (F, C, 3, 3), (hid, C+F, 1, 1), (C, hid, 1, 1).
        a = lambda k: np.asarray(arrays[f"level{i}.{k}"], np.float32)  # noqa: E731
        wp = g.const(np.ascontiguousarray(a("perception.kernel").transpose(3, 2, 0, 1)), f"l{i}_perception_w")
        bp = g.const(a("perception.bias"), f"l{i}_perception_b")
        w0 = g.const(np.ascontiguousarray(a("fc0.kernel").T[:, :, None, None]), f"l{i}_fc0_w")
        b0 = g.const(a("fc0.bias"), f"l{i}_fc0_b")
        w1 = g.const(np.ascontiguousarray(a("fc1.kernel").T[:, :, None, None]), f"l{i}_fc1_w")

        b = _Graph(f"l{i}_")
        it, cond_in, xin = f"l{i}_iter", f"l{i}_cond_in", f"l{i}_x_in"
        xp = b.op("Pad", [xin, pads], "xp", mode="reflect")
        y = b.op("Concat", [xin, b.op("Conv", [xp, wp, bp], "perceive")], "y", axis=1)
        hid = b.op("Relu", [b.op("Conv", [y, w0, b0], "fc0")], "hid")
        d = b.op("Conv", [hid, w1], "delta")
        k = b.hash32(b.op("Add", [key, b.op("Cast", [it], to=TensorProto.UINT32)]), consts)
        v = b.hash32(b.op("BitwiseXor", [idx, k]), consts)
        u = b.op("Sub", [one, b.op("Mul", [b.op("Cast", [b.op("BitShift", [v, s8], direction="RIGHT")], to=TensorProto.FLOAT),
                                           inv24])], "u")
        mask = b.op("Cast", [b.op("Greater", [u, "fire_rate"])], "mask", to=TensorProto.FLOAT)
        xn = b.op("Add", [xin, b.op("Mul", [d, mask])])
        xout = b.op("Concat", [img, b.op("Slice", [xn, ch_start, ch_end, ch_axis])], "x_out", axis=1)
        cond_out = b.op("Identity", [cond_in], "cond_out")
        body = helper.make_graph(
            b.nodes, f"level{i}_step",
            [helper.make_tensor_value_info(it, TensorProto.INT64, []),
             helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
             helper.make_tensor_value_info(xin, TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
             helper.make_tensor_value_info(xout, TensorProto.FLOAT, None)])
        x = g.op("Loop", [g.const(np.int64(steps[i]), f"steps{i}"), "", x], f"level{i}_out", body=body)

    logits = g.op("Slice", [x, g.const(np.array([n_in], np.int64)), g.const(np.array([n_in + n_out], np.int64)), ch_axis])
    g.nodes.append(helper.make_node("Transpose", [logits], ["logits"], name="logits", perm=[0, 2, 3, 1]))
    graph = helper.make_graph(g.nodes, "mednca", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "H", "W", n_out])],
                              initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mednca_jax")
    model.ir_version = min(model.ir_version, 9)  # readable by onnxruntime >= 1.17
    model.doc_string = (f"Med-NCA, {len(steps)} levels, scales {scales}, steps {steps}, C={c}; inputs images "
                        f"(B, H, W{'' if n_in == 1 else ', n_in'}) float32, fire_rate () float32, seed () int64")
    onnx.checker.check_model(model, full_check=True)
    return model


def write_onnx(arrays: dict[str, np.ndarray], model_cfg: Any, config_json: dict, out_dir: str | Path) -> list[Path]:
    """Write ``mednca.onnx`` and ``config.json`` into ``out_dir``; returns the files."""
    import onnx

    out = Path(out_dir)
    model = build_model(arrays, model_cfg)
    files = [out / ONNX_FILE, out / "config.json"]
    onnx.save(model, str(files[0]))
    files[1].write_text(json.dumps(config_json, indent=2) + "\n")
    return files
