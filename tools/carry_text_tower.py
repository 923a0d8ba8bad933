"""Pack a CLIP's text tower small enough to travel to a size-limited machine, and unpack it there.

    python tools/carry_text_tower.py pack CLIP.safetensors OUT.st.gz --captions 'data/emoji/train/*.tar' --prompts P
    python tools/carry_text_tower.py unpack OUT.st.gz TEXT.safetensors

Only the rows of the token embedding that the captions and prompts use travel; the unpacked file has zeros in the
others. A U-Net trained on it is conditioned exactly as with the whole tower (it only ever sees those tokens);
ship the whole CLIP beside it.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import sys
import tarfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.atomic import atomic_write_bytes  # noqa: E402
from ldm.cli.common import cli_main  # noqa: E402

ROWS, USED = "token_embedding.rows", "token_rows"


def captions_of(patterns: list[str]) -> list[str]:
    """Every `.txt` member of the tar shards the patterns match."""
    out = []
    for path in sorted(p for pattern in patterns for p in glob.glob(pattern)):
        with tarfile.open(path) as tar:
            out += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    return out


@cli_main
def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load, load_file, save

    p = argparse.ArgumentParser(prog="tools/carry_text_tower.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--captions", nargs="*", default=[], help="tar shards whose captions' tokens travel")
    p.add_argument("--prompts", nargs="*", default=[], help="text/jsonl prompt files whose tokens travel")
    p.add_argument("--context-length", type=int, default=40)
    args = p.parse_args(argv)
    if args.action == "pack":
        from open_clip.tokenizer import SimpleTokenizer

        from ldm.eval.prompts import load_prompts

        texts = captions_of(args.captions) + [q.text for f in args.prompts for q in load_prompts(f)] + [""]
        ids = SimpleTokenizer(context_length=args.context_length)(texts).unique()
        sd = {k: v for k, v in load_file(args.src).items() if not k.startswith("visual.")}
        emb = sd.pop("token_embedding.weight")
        sd[USED], sd[ROWS] = ids.to(torch.int64), emb[ids].contiguous()
        data = gzip.compress(save(sd), 9)
        print(f"{len(texts)} texts, {len(ids)} of {len(emb)} token rows, {len(data) / 1e6:.2f} MB")
    else:
        sd = load(gzip.decompress(Path(args.src).read_bytes()))
        ids, rows = sd.pop(USED), sd.pop(ROWS)
        emb = torch.zeros(49408, rows.shape[1], dtype=rows.dtype)
        emb[ids] = rows
        sd["token_embedding.weight"] = emb
        data = save(sd)
    atomic_write_bytes(args.dst, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
