"""Med-NCA inference as one ONNX graph (``mednca.onnx``), built node by node with ``onnx.helper``
from the rule description of every level (``config.json`` ``rules``, ``Rule.describe()``).

Graph (opset 18), channels-first ``(B, C, *S)`` inside, rank 2 ``(H, W)`` or 3 ``(X, Y, Z)``::

    inputs   images (B, *S) float32 [(B, *S, n_in) when n_in > 1], preprocessed images;
             every size divisible by scales[0]
             fire_rate () float32: a cell updates where u > fire_rate (0: all, deterministic)
             seed () int64: selects the fire masks (same seed, same masks)
    output   logits (B, *S, n_out) float32

    per level i:  img_i = downscale(images, scales[i])     (a strided Conv, or MaxPool for max)
                  x = [img_i | zeros] (level 0) or [img_i | nearest-upsampled x][no input chans]
                  Loop steps_i times:  x = [img_i | (x + step(x) * mask)[n_in:]]
    step(x) = fc1(relu(norm(fc0([x | Conv_k(Pad_reflect(x, k//2))]))))

with the level's dense linear perception kernel ``(k,)*nd + (C, F)`` as an N-D Conv (any odd
k), fc0/fc1 as 1x1 Convs, and, for norm ``batch``, the batch statistics of fc0's output over
batch and space (``ReduceMean`` accumulated in float64; biased variance, eps 1e-5) as in the reference. Only linear
perceptions and the ``mlp`` update are expressible; the exporter refuses others by name.

The steps are an ONNX ``Loop`` (one body per level, not unrolled). Fire masks: ONNX's
RandomUniform(Like) take their seed as a static *attribute* (and onnxruntime keeps one
generator per node, so repeated runs of a session continue the stream instead of repeating
it), so a seed *input* cannot drive them. The masks are therefore a counter-based hash in
uint32 integer ops (``BitShift``, ``BitwiseXor``, ``Mul`` wrapping mod 2^32), a function of
(seed, level, step, cell index) only: reproducible across runs, sessions and machines, and
computable outside ONNX (:func:`fire_masks` gives the same masks in NumPy, which the NumPy
runtime accepts as explicit ``masks``). They are not the NumPy/PyTorch runtimes' streams: at
fire rates > 0 the ONNX results agree with them in distribution only.

:func:`level_model` builds one level alone with explicit masks as an input, for comparing
the graph's step with the reference rollout on the same masks.

Why ``onnx.helper`` rather than jax2onnx/torch.onnx: the graph is small (a dozen node kinds),
the Loop, the reflect Pad and the hash must come out exactly as written, and tracing
exporters either unroll the steps or have no path for a seeded counter-based mask; building
the graph by hand keeps every node visible and needs no extra dependency beyond ``onnx``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

ONNX_FILE = "mednca.onnx"
OPSET = 18
# lowbias32 (a 32-bit integer finaliser with good avalanche): x ^= x>>16; x *= M1; x ^= x>>15;
# x *= M2; x ^= x>>16.
HASH_M1, HASH_M2 = 0x7FEB352D, 0x846CA68B
GOLDEN = 0x9E3779B9
BN_EPS = 1e-5


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
    """The graph's ``u`` in (0, 1] for one step, ``shape = (B, *S)`` float32: with ``n`` the
    C-order cell index (``(b*h + y)*w + x`` in 2D), ``u = 1 - (hash(n ^ hash(key + step)) >> 8) / 2^24``."""
    with np.errstate(over="ignore"):
        k = _hash32(level_key(seed, level) + np.uint32(step))
        n = np.arange(int(np.prod(shape)), dtype=np.uint32).reshape(tuple(shape))
        v = _hash32(n ^ k)
    return np.float32(1.0) - (v >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)


def fire_masks(seed: int, fire_rate: float, steps: Sequence[int], shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """The masks the graph draws: one bool ``(steps_i, B, *S_i)`` per level (``shapes[i] =
    (B, *S_i)``), for the runtimes' explicit ``masks`` argument."""
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


