"""data_scripts and dataset builders: round trips, re-validation, emoji captions, synthetic shapes (no network)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.emoji import datasource_records, describe_label, emoji_caption, emojibase_labels, openmoji_records, split_of
from ldm.data.shards import AtomicShardWriter, encode_image, image_member, iter_raw_samples, make_record
from ldm.data.synthetic import generate_shapes, write_shape_shards

SCRIPTS = Path(__file__).resolve().parents[1] / "data_scripts"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["folder_to_shards", "img2dataset_to_shards", "build_emoji_dataset", "make_synthetic_shapes"])
def test_scripts_have_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(name).main(["--help"])
    assert exit_info.value.code == 0 and "--out" in capsys.readouterr().out


def _read_back(folder):
    shards = sorted(Path(folder).glob("*.tar"))
    return {json.loads(r["json"])["file_name"]: (r["txt"].decode(), image_member(r)[1], json.loads(r["json"]))
            for r in iter_raw_samples(shards)}


@pytest.mark.parametrize("layout", ["txt", "jsonl", "csv"])
def test_folder_to_shards_round_trip(tmp_path, layout):
    src = tmp_path / "images"
    (src / "sub").mkdir(parents=True)
    files = {"a.png": ("a red square", (255, 0, 0), "png"), "sub/b.jpg": ("a blue, wide square", (0, 0, 255), "jpg"),
             "c.webp": ("a green square", (0, 255, 0), "webp")}
    originals = {}
    for i, (name, (caption, colour, fmt)) in enumerate(files.items()):
        data = encode_image(Image.new("RGB", (20 + i, 10), colour), fmt)
        (src / name).write_bytes(data)
        originals[name] = (caption, data)
        if layout == "txt":
            (src / name).with_suffix(".txt").write_text(caption + "\n")
    (src / "nocaption.png").write_bytes(encode_image(Image.new("RGB", (8, 8)), "png"))
    if layout == "jsonl":
        (src / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": n, "text": c}) for n, (c, _) in originals.items()))
    elif layout == "csv":
        (src / "metadata.csv").write_text("file_name,caption\n" + "".join(f'{n},"{c}"\n' for n, (c, _) in originals.items()))
    stats = load_script("folder_to_shards").convert(src, tmp_path / "out", samples_per_shard=2, progress=False)
    assert stats == {"written": 3, "skipped_no_caption": 1, "shards": 2}
    back = _read_back(tmp_path / "out")
    assert {n: (c, d) for n, (c, d, _) in back.items()} == originals  # captions and image bytes come back equal
    assert back["sub/b.jpg"][2]["original_width"] == 21 and back["sub/b.jpg"][2]["height"] == 10
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind


def test_img2dataset_revalidation_filters_and_skips(tmp_path):
    with AtomicShardWriter(tmp_path / "in", samples_per_shard=3) as writer:
        for i, s in enumerate(generate_shapes(6, seed=4, image_size=32)):
            meta = {"similarity": 0.2 + 0.05 * i, "pwatermark": 0.9 if i == 5 else 0.1, "width": 32, "height": 32}
            writer.write(make_record(s.key, encode_image(s.image, "jpg"), "jpg", s.caption, meta))
        writer.write({"__key__": "garbage", "jpg": b"not an image", "txt": b"x"})
        writer.write({"__key__": "nocaption", "jpg": encode_image(Image.new("RGB", (32, 32)), "jpg")})
    module = load_script("img2dataset_to_shards")
    code = module.main(["--input", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--min-similarity", "0.3",
                        "--max-watermark", "0.5"])
    assert code == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats == {"written": 3, "filtered_similarity": 2, "filtered_watermark": 1, "skipped_corrupt_image": 1,
                     "skipped_no_caption": 1, "shards": 1}
    keys = sorted(r["__key__"] for r in iter_raw_samples(sorted((tmp_path / "out").glob("*.tar"))))
    assert keys == ["000000002", "000000003", "000000004"]


def test_img2dataset_url_list_without_the_package_is_a_clear_error(tmp_path, capsys):
    if importlib.util.find_spec("img2dataset") is not None:
        pytest.skip("img2dataset is installed here")
    (tmp_path / "urls.txt").write_text("http://example.invalid/a.jpg\n")
    code = load_script("img2dataset_to_shards").main(["--url-list", str(tmp_path / "urls.txt"), "--out", str(tmp_path / "o")])
    assert code == 2 and "pip install img2dataset" in capsys.readouterr().err


def test_emoji_captions():
    assert emoji_caption("red apple", "twitter") == "an emoji of a red apple, twemoji style"
    assert emoji_caption("eagle", "openmoji") == "an emoji of an eagle, openmoji style"
    assert emoji_caption("flag: Japan", "google") == "an emoji of the flag of Japan, noto emoji style"
    assert describe_label("waving hand: medium skin tone") == "a waving hand, medium skin tone"
    assert describe_label("crossed fingers") == "crossed fingers"
    assert describe_label("unicorn") == "a unicorn" and describe_label("bus") == "a bus"
    assert describe_label("keycap: 1") == "the keycap 1"
    assert describe_label("face with tears of joy") == "a face with tears of joy"


def test_emoji_records_from_package_fixtures():
    emojibase = [{"label": "red apple", "hexcode": "1F34E", "tags": ["apple", "fruit"]},
                 {"label": "waving hand", "hexcode": "1F44B", "tags": ["wave"],
                  "skins": [{"label": "waving hand: light skin tone", "hexcode": "1F44B-1F3FB"}]},
                 {"label": "face in clouds", "hexcode": "1F636-200D-1F32B-FE0F", "tags": []}]
    labels = emojibase_labels(emojibase)
    datasource = [
        {"name": "RED APPLE", "unified": "1F34E", "image": "1f34e.png", "has_img_twitter": True, "short_names": ["apple"]},
        {"name": "WAVING HAND SIGN", "unified": "1F44B", "image": "1f44b.png", "has_img_twitter": True,
         "skin_variations": {"1F3FB": {"unified": "1F44B-1F3FB", "image": "1f44b-1f3fb.png", "has_img_twitter": True},
                             "1F3FC": {"unified": "1F44B-1F3FC", "image": "1f44b-1f3fc.png", "has_img_twitter": False}}},
        {"name": "FACE IN CLOUDS", "unified": "1F636-200D-1F32B-FE0F", "image": "x.png", "has_img_twitter": True},
        {"name": "NO TWITTER", "unified": "1F600", "image": "y.png", "has_img_twitter": False},
    ]
    records = datasource_records(datasource, "twitter", labels)
    assert [(r.hexcode, r.label, r.image) for r in records] == [
        ("1F34E", "red apple", "1f34e.png"), ("1F44B", "waving hand", "1f44b.png"),
        ("1F44B-1F3FB", "waving hand: light skin tone", "1f44b-1f3fb.png"),
        ("1F636-200D-1F32B-FE0F", "face in clouds", "x.png")]  # FE0F does not stop the label lookup
    assert records[0].text == "\U0001F34E" and records[0].tags == ["apple", "fruit"]
    csv_text = "emoji,hexcode,group,subgroups,annotation,tags\n🍎,1F34E,food-drink,food-fruit,red apple,\"apple, fruit\"\n"
    [om] = openmoji_records(csv_text)
    assert om.image == "src/food-drink/food-fruit/1F34E.svg" and om.tags == ["apple", "fruit"]
    assert split_of("1F34E") == split_of("1F34E")
    fraction = np.mean([split_of(f"{i:X}", 0.2) == "validation" for i in range(4000)])
    assert abs(fraction - 0.2) < 0.03


def test_synthetic_shapes_are_deterministic_and_match_their_captions(tmp_path):
    a = list(generate_shapes(30, seed=5, image_size=48))
    b = list(generate_shapes(40, seed=5, image_size=48))[:30]
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
    assert [s.caption for s in a] != [s.caption for s in generate_shapes(30, seed=6, image_size=48)]
    for s in a:
        assert s.caption.split()[1:3] == [s.colour, s.shape] and s.image.size == (48, 48)
        ink = np.argwhere((np.asarray(s.image).astype(int).sum(-1) < 600))  # (row, col) of non-white pixels
        row, col = ink.mean(0) / 48
        expect = {"left": col < 0.4, "right": col > 0.6, "top": row < 0.4, "bottom": row > 0.6,
                  "centre": 0.4 < row < 0.6 and 0.4 < col < 0.6}
        assert expect[s.position], (s.caption, row, col)
    assert generate_shapes(1, 0, 64).__next__().caption.startswith(("a ", "an "))
    shards = write_shape_shards(tmp_path / "one", 7, seed=5, samples_per_shard=3)
    again = write_shape_shards(tmp_path / "two", 7, seed=5, samples_per_shard=3)
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [p.read_bytes() for p in shards] == [p.read_bytes() for p in again]  # byte-identical shards


def test_atomic_shard_writer_leaves_no_partial_or_empty_shard(tmp_path):
    with AtomicShardWriter(tmp_path / "empty"):
        pass
    assert list((tmp_path / "empty").iterdir()) == []
    with pytest.raises(RuntimeError):
        with AtomicShardWriter(tmp_path / "failed") as writer:
            writer.write(make_record("k", b"x", "jpg", "c", {}))
            raise RuntimeError("interrupted")
    assert list((tmp_path / "failed").iterdir()) == []
    with pytest.raises(ValueError):
        make_record("a.b", b"x", "jpg", "c", {})
