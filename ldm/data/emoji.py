"""Emoji dataset metadata: records from published packages' JSON/CSV, captions, deterministic splits (no I/O here)."""
from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import PurePosixPath

# source -> (style phrase in captions, licence of the images, where they come from)
SOURCES = {
    "twitter": ("twemoji style", "CC-BY-4.0 (Twemoji, Twitter Inc. and contributors)", "npm:emoji-datasource-twitter"),
    "google": ("noto emoji style", "Apache-2.0 (Noto Emoji, Google)", "npm:emoji-datasource-google"),
    "apple": ("apple emoji style", "proprietary (Apple Inc.); not openly licensed, research use at your own risk", "npm:emoji-datasource-apple"),
    "twemoji-svg": ("twemoji style", "CC-BY-4.0 (Twemoji graphics, Twitter Inc. and contributors; package MIT)", "npm:@twemoji/svg"),
    "openmoji": ("openmoji style", "CC-BY-SA-4.0 (OpenMoji, HfG Schwaebisch Gmuend)", "npm:openmoji"),
    "noto-font": ("noto emoji style", "OFL-1.1 font, Apache-2.0 images (Noto Color Emoji, Google)", "deb:fonts-noto-color-emoji"),
}
_AN_EXCEPTIONS = ("uni", "use", "usa", "eu", "one", "once")  # vowel letters read with a consonant sound
_PLURAL_NOT = ("ss", "us", "is", "os")


@dataclass
class EmojiRecord:
    """One emoji image to fetch or render: its code points, label and where its image lives in the source."""

    hexcode: str  # "1F34E" or "1F44B-1F3FB"
    label: str  # "red apple", "waving hand: light skin tone"
    image: str = ""  # file name inside the source package ("" for rendered sources)
    tags: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The emoji as a string."""
        return "".join(chr(int(part, 16)) for part in self.hexcode.split("-"))


def normalise_hexcode(hexcode: str) -> str:
    """Uppercase, without variation selector 16 (FE0F), so emoji-datasource and emojibase codes match."""
    return "-".join(p for p in hexcode.upper().split("-") if p != "FE0F")


def emojibase_labels(data: list[dict]) -> dict[str, tuple[str, list[str]]]:
    """emojibase-data `en/data.json` -> {normalised hexcode: (label, tags)}, skin tones included."""
    labels = {}
    for entry in data:
        for item in [entry, *entry.get("skins", [])]:
            labels[normalise_hexcode(item["hexcode"])] = (item["label"], item.get("tags", entry.get("tags", [])))
    return labels


def datasource_records(data: list[dict], image_set: str, labels: dict[str, tuple[str, list[str]]] | None = None) -> list[EmojiRecord]:
    """emoji-datasource `emoji.json` -> records of one image set ("twitter", "google", "apple"), skin tones included."""
    labels = labels or {}
    records = []
    for entry in data:
        variants = [entry, *(entry.get("skin_variations") or {}).values()]
        for item in variants:
            if not item.get(f"has_img_{image_set}"):
                continue
            label, tags = labels.get(normalise_hexcode(item["unified"]), (entry["name"].lower(), entry.get("short_names", [])))
            records.append(EmojiRecord(item["unified"], label, item["image"], list(tags)))
    return records


def svg_file_key(hexcode: str) -> str:
    """The code points as Twemoji names its SVG files: lowercase hex without leading zeros or FE0F ('23-20e3')."""
    return "-".join(f"{int(p, 16):x}" for p in normalise_hexcode(hexcode).split("-"))


def twemoji_svg_records(records: list[EmojiRecord], svg_names: list[str]) -> list[EmojiRecord]:
    """emoji-datasource's Twemoji records (their labels, hexcodes and hence splits) whose SVG `@twemoji/svg` ships,
    each pointing at that SVG file."""
    by_key = {svg_file_key(PurePosixPath(name).stem): name for name in svg_names}
    return [EmojiRecord(r.hexcode, r.label, by_key[svg_file_key(r.hexcode)], r.tags)
            for r in records if svg_file_key(r.hexcode) in by_key]


def openmoji_records(csv_text: str) -> list[EmojiRecord]:
    """openmoji `data/openmoji.csv` -> records whose image is `src/<group>/<subgroups>/<hexcode>.svg`."""
    rows = csv.DictReader(io.StringIO(csv_text))
    return [
        EmojiRecord(r["hexcode"], r["annotation"], f"src/{r['group']}/{r['subgroups']}/{r['hexcode']}.svg",
                    [t.strip() for t in r.get("tags", "").split(",") if t.strip()])
        for r in rows if r.get("annotation")
    ]


def _with_article(phrase: str) -> str:
    """'red apple' -> 'a red apple', 'eagle' -> 'an eagle', 'crossed fingers' -> 'crossed fingers'."""
    head = phrase
    for sep in (" with ", " of ", " in ", " on ", " and "):
        head = head.split(sep)[0]
    last = head.split()[-1] if head.split() else head
    if last.endswith("s") and not last.endswith(_PLURAL_NOT):
        return phrase
    first = phrase.lower()
    vowel = first[:1] in "aeiou" and not first.startswith(_AN_EXCEPTIONS)
    return ("an " if vowel or first.startswith(("hour", "honest")) else "a ") + phrase


def describe_label(label: str) -> str:
    """Turn an emoji label into a noun phrase: 'flag: Japan' -> 'the flag of Japan', 'waving hand: light skin tone'
    -> 'a waving hand, light skin tone', 'keycap: 1' -> 'the keycap 1'."""
    label = " ".join(label.replace("_", " ").split())
    name, _, detail = label.partition(": ")
    if name.lower() == "flag" and detail:
        return f"the flag of {detail}"
    if name.lower() == "keycap" and detail:
        return f"the keycap {detail}"
    phrase = _with_article(name)
    return f"{phrase}, {detail}" if detail else phrase


def emoji_caption(label: str, source: str) -> str:
    """'an emoji of a red apple, twemoji style'."""
    style = SOURCES[source][0]
    return f"an emoji of {describe_label(label)}, {style}"


def split_of(key: str, validation_fraction: float = 0.05) -> str:
    """'train' or 'validation', decided by the sha256 of the key (stable across runs, machines and sources)."""
    value = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return "validation" if value < validation_fraction else "train"
