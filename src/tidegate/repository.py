"""Reads a model repository (Triton's layout) into plain records; loads nothing.

    <root>/<model>/config.toml            optional
    <root>/<model>/<version>/model.onnx   versions are positive integers
    <root>/<model>/<version>/reference.npz optional sample of training inputs

Hidden entries (such as the `.tidegate` state directory) are skipped. A model
whose directory name is not a valid model name, whose config is broken, or that
has no version with a model file is reported in `ScanResult.problems` and left
out, so one bad model never stops the others from serving.
"""

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tidegate.config import ModelConfig, load_model_config
from tidegate.errors import ModelLoadError, NotFound, TidegateError
from tidegate.protocol import ascii_number

MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MAX_NAME_LENGTH = 255  # a directory name's limit on common file systems
MODEL_FILE = "model.onnx"
REFERENCE_FILE = "reference.npz"
CONFIG_FILE = "config.toml"


# (file name, size, modification time in ns) of each file: a cheap stand-in for the
# content, compared between scans to see that files changed or stopped changing.
Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(directory: Path) -> Fingerprint:
    """The fingerprint of the files directly in `directory` (empty if it is gone)."""
    entries = []
    try:
        for entry in directory.iterdir():
            stat = entry.stat()
            if entry.is_file():
                entries.append((entry.name, stat.st_size, stat.st_mtime_ns))
    except FileNotFoundError:  # removed while being read: the next scan sees the rest
        return ()
    return tuple(sorted(entries))


@dataclass(slots=True, frozen=True)
class VersionSource:
    version: int
    model_path: Path
    reference_path: Path | None
    fingerprint: Fingerprint


@dataclass(slots=True, frozen=True)
class ModelSource:
    name: str
    directory: Path
    config: ModelConfig
    versions: dict[int, VersionSource]

    def selected(self) -> list[VersionSource]:
        """The versions the config's version policy serves, ascending."""
        chosen = self.config.versions.select(list(self.versions))
        return [self.versions[v] for v in chosen]


@dataclass(slots=True)
class ScanResult:
    models: dict[str, ModelSource] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # model name -> what is wrong


def _version_number(name: str) -> int | None:
    number = ascii_number(name)
    return number if number is not None and not name.startswith("0") else None


def has_model_directory(root: Path, name: str) -> bool:
    """Whether `name` is a valid model name with a directory in the repository (checked
    before touching the file system: a name from a URL may be `..`)."""
    return (
        len(name) <= MAX_NAME_LENGTH
        and MODEL_NAME.fullmatch(name) is not None
        and not name.startswith(".")
        and (root / name).is_dir()
    )


def scan_model(root: Path, name: str) -> ModelSource:
    """Reads one model's directory.

    Raises:
        NotFound: no such model directory, or no version holds a model file.
        ConfigError: config.toml is malformed or has an unknown key.
    """
    if not has_model_directory(root, name):
        raise NotFound(f"model '{name}' is not in the repository {root}")
    directory = root / name
    config = load_model_config(directory / CONFIG_FILE)
    versions = {}
    for entry in directory.iterdir():
        number = _version_number(entry.name)
        model_path = entry / MODEL_FILE
        if number is None or not model_path.is_file():
            continue
        reference = entry / REFERENCE_FILE
        versions[number] = VersionSource(
            number, model_path, reference if reference.is_file() else None, fingerprint(entry)
        )
    if not versions:
        raise NotFound(f"model '{name}' has no version directory with a {MODEL_FILE}")
    return ModelSource(name, directory, config, versions)


def scan(root: Path) -> ScanResult:
    """Reads every model of the repository, collecting problems instead of stopping."""
    result = ScanResult()
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if not MODEL_NAME.fullmatch(entry.name):
            result.problems[entry.name] = (
                f"{entry}: not a valid model name (letters, digits, '_', '.', '-')"
            )
            continue
        try:
            result.models[entry.name] = scan_model(root, entry.name)
        except TidegateError as exc:
            result.problems[entry.name] = exc.message
    return result


# A model directory's own files (config.toml), then each version directory's.
ModelFingerprint = tuple[Fingerprint, tuple[tuple[int, Fingerprint], ...]]


def fingerprints(root: Path) -> dict[str, ModelFingerprint]:
    """Every model directory's fingerprint: what the repository poller compares
    between two scans. Reads directory entries only; parses nothing."""
    result = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            numbers = sorted(n for c in entry.iterdir() if (n := _version_number(c.name)))
        except FileNotFoundError:  # removed while being read
            continue
        versions = tuple((n, fingerprint(entry / str(n))) for n in numbers)
        result[entry.name] = (fingerprint(entry), versions)
    return result


def load_reference(path: Path) -> dict[str, np.ndarray]:
    """Reads a reference.npz: one array per input name."""
    try:
        # Opened here, not by np.load, which leaks the file when the archive is corrupt.
        with path.open("rb") as file, np.load(file, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"{path}: cannot read the reference data: {exc}") from exc
