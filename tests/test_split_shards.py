"""tools/split_shards.py: every sample lands in exactly one shard with all its members, shards are balanced."""
import io
import subprocess
import sys
import tarfile
from pathlib import Path

from helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def write_part(path: Path, keys: list[str], mode: str) -> None:
    with tarfile.open(path, mode) as tar:
        for key in keys:
            for ext, data in (("txt", f"caption {key}".encode()), ("webp", key.encode() * 7)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_split_regroups_compressed_and_plain_parts(tmp_path):
    write_part(tmp_path / "a.tar.gz", [f"{i:04d}" for i in range(0, 13)], "w:gz")
    write_part(tmp_path / "b.tar", [f"{i:04d}" for i in range(13, 30)], "w")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/split_shards.py"), "--out", str(out), "--shards", "4",
                           str(tmp_path / "a.tar.gz"), str(tmp_path / "b.tar")],
                          capture_output=True, text=True, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    shards = sorted(out.glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert not list(out.glob("*.tmp"))
    contents = [read_shard(p) for p in shards]
    assert sorted(len(c) for c in contents) == [7, 7, 8, 8]  # 30 samples round-robin over 4
    seen = {}
    for c in contents:
        for key, members in c.items():
            assert key not in seen  # each sample in exactly one shard
            seen[key] = members
    assert sorted(seen) == [f"{i:04d}" for i in range(30)]
    assert all(m == {"txt": f"caption {k}".encode(), "webp": k.encode() * 7} for k, m in seen.items())


def test_split_refuses_a_missing_part(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/split_shards.py"), "--out", str(tmp_path / "o"),
                           str(tmp_path / "nope.tar.gz")], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 2
    assert "nope.tar.gz" in proc.stderr and not (tmp_path / "o").exists()


def test_split_refuses_a_sample_key_repeated_across_parts(tmp_path):
    write_part(tmp_path / "a.tar", ["0001", "0002"], "w")
    write_part(tmp_path / "b.tar", ["0002"], "w")  # 0002 again: one copy would silently replace the other
    proc = subprocess.run([sys.executable, str(ROOT / "tools/split_shards.py"), "--out", str(tmp_path / "o"),
                           str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], capture_output=True, text=True,
                          env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 2 and "0002" in proc.stderr and not (tmp_path / "o").exists()
