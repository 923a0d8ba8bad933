"""Careless inputs to the dataset scripts: captions that are not UTF-8 are skipped and counted, never a crash."""
import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from ldm.data.shards import AtomicShardWriter, encode_image, image_member, iter_raw_samples, make_record
from ldm.errors import LdmError

SCRIPTS = Path(__file__).resolve().parents[1] / "data_scripts"
LATIN1 = "caf\xe9 au lait".encode("latin-1")  # b"caf\xe9 ..." is not UTF-8


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(encode_image(Image.new("RGB", (8 + i, 8), (40 * i, 0, 0)), "png"))


def _captions(out: Path) -> dict[str, str]:
    return {json.loads(r["json"])["file_name"]: r["txt"].decode() for r in iter_raw_samples(sorted(out.glob("*.tar")))}


def test_folder_to_shards_skips_and_counts_a_caption_file_that_is_not_utf8(tmp_path):
    src = tmp_path / "images"
    _images(src, ["a.png", "b.png", "c.png"])
    (src / "a.txt").write_text("a red square")
    (src / "b.txt").write_bytes(LATIN1)
    (src / "c.txt").write_text("a green square")
    stats = load_script("folder_to_shards").convert(src, tmp_path / "out", progress=False)
    assert stats == {"written": 2, "skipped_caption_not_utf8": 1, "shards": 1}
    assert _captions(tmp_path / "out") == {"a.png": "a red square", "c.png": "a green square"}
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["skipped_caption_not_utf8"] == 1


@pytest.mark.parametrize("layout", ["jsonl", "csv"])
def test_folder_to_shards_skips_one_bad_metadata_caption_and_keeps_the_rest(tmp_path, layout):
    src = tmp_path / "images"
    _images(src, ["a.png", "b.png", "c.png"])
    if layout == "jsonl":
        lines = [json.dumps({"file_name": "a.png", "text": "first"}).encode(),
                 b'{"file_name": "b.png", "text": "' + LATIN1 + b'"}',
                 json.dumps({"file_name": "c.png", "text": "third \u2603"}, ensure_ascii=False).encode()]
        (src / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    else:
        (src / "metadata.csv").write_bytes(b"file_name,text\na.png,first\nb.png," + LATIN1
                                           + "\nc.png,third \u2603\n".encode())
    stats = load_script("folder_to_shards").convert(src, tmp_path / "out", progress=False)
    assert stats == {"written": 2, "skipped_caption_not_utf8": 1, "shards": 1}
    assert _captions(tmp_path / "out") == {"a.png": "first", "c.png": "third \u2603"}


def test_folder_to_shards_cli_reports_the_skip_and_exits_0(tmp_path, capsys):
    src = tmp_path / "images"
    _images(src, ["a.png", "b.png"])
    (src / "a.txt").write_text("fine")
    (src / "b.txt").write_bytes(b"\xff\xfe\x00garbage")
    code = load_script("folder_to_shards").main([str(src), "--out", str(tmp_path / "out")])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped_caption_not_utf8"] == 1


def test_img2dataset_revalidation_counts_captions_that_are_not_utf8_by_their_own_reason(tmp_path):
    with AtomicShardWriter(tmp_path / "in", samples_per_shard=8) as writer:
        image = encode_image(Image.new("RGB", (32, 32)), "png")
        writer.write(make_record("000000000", image, "png", "a black square", {}))
        writer.write({"__key__": "000000001", "png": image, "txt": LATIN1})
    code = load_script("img2dataset_to_shards").main(["--input", str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    assert code == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats == {"written": 1, "skipped_caption_not_utf8": 1, "shards": 1}
    [kept] = list(iter_raw_samples(sorted((tmp_path / "out").glob("*.tar"))))
    assert kept["txt"] == b"a black square" and image_member(kept)[1] == image


def test_emoji_builder_names_a_damaged_package_file(tmp_path):
    module = load_script("build_emoji_dataset")
    (tmp_path / "package.json").write_bytes(b'{"version": "1.0", "x": "\xff"}')
    with pytest.raises(LdmError, match=r"package.json line 1 is not UTF-8.*--cache-dir"):
        module.package_version(tmp_path)
    (tmp_path / "package.json").write_text('{"version": ')
    with pytest.raises(LdmError, match="package.json is not valid JSON"):
        module.package_version(tmp_path)
    (tmp_path / "package.json").write_text('{"version": "15.0.1"}')
    assert module.package_version(tmp_path) == "15.0.1"
