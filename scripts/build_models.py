"""Build the small, real ONNX models shipped in ``models/``.

The serving runtime needs a model repository to run against that covers the
interesting cases (two versions of one model, FP32 / FP64 / string inputs,
classifier and regressor outputs) without downloading anything: every model is
trained on data that scikit-learn ships offline and converted with skl2onnx.

Layout (Triton style)::

    <out>/<name>/config.toml
    <out>/<name>/<version>/model.onnx
    <out>/<name>/<version>/reference.npz   # training-input sample, one array per input

The build is deterministic (fixed seeds and splits, fixed graph names, no
timestamps), so ``tests/test_models_build.py`` can rebuild it and compare with the
committed copy. Before anything is written, every converted model is run in
onnxruntime and checked against the scikit-learn estimator it came from.

Usage: ``python scripts/build_models.py [OUT_DIR]`` (default: ``models/`` at the repo root).
"""

from __future__ import annotations

import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType, StringTensorType
from sklearn import datasets
from sklearn.base import BaseEstimator
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "models"

# Upper bounds for the opsets skl2onnx may use: every reasonably recent onnxruntime
# supports these (skl2onnx picks the lowest opset each operator needs).
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
SEED = 0
MAX_REFERENCE_ROWS = 500
# Minimum share of rows where the text model's ONNX label must equal sklearn's
# (onnxruntime's Tokenizer is not Python's `re`, so rare tokens could split differently).
MIN_TEXT_LABEL_AGREEMENT = 0.98

# The wine rollout demo: the good candidate (v2) must answer like the stable v1 and
# the bad one (v3) clearly not, measured on the reference rows by label agreement and
# by the PSI of the predicted class shares.
MIN_GOOD_AGREEMENT = 0.95
MAX_GOOD_PSI = 0.02
MAX_BAD_AGREEMENT = 0.70
MIN_BAD_PSI = 0.25
# Chance that a class-0 wine training row is labelled class 1 for the bad candidate.
WINE_CORRUPTED_SHARE = 0.9

# skl2onnx's default output names -> the names the repository promises.
CLASSIFIER_OUTPUTS = {"output_label": "label", "output_probability": "probabilities"}


@dataclass
class BuiltVersion:
    """One version of a model: the ONNX graph plus the reference inputs it was checked on."""

    version: int
    model: onnx.ModelProto
    reference: dict[str, np.ndarray]


@dataclass
class BuiltModel:
    """A model directory: its config.toml text and its versions."""

    name: str
    config: str
    versions: list[BuiltVersion] = field(default_factory=list)


