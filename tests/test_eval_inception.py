"""Inception features through our extractor equal torch-fidelity's; the ldm-fid command and its errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli.fid import main as fid_main
from ldm.errors import LdmError
from ldm.eval.features import compute_features
from ldm.eval.frechet import load_stats
from ldm.eval.inception import InceptionExtractor, MissingWeightsError, resolve_inception_weights

from helpers import write_images


@pytest.mark.slow
def test_features_equal_torch_fidelity_extractor_called_directly(random_weights, tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = write_images(tmp_path / "imgs", seed=0)
    paths = sorted(folder.iterdir())
    ours = InceptionExtractor(random_weights)
    feats = compute_features(paths, ours, batch_size=2, progress=False)  # batches mix two image sizes
    theirs = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(random_weights)
    )
    with torch.no_grad():
        expected = torch.cat(
            [theirs(torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)[None])[0] for p in paths]
        ).double()
    assert feats.values.shape == (3, 2048)
    assert expected.abs().max() > 1e-3  # the random network does produce non-trivial features
    torch.testing.assert_close(feats.values, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    mu = expected.mean(0).numpy()
    np.testing.assert_allclose(feats.moments.to_stats().mu, mu, rtol=1e-5, atol=1e-9)


def test_ldm_fid_command_folders_npz_and_save_stats(random_weights, tmp_path, capsys):
    a = write_images(tmp_path / "a", seed=0)
    b = write_images(tmp_path / "b", seed=1, sizes=((32, 32),) * 2)
    args = ["--inception-weights", str(random_weights), "--num-workers", "0", "--device", "cpu"]
    assert fid_main([str(a), str(b), "--save-stats", str(tmp_path / "a.npz"), *args]) == 0
    value = float(capsys.readouterr().out.strip().splitlines()[-1])  # the FID is the last line
    stats_a = load_stats(tmp_path / "a.npz")
    assert stats_a.mu.shape == (2048,) and stats_a.n == 3 and stats_a.extractor == InceptionExtractor.name
    assert value > 0  # random Inception features are tiny (~1e-7), so is their FID; the CLI must not round it to 0
    assert fid_main([str(tmp_path / "a.npz"), str(b), *args]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(value, rel=1e-6)


def test_ldm_fid_bad_inputs_exit_2_with_clear_messages(random_weights, tmp_path, capsys):
    args = ["--inception-weights", str(random_weights), "--num-workers", "0", "--device", "cpu"]
    good = write_images(tmp_path / "good", seed=0, sizes=((32, 32),) * 2)
    (tmp_path / "empty").mkdir()
    assert fid_main([str(tmp_path / "empty"), str(good), *args]) == 2
    assert "empty: no images found" in capsys.readouterr().err

    broken = write_images(tmp_path / "broken", seed=0, sizes=((32, 32),) * 2)
    (broken / "002.png").write_bytes(b"\x89PNG not really")
    assert fid_main([str(broken), str(good), *args]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "002.png: cannot read image" in err

    np.savez(tmp_path / "d4.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.savez(tmp_path / "d3.npz", mu=np.zeros(3), sigma=np.eye(3))
    assert fid_main([str(tmp_path / "d4.npz"), str(tmp_path / "d3.npz")]) == 2
    assert "feature dimensions differ: 4 vs 3" in capsys.readouterr().err

    assert fid_main([str(tmp_path / "missing.npz"), str(good)]) == 2
    assert "missing.npz: no such statistics file" in capsys.readouterr().err


def test_offline_without_weights_fails_fast_saying_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="weights-inception-2015-12-05-6726825d.pth") as info:
        resolve_inception_weights()
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(info.value)
    assert "--inception-weights" in str(info.value) and "LDM_INCEPTION_WEIGHTS" in str(info.value)
    monkeypatch.setenv("LDM_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(LdmError, match="nope.pth, which does not exist"):
        resolve_inception_weights()


def test_weights_that_need_unsafe_unpickling_are_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(LdmError, match="not a plain tensor state dict"):
        InceptionExtractor(path)
