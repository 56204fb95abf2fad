"""Find Fashion-MNIST on this machine, or fetch it with checksum verification.

Search order (first directory holding all four IDX files wins):

1. `data_dir` (`--data-dir` / `data.data_dir`): when given it must exist and be complete;
2. `$HPCDL_DATA`, then `$HPCDL_DATA/fashion-mnist`;
3. `/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist` package);
4. `~/.cache/hpcdl/fashion-mnist`, where a download lands.

Checksums. Debian's copies are the upstream files with the gzip header
normalised by strip-nondeterminism (original file name dropped, mtime set to
the package date), so their .gz bytes differ from upstream's and from the
MD5s in the Fashion-MNIST README. The deflate streams are the same: putting
back the upstream header (FNAME plus the 2017-08-31 mtime) reproduces all four
README MD5s exactly (tests/test_data.py checks this for three of them). We
therefore verify the *decompressed* IDX bytes, which are identical in both
copies and in any re-compressed mirror. The upstream .gz files, for reference:

    file                        README MD5                        SHA-256 (derived as above)
    train-images-idx3-ubyte.gz  8d4fb7e6c68d591d4c3dfef9ec88bf0d  3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84
    train-labels-idx1-ubyte.gz  25c81989df183df01b3e8a0aad5dffbe  a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845
    t10k-images-idx3-ubyte.gz   bef4ecab320f06d8554ea6380940ec79  346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073
    t10k-labels-idx1-ubyte.gz   bb300cfdad3c16e7a12a480ee83cd310  67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from hpcdl.atomic import atomic_output
from hpcdl.data.idx import IDX_FILES, find_idx_files
from hpcdl.errors import DataError

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# Module-level so tests (and unusual sites) can point them elsewhere.
ENV_VAR = "HPCDL_DATA"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path.home() / ".cache" / "hpcdl" / "fashion-mnist"
BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DOWNLOAD_TIMEOUT_S = 15.0
INSTALL_HINT = ("run `sudo apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu) "
                "or pass --data-dir DIR with the four IDX files")

# SHA-256 of the decompressed IDX files (computed from Debian's dataset-fashion-mnist,
# whose deflate streams are byte-identical to upstream's; see the module docstring).
PAYLOAD_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def _candidates() -> list[tuple[str, Path]]:
    """(how to name it in a message, directory) in search order, explicit data_dir excluded."""
    out = []
    env = os.environ.get(ENV_VAR, "")
    if env:
        out += [(f"${ENV_VAR}", Path(env)), (f"${ENV_VAR}/fashion-mnist", Path(env) / "fashion-mnist")]
    out += [(str(DEBIAN_DIR), DEBIAN_DIR), (_tilde(CACHE_DIR), CACHE_DIR)]
    return out


def _tilde(path: Path) -> str:
    home = str(Path.home())
    return "~" + str(path)[len(home):] if str(path).startswith(home + os.sep) else str(path)


def locate_fashion_mnist(data_dir=None, download: bool = False) -> Path:
    """The directory holding the four Fashion-MNIST IDX files (see the module docstring for the order).

    With `download`, a failed search fetches the official files into CACHE_DIR.
    """
    if data_dir:
        data_dir = Path(data_dir).expanduser()
        if not data_dir.is_dir():
            raise DataError(f"--data-dir {data_dir}: no such directory")
        _, missing = find_idx_files(data_dir)
        if missing:
            raise DataError(f"--data-dir {data_dir}: missing {', '.join(m + '(.gz)' for m in missing)}; "
                            + INSTALL_HINT.replace("pass --data-dir DIR", "point --data-dir at a directory"))
        return data_dir
    searched = []
    for label, directory in _candidates():
        searched.append(label)
        if directory.is_dir() and not find_idx_files(directory)[1]:
            return directory
    if not os.environ.get(ENV_VAR):
        searched.insert(0, f"${ENV_VAR} (unset)")
    failure = ""
    if download:
        try:
            return download_fashion_mnist(CACHE_DIR)
        except DataError as exc:
            failure = f"; download from {BASE_URL} failed ({exc})"
    else:
        failure = "; download disabled (data.download = false)"
    raise DataError(f"Fashion-MNIST not found in {', '.join(searched)}{failure}: {INSTALL_HINT}")


def download_fashion_mnist(target: Path = None, base_url: str = None, timeout: float = None) -> Path:
    """Fetch the missing .gz files into `target`, each verified and renamed into place atomically."""
    target = Path(target or CACHE_DIR)
    base_url = base_url or BASE_URL
    timeout = DOWNLOAD_TIMEOUT_S if timeout is None else timeout
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{target}: cannot create: {exc.strerror or exc}") from None
    _, missing = find_idx_files(target)
    for stem in missing:
        url = f"{base_url}{stem}.gz"
        print(f"hpcdl: downloading {url}", file=sys.stderr, flush=True)
        with atomic_output(target / f"{stem}.gz") as tmp:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                    shutil.copyfileobj(response, out, 1 << 20)
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise DataError(f"{url}: {reason}") from None
            problem = payload_checksum_problem(tmp, stem)
            if problem:
                raise DataError(f"{url}: {problem}")
    return target


def payload_checksum_problem(path: Path, stem: str) -> str:
    """'' when the decompressed bytes of `path` have the official SHA-256, else what is wrong."""
    try:
        raw = Path(path).read_bytes()
        payload = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (EOFError, OSError, zlib.error) as exc:
        return f"not a valid gzip file ({exc})"
    digest = hashlib.sha256(payload).hexdigest()
    expected = PAYLOAD_SHA256[stem]
    return "" if digest == expected else f"SHA-256 mismatch: got {digest[:16]}…, expected {expected[:16]}…"


def verify_fashion_mnist(directory) -> dict[str, str]:
    """{file: problem} for every IDX file in `directory` whose content is not the official one."""
    found, missing = find_idx_files(directory)
    problems = {stem: "missing" for stem in missing}
    for role, path in found.items():
        problem = payload_checksum_problem(path, IDX_FILES[role])
        if problem:
            problems[path.name] = problem
    return problems
