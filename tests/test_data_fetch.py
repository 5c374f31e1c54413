"""`flowgrpo data fetch`: the recorded checksums match the reference copies, a download lands
in the recipes' layout, and a changed or cut file is refused with a one-line error."""

import shutil

import pytest
from helpers import SHARED_DATA

from flowgrpo import data_fetch
from flowgrpo.cli import main
from flowgrpo.data_fetch import DATASETS, DataFetchError, fetch, sha256_of

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="reference copies of the benchmark files absent")


def _from_reference_copies(monkeypatch):
    """Serve every URL from the reference copy at the same relative path."""
    by_url = {item.url: SHARED_DATA / item.path for _, files in DATASETS.values() for item in files}

    def copy(url, dest, timeout=60.0):
        src = by_url[url]
        if not src.is_file():
            raise DataFetchError(f"could not download {url}: no reference copy")
        shutil.copy(src, dest)

    monkeypatch.setattr(data_fetch, "download", copy)


@needs_data
def test_recorded_checksums_are_those_of_the_reference_copies():
    checked = [item for _, files in DATASETS.values() for item in files if item.sha256]
    assert len(checked) >= 7
    for item in checked:
        assert sha256_of(SHARED_DATA / item.path) == item.sha256, item.path


@needs_data
def test_fetch_writes_the_layout_the_recipes_and_eval_read(tmp_path, monkeypatch):
    _from_reference_copies(monkeypatch)
    assert main(["data", "fetch", "unigenbench", "--data-dir", str(tmp_path)]) == 0
    for name in ("test_prompts_en.csv", "train_prompt.txt", "LICENSE.txt"):
        assert (tmp_path / "unigenbench" / name).read_bytes() == (SHARED_DATA / "unigenbench" / name).read_bytes()
    from flowgrpo.eval.benchmarks import load_benchmark

    assert len(load_benchmark("unigenbench", data_dir=tmp_path).items) == 600
    # a second run finds the checked files in place and downloads nothing
    monkeypatch.setattr(data_fetch, "download", lambda *a, **k: pytest.fail("downloaded a present file"))
    assert main(["data", "fetch", "unigenbench", "--data-dir", str(tmp_path)]) == 0


def test_real_download_path_over_file_url(tmp_path):
    src = tmp_path / "upstream.txt"
    src.write_text("a photo of a red circle\n")
    item = data_fetch.RemoteFile(src.as_uri(), "sub/prompts.txt", sha256_of(src))
    path, status = data_fetch.fetch_file(item, tmp_path / "data")
    assert status == "fetched" and path.read_text() == "a photo of a red circle\n"


def test_checksum_mismatch_is_refused_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_fetch, "download", lambda url, dest, timeout=60.0: dest.write_text("changed upstream\n"))
    with pytest.raises(DataFetchError, match="sha256 .* is not the recorded"):
        fetch(["ocr"], tmp_path)
    assert not (tmp_path / "flow_grpo" / "ocr" / "test.txt").exists()
    assert not list((tmp_path / "flow_grpo" / "ocr").glob("*.part"))
    # through the CLI it is one line naming the fix
    assert main(["data", "fetch", "ocr", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-verify" in err[0]
    # --no-verify keeps the changed file
    fetch(["ocr"], tmp_path, verify=False)
    assert (tmp_path / "flow_grpo" / "ocr" / "test.txt").read_text() == "changed upstream\n"


def test_unknown_name_names_the_choices(tmp_path):
    with pytest.raises(DataFetchError, match="choose from unigenbench, geneval, ocr, pickscore, all"):
        fetch(["genevall"], tmp_path)