def _downscale_kernel(factor: int, method: str, n_in: int, ndim: int = 2) -> np.ndarray:
    """Depthwise ``(n_in, 1) + (f,)*ndim`` kernel of a stride-``f`` downscale: bilinear without
    anti-aliasing samples each block's centre (even f: mean of the centre 2x2(x2); odd f: the
    centre cell); area is the block mean."""
    k = np.zeros((factor,) * ndim, np.float32)
    if method == "area":
        k[:] = 1.0 / factor ** ndim
    elif method == "bilinear":
        if factor % 2 == 0:
            lo = factor // 2 - 1
            k[(slice(lo, lo + 2),) * ndim] = 1.0 / 2 ** ndim
        else:
            k[(factor // 2,) * ndim] = 1.0
    else:
        raise ValueError(method)
    return np.ascontiguousarray(np.broadcast_to(k, (n_in, 1) + (factor,) * ndim))


def _conv_kernel(kernel: np.ndarray) -> np.ndarray:
    """Channels-last ``(k,)*nd + (C, F)`` -> ONNX Conv's ``(F, C) + (k,)*nd``."""
    nd = kernel.ndim - 2
    return np.ascontiguousarray(kernel.transpose((nd + 1, nd) + tuple(range(nd))))


def _point_kernel(matrix: np.ndarray, nd: int) -> np.ndarray:
    """A per-cell matmul ``(n_in, n_out)`` as a 1x1(x1) Conv kernel ``(n_out, n_in) + (1,)*nd``."""
    return np.ascontiguousarray(matrix.T.reshape(matrix.shape[::-1] + (1,) * nd))


class _LevelConsts(NamedTuple):
    """Names of one level's initialisers in the outer graph (the Loop body reads them)."""

    wp: str
    bp: str
    w0: str
    b0: str
    w1: str
    pads: str
    bn: Optional[tuple[str, str, str, str]]  # (axes, eps, scale, bias) for norm == "batch"


def _level_consts(g: "_Graph", weights: dict[str, np.ndarray], rule: dict, tag: str) -> _LevelConsts:
    """The level's weights as Conv kernels ``(F, C, k..)``, ``(hid, C+F, 1..)``, ``(C, hid, 1..)``."""
    nd, r = int(rule["ndim"]), int(rule["kernel_size"]) // 2
    a = lambda k: np.asarray(weights[k], np.float32)  # noqa: E731
    bn = None
    if rule["norm"] == "batch":
        shape = (1, -1) + (1,) * nd
        bn = (g.const(np.array([0] + list(range(2, nd + 2)), np.int64), f"{tag}_bn_axes"), g.const(np.float32(BN_EPS), f"{tag}_eps"),
              g.const(a("bn.scale").reshape(shape), f"{tag}_bn_scale"), g.const(a("bn.bias").reshape(shape), f"{tag}_bn_bias"))
    return _LevelConsts(
        wp=g.const(_conv_kernel(a("perception.kernel")), f"{tag}_perception_w"), bp=g.const(a("perception.bias"), f"{tag}_perception_b"),
        w0=g.const(_point_kernel(a("fc0.kernel"), nd), f"{tag}_fc0_w"), b0=g.const(a("fc0.bias"), f"{tag}_fc0_b"),
        w1=g.const(_point_kernel(a("fc1.kernel"), nd), f"{tag}_fc1_w"),
        pads=g.const(np.array([0, 0] + [r] * nd + [0, 0] + [r] * nd, np.int64), f"{tag}_pads"), bn=bn,
    )


def _mean64(g: "_Graph", t: str, axes: str, what: str) -> str:
    """``ReduceMean(t, axes, keepdims=1)`` accumulated in float64, returned as float32."""
    from onnx import TensorProto

    wide = g.op("Cast", [t], f"{what}_f64", to=TensorProto.DOUBLE)
    return g.op("Cast", [g.op("ReduceMean", [wide, axes], f"{what}_sum", keepdims=1)], what, to=TensorProto.FLOAT)


def _step(b: "_Graph", k: _LevelConsts, rule: dict, xin: str, img: str, mask: str, ch: tuple[str, str, str]) -> str:
    """Nodes of one step in the body ``b``: ``x (B, C, *S)`` -> the next state, with ``mask
    (B, 1, *S)`` float and the level's image ``img (B, n_in, *S)`` written back."""
    xp = b.op("Pad", [xin, k.pads], "xp", mode="reflect") if int(rule["kernel_size"]) > 1 else xin
    y = b.op("Concat", [xin, b.op("Conv", [xp, k.wp, k.bp], "perceive")], "y", axis=1)
    h = b.op("Conv", [y, k.w0, k.b0], "fc0")
    if k.bn is not None:
        # BatchNorm in training mode, without running statistics: mean and biased variance
        # over batch and space, (h - mean) * rsqrt(var + eps) * scale + bias. Both means are
        # taken in float64 (as the NumPy runtime's sums): onnxruntime's float32 ReduceMean
        # sums in order, and over ~1e4 cells whose mean is far from zero (a volume padded
        # with zeros) its error, divided by a small std, reached 1e-4 of the state per step.
        axes, eps, scale, bias = k.bn
        centred = b.op("Sub", [h, _mean64(b, h, axes, "mean")], "centred")
        var = _mean64(b, b.op("Mul", [centred, centred]), axes, "var")
        inv = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, eps])])], "inv_std")
        h = b.op("Add", [b.op("Mul", [b.op("Mul", [centred, inv]), scale]), bias], "bn")
    d = b.op("Conv", [b.op("Relu", [h], "hid"), k.w1], "delta")
    xn = b.op("Add", [xin, b.op("Mul", [d, mask])])
    return b.op("Concat", [img, b.op("Slice", [xn, *ch])], "x_out", axis=1)