def _convert(
    estimator: BaseEstimator,
    graph_name: str,
    initial_types: list[tuple[str, Any]],
    doc: str,
    options: dict[int, dict[str, Any]] | None = None,
    rename_outputs: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """Convert with capped opsets and normalise everything that would make rebuilds differ.

    skl2onnx names the graph with a random UUID unless told otherwise, and may list
    the same opset domain twice; both are fixed here so the bytes are reproducible.
    """
    model = convert_sklearn(
        estimator,
        name=graph_name,
        initial_types=initial_types,
        target_opset=TARGET_OPSET,
        options=options,
    )
    if rename_outputs:
        _rename_values(model, rename_outputs)
    opsets: dict[str, int] = {}
    for entry in model.opset_import:
        opsets[entry.domain] = max(entry.version, opsets.get(entry.domain, 0))
    del model.opset_import[:]
    for domain, version in sorted(opsets.items()):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    model.doc_string = doc
    model.graph.doc_string = ""
    model.model_version = 0
    del model.metadata_props[:]
    onnx.checker.check_model(model, full_check=True)
    return model


def _rename_values(model: onnx.ModelProto, names: dict[str, str]) -> None:
    """Rename graph values (e.g. skl2onnx's ``output_label``) everywhere they are used."""
    for node in model.graph.node:
        for i, value in enumerate(node.output):
            node.output[i] = names.get(value, value)
        for i, value in enumerate(node.input):
            node.input[i] = names.get(value, value)
    for output in model.graph.output:
        output.name = names.get(output.name, output.name)


def _no_zipmap(clf: BaseEstimator) -> dict[int, dict[str, Any]]:
    """Ask for a plain probabilities tensor instead of ZipMap's sequence of maps."""
    return {id(clf): {"zipmap": False}}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU onnxruntime session, as the server would create it."""
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _check_classifier(
    model: onnx.ModelProto, estimator: BaseEstimator, x: np.ndarray, what: str
) -> None:
    """Fail the build unless onnxruntime reproduces sklearn's labels and probabilities."""
    label, proba = _session(model).run(["label", "probabilities"], {"input": x})
    if not np.array_equal(label, estimator.predict(x)):
        raise AssertionError(f"{what}: ONNX labels differ from sklearn")
    np.testing.assert_allclose(
        proba, estimator.predict_proba(x), rtol=1e-4, atol=1e-6, err_msg=what
    )


def _split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed 75/25 split every tabular model uses; only the training part is needed."""
    x_train, _, y_train, _ = train_test_split(x, y, test_size=0.25, random_state=SEED)
    return x_train, y_train


def _reference(x: np.ndarray) -> np.ndarray:
    """First rows of the (already shuffled) training split, capped to keep files small."""
    return np.ascontiguousarray(x[:MAX_REFERENCE_ROWS])


def build_breast_cancer() -> BuiltModel:
    """Two versions with genuinely different outputs, to exercise version routing."""
    data = datasets.load_breast_cancer()
    x_train, y_train = _split(data.data.astype(np.float32), data.target)
    ref = _reference(x_train)
    types = [("input", FloatTensorType([None, 30]))]
    built = BuiltModel(
        name="breast_cancer",
        config=(
            "# Wisconsin breast cancer classifier (sklearn load_breast_cancer).\n"
            "# Both versions are served; the highest version is the stable one.\n"
            "[versions]\n"
            'policy = "all"\n'
        ),
    )

    logreg = LogisticRegression(max_iter=1000, random_state=SEED)
    gbt = GradientBoostingClassifier(n_estimators=50, max_depth=3, random_state=SEED)
    versions = [
        (1, Pipeline([("scale", StandardScaler()), ("clf", logreg)]), logreg,
         "StandardScaler + LogisticRegression."),
        (2, gbt, gbt, "GradientBoostingClassifier(50 trees, depth 3)."),
    ]  # fmt: skip
    for number, estimator, classifier, description in versions:
        estimator.fit(x_train, y_train)
        model = _convert(
            estimator,
            f"breast_cancer_v{number}",
            types,
            f"Breast cancer, 0=malignant 1=benign: {description}",
            _no_zipmap(classifier),
            CLASSIFIER_OUTPUTS,
        )
        _check_classifier(model, estimator, ref, f"breast_cancer v{number}")
        built.versions.append(BuiltVersion(number, model, {"input": ref}))
    return built


def build_digits() -> BuiltModel:
    """A 10-class FP32 classifier with a wider input (8x8 images flattened to 64)."""
    data = datasets.load_digits()
    x_train, y_train = _split(data.data.astype(np.float32), data.target)
    ref = _reference(x_train)
    mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=SEED)
    pipe = Pipeline([("scale", StandardScaler()), ("clf", mlp)]).fit(x_train, y_train)
    model = _convert(
        pipe,
        "digits_v1",
        [("input", FloatTensorType([None, 64]))],
        "Handwritten digits 0-9 (8x8 pixels valued 0-16): StandardScaler + MLPClassifier(32).",
        _no_zipmap(mlp),
        CLASSIFIER_OUTPUTS,
    )
    _check_classifier(model, pipe, ref, "digits v1")
    return BuiltModel(
        name="digits",
        config=(
            '# Handwritten digit classifier (sklearn load_digits).\n[versions]\npolicy = "latest"\n'
        ),
        versions=[BuiltVersion(1, model, {"input": ref})],
    )


def build_diabetes() -> BuiltModel:
    """An FP64 regressor, so the server's non-FP32 tensor path is covered."""
    data = datasets.load_diabetes()
    x_train, y_train = _split(data.data.astype(np.float64), data.target)
    ref = _reference(x_train)
    ridge = Ridge(alpha=1.0).fit(x_train, y_train)
    model = _convert(
        ridge,
        "diabetes_v1",
        [("input", DoubleTensorType([None, 10]))],
        "Diabetes disease progression one year after baseline (FP64): Ridge regression.",
    )
    (got,) = _session(model).run(["variable"], {"input": ref})
    np.testing.assert_allclose(got[:, 0], ridge.predict(ref), rtol=1e-9, err_msg="diabetes v1")
    return BuiltModel(
        name="diabetes",
        config=(
            "# Diabetes progression regressor (sklearn load_diabetes).\n"
            '[versions]\npolicy = "latest"\n'
        ),
        versions=[BuiltVersion(1, model, {"input": ref})],
    )


def class_share_psi(labels_a: np.ndarray, labels_b: np.ndarray, classes: int) -> float:
    """PSI between the predicted class shares of two label arrays.

    Shares are smoothed as (count + 0.5) / (N + K/2), so a class one side never
    predicts gives a large but finite term.
    """
    a = (np.bincount(labels_a, minlength=classes) + 0.5) / (len(labels_a) + classes / 2)
    b = (np.bincount(labels_b, minlength=classes) + 0.5) / (len(labels_b) + classes / 2)
    return float(np.sum((b - a) * np.log(b / a)))


def build_wine() -> BuiltModel:
    """A stable version and two rollout candidates: one as good, one trained on bad labels."""
    data = datasets.load_wine()
    x_train, y_train = _split(data.data.astype(np.float32), data.target)
    ref = _reference(x_train)
    classes = len(data.target_names)
    # The labelling bug: most class-0 rows (a fixed random choice) were labelled class 1.
    corrupted = y_train.copy()
    rng = np.random.default_rng(SEED)
    flipped = (y_train == 0) & (rng.random(len(y_train)) < WINE_CORRUPTED_SHARE)
    corrupted[flipped] = 1
    types = [("input", FloatTensorType([None, 13]))]
    built = BuiltModel(
        name="wine",
        config=(
            "# Wine cultivar classifier (sklearn load_wine): 13 chemical measurements -> 0, 1, 2.\n"
            "# Version 1 is the stable model. Versions 2 (good: a retrain that answers like 1)\n"
            "# and 3 (bad: trained on corrupted labels, most of class 0 labelled as class 1)\n"
            "# are candidates for the canary-rollout demo; only version 1 serves at start.\n"
            "[versions]\n"
            "policy = [1]\n"
            "\n"
            "# Short steps, so that the demo's rollouts end within a minute at 200 requests/s;\n"
            "# the defaults (500 rows and 30 s per step) suit production traffic.\n"
            "[rollout]\n"
            "min_rows = 100\n"
            "min_dwell_s = 5\n"
            "min_latency_samples = 100\n"
        ),
    )

    versions = [
        (1, 1.0, y_train, "StandardScaler + LogisticRegression(C=1)."),
        (2, 0.3, y_train, "StandardScaler + LogisticRegression(C=0.3), a good retrain."),
        (3, 1.0, corrupted,
         "StandardScaler + LogisticRegression(C=1) trained on corrupted labels "
         f"({flipped.sum()} of {np.sum(y_train == 0)} class-0 rows labelled as class 1)."),
    ]  # fmt: skip
    labels: dict[int, np.ndarray] = {}
    for number, c, targets, description in versions:
        logreg = LogisticRegression(C=c, max_iter=1000, random_state=SEED)
        pipe = Pipeline([("scale", StandardScaler()), ("clf", logreg)]).fit(x_train, targets)
        model = _convert(
            pipe,
            f"wine_v{number}",
            types,
            f"Wine cultivar 0-2 from 13 chemical measurements: {description}",
            _no_zipmap(logreg),
            CLASSIFIER_OUTPUTS,
        )
        _check_classifier(model, pipe, ref, f"wine v{number}")
        (labels[number],) = _session(model).run(["label"], {"input": ref})
        built.versions.append(BuiltVersion(number, model, {"input": ref}))

    for number, good in ((2, True), (3, False)):
        agreement = float(np.mean(labels[number] == labels[1]))
        psi = class_share_psi(labels[1], labels[number], classes)
        print(f"wine v1 vs v{number}: label agreement {agreement:.3f}, class-share PSI {psi:.4f}")
        ok = (
            agreement >= MIN_GOOD_AGREEMENT and psi <= MAX_GOOD_PSI
            if good
            else agreement <= MAX_BAD_AGREEMENT and psi >= MIN_BAD_PSI
        )
        if not ok:
            kind = "good" if good else "bad"
            raise AssertionError(
                f"wine v{number} is no longer a {kind} candidate: "
                f"agreement {agreement:.3f}, PSI {psi:.4f}"
            )
    return built


# Dataset name (the text model's label) -> loader whose DESCR provides the sentences.
TEXT_SOURCES: dict[str, Callable[[], Any]] = {
    "iris": datasets.load_iris,
    "breast_cancer": datasets.load_breast_cancer,
    "digits": datasets.load_digits,
    "diabetes": datasets.load_diabetes,
    "wine": datasets.load_wine,
    "linnerud": datasets.load_linnerud,
}
_RULE = re.compile(r"^\s*([=\-~^*])\1*(\s+\1+)*\s*$")  # RST heading underline / table border
_ITEM = re.compile(r"^\s*(:|[-*]\s|\(\d+\)\s)")  # field, bullet or numbered item
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"'][.!?])\s+(?=[A-Z(])")


