"""Twemoji's SVGs as an emoji source: file names match emoji-datasource's records, so labels and splits carry over."""
from ldm.data.emoji import SOURCES, EmojiRecord, emoji_caption, split_of, svg_file_key, twemoji_svg_records


def test_svg_file_key_drops_fe0f_and_leading_zeros():
    assert svg_file_key("1F600") == "1f600"
    assert svg_file_key("0023-FE0F-20E3") == "23-20e3"  # keycap #: Twemoji's "23-20e3.svg"
    assert svg_file_key("2764-FE0F") == "2764"
    assert svg_file_key("1F44B-1F3FB") == "1f44b-1f3fb"


def test_twemoji_svg_records_keep_the_datasource_labels_and_hexcodes():
    records = [EmojiRecord("1F34E", "red apple", "1f34e.png", ["apple"]),
               EmojiRecord("0023-FE0F-20E3", "keycap: #", "0023-fe0f-20e3.png"),
               EmojiRecord("1FAE9", "face with bags under eyes", "1fae9.png")]  # Unicode 16: no SVG in Twemoji 15
    out = twemoji_svg_records(records, ["1f34e.svg", "23-20e3.svg", "1f600.svg"])
    assert [(r.hexcode, r.label, r.image, r.tags) for r in out] == [
        ("1F34E", "red apple", "1f34e.svg", ["apple"]), ("0023-FE0F-20E3", "keycap: #", "23-20e3.svg", [])]
    # The same hexcode as the PNG source, so the same split: a held-out emoji stays held out in every rendering.
    assert split_of(out[0].hexcode) == split_of(records[0].hexcode)


def test_twemoji_svg_captions_say_twemoji_style():
    assert SOURCES["twemoji-svg"][2] == "npm:@twemoji/svg"
    assert emoji_caption("red apple", "twemoji-svg") == "an emoji of a red apple, twemoji style"
