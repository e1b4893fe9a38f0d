"""COVID-CT ingest on the real Soares sample and on UCSD-layout trees built from its images."""

from __future__ import annotations

import csv
import io
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from ctharden.core.errors import DataError
from ctharden.data.covid import decode_grayscale, ingest_covid, resize_square
from ctharden.data.dataset import load_array, load_arrays, read_info, read_manifest


def _labels(covid_sample: Path) -> list[dict[str, str]]:
    with open(covid_sample / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _small_soares(covid_sample: Path, dest: Path, n: int = 3) -> Path:
    """A Soares-layout tree with the first ``n`` real images of each class."""
    for folder in ("COVID", "non-COVID"):
        (dest / folder).mkdir(parents=True)
        for src in sorted((covid_sample / folder).glob("*.png"))[:n]:
            shutil.copy(src, dest / folder / src.name)
    return dest


def _tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def soares(covid_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("soares") / "ds"
    return out, ingest_covid(covid_sample, out, seed=0)


# --- 1. the real Soares sample ----------------------------------------------------------------


def test_soares_sample_ingest(covid_sample: Path, soares: tuple[Path, dict]) -> None:
    out, report = soares
    labels = _labels(covid_sample)
    assert report["layout"] == "soares"
    assert report["n_samples"] == 200
    assert report["counts"] == {"COVID": 100, "non-COVID": 100}
    assert report["modes"] == dict(Counter(r["mode"] for r in labels)) == {"RGBA": 165, "RGB": 35}
    assert report["n_skipped"] == 0 and report["skipped"] == []
    assert "labels.csv" in report["ignored_non_image"] and report["n_ignored_non_image"] == 1
    assert "block of 25" in report["grouping"] and "Approximation" in report["grouping"]
    assert report["content_hash"] == read_info(out)["content_hash"]

    df = read_manifest(out)
    assert len(df) == 200 and df["sample_id"].is_unique
    assert set(df["source"]) == {"soares"}
    assert set(df["patient_id_kind"]) == {"file-number-block(25)"}
    assert report["n_groups"] == df["patient_id"].nunique()
    # provenance matches the sample's own labels.csv
    by_file = {r["file"]: r for r in labels}
    for row in df.itertuples():
        ref = by_file[row.original_path]
        assert row.label == int(ref["label"])
        assert row.original_mode == ref["mode"]
        assert (row.original_width, row.original_height) == (int(ref["width"]), int(ref["height"]))
        assert row.file_sha256 == ref["sha256"]
    row = df.set_index("sample_id").loc["soares-covid-1022"]
    assert row["original_path"] == "COVID/Covid (1022).png" and row["patient_id"] == "soares-covid-block0040"

    # leak-free: no pseudo-patient in both train and test, nor in two folds
    train = set(df.loc[df["split"] == "train", "patient_id"])
    test = set(df.loc[df["split"] == "test", "patient_id"])
    assert train and test and not train & test
    assert (df[df["split"] == "train"].groupby("patient_id")["fold"].nunique() == 1).all()

    arrays = load_arrays(out, df["array"].tolist())
    assert arrays.shape == (200, 224, 224) and arrays.dtype == np.float32
    assert float(arrays.min()) >= 0.0 and float(arrays.max()) <= 1.0
    assert float(arrays.max()) > 0.5  # really scaled to [0, 1], not left at [0, 1/255]


def test_grayscale_conversion_ignores_colour_mode(covid_sample: Path, soares: tuple[Path, dict]) -> None:
    out, _ = soares
    df = read_manifest(out).set_index("original_path")
    rgb = [r["file"] for r in _labels(covid_sample) if r["mode"] == "RGB"]
    path = covid_sample / rgb[0]
    with Image.open(path) as img:
        channels = np.asarray(img)
    assert channels.ndim == 3 and (channels[..., 0] == channels[..., 1]).all()
    assert (channels[..., 1] == channels[..., 2]).all()
    decoded = decode_grayscale(path.read_bytes(), str(path))
    assert decoded.mode == "RGB" and decoded.pixels.dtype == np.float32
    np.testing.assert_array_equal(decoded.pixels, (channels[..., 0] / 255.0).astype(np.float32))
    # the stored array is exactly that grey image resized
    stored = np.asarray(load_array(out, df.loc[rgb[0], "array"]))
    np.testing.assert_array_equal(stored, resize_square(decoded.pixels, 224))
    # the same pixels stored as opaque RGBA or as L decode identically: the mode cannot leak
    for mode in ("RGBA", "L"):
        with Image.open(path) as img:
            buf = _png_bytes(img.convert(mode))
        np.testing.assert_array_equal(decode_grayscale(buf).pixels, decoded.pixels)


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# --- 2. the UCSD layout -------------------------------------------------------------------------


def _gray(covid_sample: Path, index: int) -> Image.Image:
    src = sorted((covid_sample / "COVID").glob("*.png"))[index]
    with Image.open(src) as img:
        return img.convert("L")


@pytest.fixture
def ucsd_tree(covid_sample: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ucsd"
    (root / "CT_COVID").mkdir(parents=True)
    (root / "CT_NonCOVID").mkdir()
    a, b, c, d = (_gray(covid_sample, i) for i in range(4))
    covid = root / "CT_COVID"
    a.save(covid / "2020.02.10.20021584-p6-52%0.png")
    b.save(covid / "2020.02.10.20021584-p6-52%1.jpg", quality=95)
    b.convert("RGB").save(covid / "2020.03.01.20029769-p21-73_1.png")
    Image.fromarray(np.asarray(a).astype(np.uint16) * 257).save(covid / "2020.03.01.20029769-p21-73_2.png")
    non = root / "CT_NonCOVID"
    c.save(non / "0.jpg")
    c.save(non / "1%0.jpg")
    pal = Image.frombytes("P", d.size, d.tobytes())
    pal.putpalette([v for g in range(256) for v in (g, g, g)])
    pal.save(non / "1%1.png")
    d.save(non / "1001.png")
    rgba = d.convert("RGBA")
    alpha = np.full((d.height, d.width), 255, np.uint8)
    alpha[:, : d.width // 2] = 128
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(non / "12%2.png")
    (non / ".DS_Store").write_bytes(b"\0\1junk")
    (non / "notes.txt").write_text("not an image\n")
    return root


def test_ucsd_layout(ucsd_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    report = ingest_covid(ucsd_tree, out, size=64, n_folds=2)
    assert report["layout"] == "ucsd"
    assert report["counts"] == {"COVID": 4, "non-COVID": 5} and report["n_samples"] == 9
    assert report["modes"] == {"I;16": 1, "L": 5, "P": 1, "RGB": 1, "RGBA": 1}
    assert report["n_ignored_non_image"] == 2
    assert report["n_alpha_composited"] == 1
    assert "paper id" in report["grouping"]

    df = read_manifest(out).set_index("sample_id")
    assert set(df["source"]) == {"ucsd"}
    assert (df.loc[df.index.str.startswith("ucsd-covid-"), "label"] == 1).all()
    assert (df.loc[df.index.str.startswith("ucsd-noncovid-"), "label"] == 0).all()
    pid = df["patient_id"]
    assert pid["ucsd-covid-2020.02.10.20021584-p6-52-0"] == "ucsd-paper-2020.02.10.20021584"
    assert pid["ucsd-covid-2020.02.10.20021584-p6-52-1"] == "ucsd-paper-2020.02.10.20021584"
    assert pid["ucsd-covid-2020.03.01.20029769-p21-73_1"] == "ucsd-paper-2020.03.01.20029769"
    assert pid["ucsd-noncovid-1-0"] == pid["ucsd-noncovid-1-1"] == "ucsd-noncovid-1"
    assert pid["ucsd-noncovid-12-2"] == "ucsd-noncovid-12" and pid["ucsd-noncovid-0"] == "ucsd-noncovid-0"
    assert set(df.loc[df["label"] == 1, "patient_id_kind"]) == {"paper-id"}
    assert report["n_groups"] == 6 and report["n_grouped_by_whole_stem"] == 0
    train = set(df.loc[df["split"] == "train", "patient_id"])
    assert not train & set(df.loc[df["split"] == "test", "patient_id"])

    def arr(sid: str) -> np.ndarray:
        return np.asarray(load_array(out, df.loc[sid, "array"]))

    assert arr("ucsd-covid-2020.02.10.20021584-p6-52-0").shape == (64, 64)
    # 16-bit copy (L * 257) scales by 65535 to the same grey values as the 8-bit original
    sixteen, eight = "ucsd-covid-2020.03.01.20029769-p21-73_2", "ucsd-covid-2020.02.10.20021584-p6-52-0"
    np.testing.assert_allclose(arr(sixteen), arr(eight), atol=1e-6)
    assert df.loc["ucsd-covid-2020.03.01.20029769-p21-73_2", "original_mode"] == "I;16"
    # a grey palette image decodes to the same values as the L image it was made from
    np.testing.assert_array_equal(arr("ucsd-noncovid-1-1"), arr("ucsd-noncovid-1001"))
    # partly transparent RGBA is composited onto black and recorded
    assert bool(df.loc["ucsd-noncovid-12-2", "alpha_composited"]) is True
    decoded = decode_grayscale((ucsd_tree / "CT_NonCOVID" / "12%2.png").read_bytes())
    plain = decode_grayscale((ucsd_tree / "CT_NonCOVID" / "1001.png").read_bytes())
    half = plain.pixels.shape[1] // 2
    np.testing.assert_allclose(decoded.pixels[:, :half], plain.pixels[:, :half] * 128 / 255, atol=1e-6)
    np.testing.assert_array_equal(decoded.pixels[:, half:], plain.pixels[:, half:])


# --- 3./4. corrupt files ------------------------------------------------------------------------


def test_truncated_png_is_an_error_or_skipped(covid_sample: Path, tmp_path: Path) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    root = _small_soares(covid_sample, tmp_path / "src")
    data = (covid_sample / "COVID" / "Covid (1022).png").read_bytes()
    (root / "COVID" / "Covid (9999).png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"Covid \(9999\)\.png"):
        ingest_covid(root, tmp_path / "ds")
    with pytest.raises(DataError, match="cannot decode"):  # pixels complete, end marker cut off
        decode_grayscale(data[:-12])
    report = ingest_covid(root, tmp_path / "ds", skip_bad=True, n_folds=2)
    assert report["n_skipped"] == 1 and report["n_samples"] == 6
    assert report["skipped"][0]["file"] == "COVID/Covid (9999).png"
    assert "Covid (9999).png" in report["skipped"][0]["reason"]
    assert "COVID/Covid (9999).png" not in set(read_manifest(tmp_path / "ds")["original_path"])


def test_garbage_bytes_with_image_extension(covid_sample: Path, tmp_path: Path) -> None:
    root = _small_soares(covid_sample, tmp_path / "src")
    (root / "non-COVID" / "x.png").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match=r"x\.png"):
        ingest_covid(root, tmp_path / "ds")


def test_duplicate_sample_id_is_an_error(covid_sample: Path, tmp_path: Path) -> None:
    root = _small_soares(covid_sample, tmp_path / "src")
    first = sorted((root / "COVID").iterdir())[0]
    _gray(covid_sample, 0).save(first.with_suffix(".jpg"))
    with pytest.raises(DataError, match="same sample_id"):
        ingest_covid(root, tmp_path / "ds")


# --- 5. bad layouts -----------------------------------------------------------------------------


def test_bad_layouts(covid_sample: Path, tmp_path: Path) -> None:
    neither = tmp_path / "neither"
    (neither / "images").mkdir(parents=True)
    with pytest.raises(DataError, match=r"neither.*expected COVID/ \+ non-COVID/"):
        ingest_covid(neither, tmp_path / "ds")

    half = tmp_path / "half"
    (half / "CT_COVID").mkdir(parents=True)
    with pytest.raises(DataError, match=r"found only CT_COVID/"):
        ingest_covid(half, tmp_path / "ds")

    both = _small_soares(covid_sample, tmp_path / "both", n=1)
    (both / "CT_COVID").mkdir()
    (both / "CT_NonCOVID").mkdir()
    with pytest.raises(DataError, match="both"):
        ingest_covid(both, tmp_path / "ds")

    empty = _small_soares(covid_sample, tmp_path / "empty", n=1)
    for p in (empty / "non-COVID").iterdir():
        p.unlink()
    (empty / "non-COVID" / "Thumbs.db").write_bytes(b"x")
    with pytest.raises(DataError, match=r"non-COVID: class folder holds no image files"):
        ingest_covid(empty, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


# --- 6./7. determinism and atomicity ------------------------------------------------------------


def test_deterministic_and_size(covid_sample: Path, soares: tuple[Path, dict], tmp_path: Path) -> None:
    out, report = soares
    again = ingest_covid(covid_sample, tmp_path / "again", seed=0)
    assert again["content_hash"] == report["content_hash"]
    assert _tree_bytes(tmp_path / "again") == _tree_bytes(out)

    small = ingest_covid(_small_soares(covid_sample, tmp_path / "src"), tmp_path / "s64", size=64, n_folds=2)
    df = read_manifest(tmp_path / "s64")
    arrays = load_arrays(tmp_path / "s64", df["array"].tolist())
    assert small["size"] == 64 and arrays.shape == (6, 64, 64) and arrays.dtype == np.float32
    assert small["content_hash"] != report["content_hash"]


def test_failed_ingest_leaves_nothing_half_written(covid_sample: Path, tmp_path: Path) -> None:
    root = _small_soares(covid_sample, tmp_path / "src")
    out = tmp_path / "out" / "ds"
    (root / "non-COVID" / "Non-Covid (9999).png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError):
        ingest_covid(root, out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no temp directory left behind

    good = ingest_covid(root, out, skip_bad=True, n_folds=2)
    before = _tree_bytes(out)
    with pytest.raises(DataError):
        ingest_covid(root, out)
    assert _tree_bytes(out) == before
    assert read_info(out)["content_hash"] == good["content_hash"]
    assert [p.name for p in out.parent.iterdir()] == ["ds"]