def _sentences(descr: str) -> list[str]:
    """Split a dataset DESCR (reStructuredText) into prose sentences and list items.

    Tables, RST directives and heading underlines are dropped; each field / bullet
    starts a new chunk, and chunks are split at sentence ends (not at initials like
    "R.A."). Fragments with fewer than three words are not worth classifying.
    """
    chunks: list[list[str]] = []
    current: list[str] = []
    in_table = False

    def flush() -> None:
        if current:
            chunks.append(current.copy())
            current.clear()

    for line in descr.splitlines():
        if not line.strip():
            flush()
            in_table = False
        elif in_table:
            continue
        elif _RULE.match(line):
            if current:
                current.clear()  # a heading underline: the line above is a title, not prose
            elif line.lstrip().startswith("="):
                in_table = True  # a simple table's top border; it runs to the next blank line
        elif line.lstrip().startswith(".."):
            flush()  # RST directive or label
        else:
            if _ITEM.match(line):
                flush()
            current.append(line.strip())

    out: list[str] = []
    for chunk in chunks:
        text = " ".join(" ".join(chunk).split()).replace("**", "")
        text = re.sub(r"^[-*]\s+", "", text)
        out.extend(
            sentence
            for sentence in _SENTENCE_END.split(text)
            if len(re.findall(r"[A-Za-z]{2,}", sentence)) >= 3
        )
    return out