def _loop(g: "_Graph", tag: str, steps: int, x: str, body_nodes: Callable[["_Graph", str, str], str]) -> str:
    """An ONNX Loop of ``steps`` iterations carrying ``x``; ``body_nodes(b, iteration, x_in)``
    adds the step's nodes to the body ``b`` and returns its output."""
    from onnx import TensorProto, helper

    b = _Graph(f"{tag}_")
    it, cond_in, xin = f"{tag}_iter", f"{tag}_cond_in", f"{tag}_x_in"
    xout = body_nodes(b, it, xin)
    cond_out = b.op("Identity", [cond_in], "cond_out")
    body = helper.make_graph(
        b.nodes, f"{tag}_step",
        [helper.make_tensor_value_info(it, TensorProto.INT64, []),
         helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []),
         helper.make_tensor_value_info(xin, TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
         helper.make_tensor_value_info(xout, TensorProto.FLOAT, None)])
    return g.op("Loop", [g.const(np.int64(steps), f"{tag}_steps"), "", x], f"{tag}_out", body=body)


def _spatial_names(nd: int) -> list[str]:
    return ["H", "W"] if nd == 2 else ["X", "Y", "Z"][:nd] if nd == 3 else [f"S{i}" for i in range(nd)]


def _finish(g: "_Graph", inputs: list, outputs: list, name: str, doc: str) -> Any:
    import onnx
    from onnx import helper

    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mednca_jax")
    model.ir_version = min(model.ir_version, 9)  # readable by onnxruntime >= 1.17
    model.doc_string = doc
    onnx.checker.check_model(model, full_check=True)
    return model