def text_corpus() -> tuple[list[str], list[str]]:
    """Sentences from the DESCR texts bundled with sklearn, labelled by dataset name.

    Sentences shared by several datasets (":Missing Attribute Values: None") are
    dropped: no model can get them right, and they would only add label noise.
    """
    labels_of: dict[str, set[str]] = {}
    order: list[str] = []
    for name, loader in TEXT_SOURCES.items():
        for sentence in _sentences(loader().DESCR):
            if sentence not in labels_of:
                labels_of[sentence] = set()
                order.append(sentence)
            labels_of[sentence].add(name)
    texts = [s for s in order if len(labels_of[s]) == 1]
    return texts, [next(iter(labels_of[s])) for s in texts]


def build_dataset_topic() -> BuiltModel:
    """A string-input (V2 BYTES) classifier with string labels."""
    texts, labels = text_corpus()
    # Settings the ONNX converter reproduces faithfully: lowercase, the default token
    # pattern (converted to [a-zA-Z0-9_]+), unigrams, no accent stripping, and no
    # sublinear_tf (skl2onnx 1.20 computes log(tf + 1) where sklearn uses 1 + log(tf)).
    tfidf = TfidfVectorizer(lowercase=True, ngram_range=(1, 1))
    clf = LogisticRegression(C=10.0, max_iter=2000, random_state=SEED)
    pipe = Pipeline([("tfidf", tfidf), ("clf", clf)]).fit(texts, labels)
    model = _convert(
        pipe,
        "dataset_topic_v1",
        [("text", StringTensorType([None, 1]))],
        "Which sklearn bundled dataset (iris, wine, ...) a DESCR-style sentence describes.",
        # skl2onnx's StringNormalizer defaults to locale en_US.UTF-8, which onnxruntime
        # refuses to load where that locale is not installed (slim containers); "C"
        # exists everywhere. It lowercases ASCII only, which covers this corpus.
        {**_no_zipmap(clf), id(tfidf): {"locale": "C"}},
        CLASSIFIER_OUTPUTS,
    )
    # '<U' (not object) so np.load works without allow_pickle.
    ref = np.array(texts[:MAX_REFERENCE_ROWS], dtype=np.str_).reshape(-1, 1)
    label, proba = _session(model).run(["label", "probabilities"], {"text": ref})
    agreement = float(np.mean(label == pipe.predict(ref[:, 0])))
    if agreement < MIN_TEXT_LABEL_AGREEMENT:
        raise AssertionError(f"dataset_topic: ONNX/sklearn label agreement {agreement:.3f}")
    np.testing.assert_allclose(
        proba, pipe.predict_proba(ref[:, 0]), rtol=1e-4, atol=1e-5, err_msg="dataset_topic"
    )
    return BuiltModel(
        name="dataset_topic",
        config=(
            "# Text classifier: which sklearn dataset a DESCR sentence is about.\n"
            '[versions]\npolicy = "latest"\n'
        ),
        versions=[BuiltVersion(1, model, {"text": ref})],
    )


BUILDERS: list[Callable[[], BuiltModel]] = [
    build_breast_cancer,
    build_digits,
    build_diabetes,
    build_dataset_topic,
    build_wine,
]


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write what ``np.savez_compressed`` writes, minus its per-member timestamp.

    ``savez_compressed`` stamps each zip member with the current time, so rebuilt
    files would always differ; a fixed date keeps them byte-identical. Pickling is
    refused, so ``np.load`` never needs ``allow_pickle``.
    """
    with zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as fid:
                np.lib.format.write_array(fid, np.asanyarray(value), allow_pickle=False)


def build_all(out_dir: Path) -> list[Path]:
    """Build and verify every model, write the repository, and return the written files."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    for builder in BUILDERS:
        built = builder()
        model_dir = out_dir / built.name
        model_dir.mkdir(parents=True, exist_ok=True)
        config_path = model_dir / "config.toml"
        config_path.write_text(built.config, encoding="utf-8")
        written.append(config_path)
        for version in built.versions:
            version_dir = model_dir / str(version.version)
            version_dir.mkdir(parents=True, exist_ok=True)
            onnx_path = version_dir / "model.onnx"
            onnx_path.write_bytes(version.model.SerializeToString())
            ref_path = version_dir / "reference.npz"
            save_npz(ref_path, version.reference)
            written.extend([onnx_path, ref_path])
    return written


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``build_models.py [OUT_DIR]``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or any(a.startswith("-") for a in args):
        print("usage: build_models.py [OUT_DIR]", file=sys.stderr)
        return 2
    out_dir = Path(args[0]) if args else DEFAULT_OUT_DIR
    for path in build_all(out_dir):
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