def build_model(arrays: dict[str, np.ndarray], model_cfg: Any, rules: Sequence[dict]) -> Any:
    """The ONNX ``ModelProto`` of the whole inference from ``weights.npz``-style arrays
    (``level{i}.perception.kernel (k,)*nd + (C, F)`` ...), the model config and the rule
    description of every level (``config.json`` ``rules``)."""
    from onnx import TensorProto, helper

    c, n_in, n_out = model_cfg.channels, model_cfg.n_in, model_cfg.n_out
    steps, scales = list(model_cfg.steps), list(model_cfg.scales)
    nd = int(rules[0]["ndim"])
    dims = _spatial_names(nd)
    g = _Graph("")
    if n_in == 1:
        images_vi = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", *dims])
        full = g.op("Unsqueeze", ["images", g.const(np.array([1], np.int64))], "full")
    else:
        images_vi = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", *dims, n_in])
        full = g.op("Transpose", ["images"], "full", perm=[0, nd + 1, *range(1, nd + 1)])
    inputs = [images_vi, helper.make_tensor_value_info("fire_rate", TensorProto.FLOAT, []),
              helper.make_tensor_value_info("seed", TensorProto.INT64, [])]
    consts = {"s16": g.const(np.uint32(16), "s16"), "s15": g.const(np.uint32(15), "s15"),
              "m1": g.const(np.uint32(HASH_M1), "m1"), "m2": g.const(np.uint32(HASH_M2), "m2")}
    seed32 = g.op("Cast", ["seed"], "seed32", to=TensorProto.UINT32)  # low 32 bits
    one = g.const(np.float32(1.0), "one")
    inv24 = g.const(np.float32(2.0 ** -24), "inv24")
    s8 = g.const(np.uint32(8), "s8")
    ch = (g.const(np.array([n_in], np.int64)), g.const(np.array([c], np.int64)), g.const(np.array([1], np.int64)))
    keep_b_s = g.const(np.array([1, 0] + [1] * nd, np.int64))  # shape * this + that: (B, 1, *S)
    one_ch = g.const(np.array([0, 1] + [0] * nd, np.int64))
    x = ""
    for i in range(len(steps)):
        f = scales[i]
        if f == 1:
            img = full
        elif model_cfg.downscale == "max":
            img = g.op("MaxPool", [full], f"img{i}", kernel_shape=[f] * nd, strides=[f] * nd)
        else:
            img = g.op("Conv", [full, g.const(_downscale_kernel(f, model_cfg.downscale, n_in, nd), f"down{i}")],
                       f"img{i}", strides=[f] * nd, group=n_in)
        shape = g.op("Shape", [img])
        if i == 0:
            zshape = g.op("Add", [g.op("Mul", [shape, keep_b_s]), g.const(np.array([0, c - n_in] + [0] * nd, np.int64))])
            zeros = g.op("ConstantOfShape", [zshape], "zeros", value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))
            x = g.op("Concat", [img, zeros], "x0", axis=1)
        else:
            r = scales[i - 1] // f
            up = g.op("Resize", [x, "", g.const(np.array([1, 1] + [r] * nd, np.float32), "up")], f"up{i}", mode="nearest",
                      coordinate_transformation_mode="asymmetric", nearest_mode="floor")
            x = g.op("Concat", [img, g.op("Slice", [up, *ch])], f"x{i}", axis=1)
        # C-order cell index n as uint32 (B, 1, *S), and the level's key (outside the loop).
        cell_shape = g.op("Add", [g.op("Mul", [shape, keep_b_s]), one_ch])
        idx = g.op("Range", [g.const(np.int64(0)), g.op("ReduceProd", [cell_shape], keepdims=0), g.const(np.int64(1))])
        idx = g.op("Reshape", [g.op("Cast", [idx], to=TensorProto.UINT32), cell_shape], f"idx{i}")
        key = g.hash32(g.op("BitwiseXor", [seed32, g.const(np.uint32(((i + 1) * GOLDEN) & 0xFFFFFFFF))]), consts)
        prefix = f"level{i}."
        lc = _level_consts(g, {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, rules[i], f"l{i}")

        def body(b: _Graph, it: str, xin: str, key: str = key, idx: str = idx, img: str = img, lc: _LevelConsts = lc,
                 rule: dict = rules[i]) -> str:
            kk = b.hash32(b.op("Add", [key, b.op("Cast", [it], to=TensorProto.UINT32)]), consts)
            v = b.hash32(b.op("BitwiseXor", [idx, kk]), consts)
            u = b.op("Sub", [one, b.op("Mul", [b.op("Cast", [b.op("BitShift", [v, s8], direction="RIGHT")], to=TensorProto.FLOAT),
                                               inv24])], "u")
            mask = b.op("Cast", [b.op("Greater", [u, "fire_rate"])], "mask", to=TensorProto.FLOAT)
            return _step(b, lc, rule, xin, img, mask, ch)

        x = _loop(g, f"level{i}", steps[i], x, body)

    logits = g.op("Slice", [x, g.const(np.array([n_in], np.int64)), g.const(np.array([n_in + n_out], np.int64)), ch[2]])
    g.nodes.append(helper.make_node("Transpose", [logits], ["logits"], name="logits", perm=[0, *range(2, nd + 2), 1]))
    kernels = sorted({int(r["kernel_size"]) for r in rules})
    return _finish(g, inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", *dims, n_out])], "mednca",
                   f"Med-NCA, {len(steps)} levels, scales {scales}, steps {steps}, C={c}, rank {nd}, kernels {kernels}, "
                   f"perception {rules[0]['perception']!r}, norm {rules[0]['norm']!r}; inputs images "
                   f"(B, {', '.join(dims)}{'' if n_in == 1 else ', n_in'}) float32, fire_rate () float32, seed () int64")


def level_model(weights: dict[str, np.ndarray], rule: dict, steps: int) -> Any:
    """One level's rollout on given masks as an ONNX ``ModelProto``, the counterpart of
    ``mednca_jax.nca.rollout.rollout(..., masks=masks)`` and of the NumPy runtime's
    ``rollout_level``.

    Args:
        weights: the level's arrays without the ``level{i}.`` prefix (``perception.kernel
            (k,)*nd + (C, F)``, ``perception.bias``, ``fc0.kernel``, ``fc0.bias``, ``bn.scale``
            and ``bn.bias`` for norm batch, ``fc1.kernel``; ``mednca_jax.export.rule_weights``).
        rule: the level's description (``Rule.describe()``): a linear perception, the ``mlp``
            update, norm ``none`` | ``batch``, any rank Conv supports.
        steps: the number of steps (the Loop's trip count; ``masks`` needs that many).

    The graph's inputs are ``x (B, *S, C)`` float32 (start state), ``image (B, *S, n_in)``
    float32 (written into the input channels first and after every step) and ``masks
    (steps, B, *S)`` bool; its output ``state (B, *S, C)`` float32 is the final state.
    Run it with onnxruntime: ``sess.run(None, {"x": x, "image": image, "masks": masks})[0]``.
    """
    from onnx import TensorProto, helper

    if rule.get("update") != "mlp" or not rule.get("linear", True) or rule.get("norm") not in ("none", "batch"):
        raise ValueError(f"the ONNX graph cannot interpret perception {rule.get('perception')!r} with update "
                         f"{rule.get('update')!r} and norm {rule.get('norm')!r}: it runs linear perceptions and the 'mlp' update")
    nd, c, n_in = int(rule["ndim"]), int(rule["channels"]), int(rule["n_in"])
    dims = _spatial_names(nd)
    g = _Graph("")
    to_cf, to_cl = [0, nd + 1, *range(1, nd + 1)], [0, *range(2, nd + 2), 1]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", *dims, c]),
              helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", *dims, n_in]),
              helper.make_tensor_value_info("masks", TensorProto.BOOL, [int(steps), "B", *dims])]
    ch = (g.const(np.array([n_in], np.int64)), g.const(np.array([c], np.int64)), g.const(np.array([1], np.int64)))
    img = g.op("Transpose", ["image"], "img", perm=to_cf)
    x0 = g.op("Transpose", ["x"], "x_cf", perm=to_cf)
    x0 = g.op("Concat", [img, g.op("Slice", [x0, *ch])], "x0", axis=1)
    # (steps, B, 1, *S) float, one step's slice gathered in the body.
    masks = g.op("Unsqueeze", [g.op("Cast", ["masks"], to=TensorProto.FLOAT), g.const(np.array([2], np.int64))], "masks_f")
    lc = _level_consts(g, weights, rule, "l")

    def body(b: _Graph, it: str, xin: str) -> str:
        return _step(b, lc, rule, xin, img, b.op("Gather", [masks, it], "mask", axis=0), ch)

    x = _loop(g, "level", int(steps), x0, body)
    g.nodes.append(helper.make_node("Transpose", [x], ["state"], name="state", perm=to_cl))
    return _finish(g, inputs, [helper.make_tensor_value_info("state", TensorProto.FLOAT, ["B", *dims, c])], "mednca_level",
                   f"one Med-NCA level, {steps} steps, rule {rule}")


def write_onnx(arrays: dict[str, np.ndarray], model_cfg: Any, rules: Sequence[dict], config_json: dict,
               out_dir: str | Path) -> list[Path]:
    """Write ``mednca.onnx`` and ``config.json`` into ``out_dir``; returns the files."""
    import onnx

    out = Path(out_dir)
    model = build_model(arrays, model_cfg, rules)
    files = [out / ONNX_FILE, out / "config.json"]
    onnx.save(model, str(files[0]))
    files[1].write_text(json.dumps(config_json, indent=2) + "\n")
    return files
