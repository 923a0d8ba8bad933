"""CLIP training (CPU, tiny): the contrastive loss and retrieval against known answers, the loop, resume, export."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.config import apply_overrides, from_dict, load_yaml
from ldm.errors import ConfigError, LdmError
from ldm.eval.retrieval import prompt_retrieval, retrieval_accuracy
from ldm.train.clip_loop import ClipTrainConfig, contrastive_loss, load_clip, normalize_images, train_clip

ROOT = Path(__file__).resolve().parents[1]
TINY = ["progress=false", "log_with=none", "data.resolution=16", "data.batch_size=6", "data.num_workers=0",
        "data.batches_per_epoch=3", "data.shuffle_buffer=4", "validation.batch_size=4", "validation.every=0",
        "checkpoint_every=2", "checkpoints_total_limit=null", "optim.warmup_steps=1", "mixed_precision='no'"]
TINY_MODEL = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


def test_contrastive_loss_known_answers():
    eye = torch.eye(4, 8)
    # identical unit embeddings, scale s: each row's logits are s on the diagonal and 0 elsewhere
    s = torch.tensor(2.0)
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 3))
    assert float(contrastive_loss(eye, eye, s)) == pytest.approx(expected, rel=1e-6)
    # all texts equal: every image sees 4 equal logits in both directions -> log 4
    assert float(contrastive_loss(eye, torch.ones(4, 8), s)) == pytest.approx(math.log(4), rel=1e-6)


def test_retrieval_accuracy_on_a_known_similarity():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # texts 1 and 2 swapped
    acc = retrieval_accuracy(img, txt, ks=(1, 2), captions=["a", "b", "c"])
    assert acc["t2i_top1"] == pytest.approx(1 / 3) and acc["i2t_top1"] == pytest.approx(1 / 3)
    # the swapped ones score 0 for their own pair, tied with the third candidate: a tie counts against them
    assert acc["t2i_top2"] == pytest.approx(1 / 3)
    assert acc["duplicate_caption_groups"] == 0
    assert retrieval_accuracy(img, txt, ks=(1, 2), captions=None) == acc  # None: every pair distinct
    assert retrieval_accuracy(img, img, captions=None)["t2i_top1"] == 1.0
    assert prompt_retrieval(img, txt, torch.tensor([0, 2, 1]), ks=(1,))["top1"] == 1.0
    with pytest.raises(LdmError):
        retrieval_accuracy(img, torch.eye(2), captions=None)
    with pytest.raises(LdmError, match="2 captions for 3"):
        retrieval_accuracy(img, txt, captions=["a", "b"])


def test_retrieval_counts_pairs_with_the_same_caption_as_right_answers():
    # a perfect model: each image embeds where its caption does; pairs 0 and 1 share a caption, so their images and
    # texts coincide and each ties with the other's. Ties between right answers must not count against them.
    captions = ["a red apple", "a red apple", "a cat", "a dog"]
    emb = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    acc = retrieval_accuracy(emb, emb, ks=(1,), captions=captions)
    assert acc == {"t2i_top1": 1.0, "i2t_top1": 1.0, "duplicate_caption_groups": 1.0}
    # without the captions both tied pairs rank 2nd, as before the fix: 0.5
    assert retrieval_accuracy(emb, emb, ks=(1,), captions=None)["t2i_top1"] == 0.5
    # both directions take any same-caption row (image 0 finds text 1, image 1 text 0, text 0 image 1 ...), and a
    # tie with a wrong candidate still counts against the right one (image 3: text 3 ties with text 2)
    e = torch.eye(4)
    img = torch.stack([e[1], e[0], e[2], (e[2] + e[3]) / 2**0.5])
    acc = retrieval_accuracy(img, e, ks=(1, 2), captions=captions)
    assert acc["i2t_top1"] == 0.75 and acc["i2t_top2"] == 1.0 and acc["t2i_top1"] == 1.0
    old = retrieval_accuracy(img, e, ks=(1, 2), captions=None)
    assert old["i2t_top1"] == 0.25 and old["t2i_top1"] == 0.5
    three = ["x", "x", "x", "y", "z", "z"]  # two groups, one of three
    assert retrieval_accuracy(torch.eye(6), torch.eye(6), captions=three)["duplicate_caption_groups"] == 2


def test_images_are_normalised_as_open_clip_preprocesses():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    x = torch.rand(2, 3, 4, 4) * 2 - 1
    want = ((x + 1) / 2 - torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]) / torch.tensor(OPENAI_DATASET_STD)[:, None, None]
    assert torch.allclose(normalize_images(x), want, atol=1e-6)


def test_config_checks():
    base = {"model": TINY_MODEL, "data": {"resolution": 16}}
    with pytest.raises(ConfigError, match="image_size"):
        from_dict(ClipTrainConfig, {**base, "data": {"resolution": 32}})
    with pytest.raises(ConfigError, match="caption_dropout"):
        from_dict(ClipTrainConfig, {**base, "data": {"resolution": 16, "caption_dropout": 0.1}})
    with pytest.raises(ConfigError, match="lacks"):
        from_dict(ClipTrainConfig, {"data": {"resolution": 16}})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from ldm.data.synthetic import write_shape_shards

    root = tmp_path_factory.mktemp("clip-shards")
    write_shape_shards(root / "train", 18, seed=0, image_size=16, samples_per_shard=6, image_format="png")
    write_shape_shards(root / "val", 8, seed=1, image_size=16, samples_per_shard=8, image_format="png")
    return str(root / "train"), str(root / "val")


def tiny_config(shards, out: Path, *overrides: str) -> ClipTrainConfig:
    data = load_yaml(ROOT / "configs" / "clip-emoji.yaml")
    data["model"] = TINY_MODEL
    data["data"]["shards"], data["validation"]["shards"] = shards
    data["output_dir"] = str(out)
    return from_dict(ClipTrainConfig, apply_overrides(data, [*TINY, *overrides]))


@pytest.mark.slow
def test_train_resume_export_and_reload_through_open_clip(shards, tmp_path):
    straight = train_clip(tiny_config(shards, tmp_path / "a", "max_steps=4"))
    train_clip(tiny_config(shards, tmp_path / "b", "max_steps=2"))
    resumed = train_clip(tiny_config(shards, tmp_path / "b", "max_steps=4"), resume="latest")
    # the checkpoint records the data stream its position counts in (a resume with another one warns)
    from ldm.train.checkpointing import checkpoint_dir, read_trainer_state
    assert read_trainer_state(checkpoint_dir(resumed, 4))["stream"]["processes"] == 1
    # the resumed run continues the same data stream and optimizer state: the same weights as the straight one
    a, b = load_file(str(straight / "clip-emoji.safetensors")), load_file(str(resumed / "clip-emoji.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5 * float(a[k].abs().max()) + 1e-6), k
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["val/pairs"] == 8
    assert metrics["val/duplicate_caption_groups"] == 0  # the 8 held-out captions differ
    assert all(0.0 <= metrics[f"val/{d}_top{k}"] <= 1.0 for d in ("t2i", "i2t") for k in (1, 5))
    assert metrics["val/t2i_top5"] >= metrics["val/t2i_top1"]
    # the export loads through open_clip's own factory and computes what the trained model computed
    model = load_clip(straight / "clip-emoji.json", straight / "clip-emoji.safetensors")
    sd = model.state_dict()
    assert all(torch.equal(sd[k], a[k]) for k in a)
    import open_clip

    ids = open_clip.get_tokenizer("clip-emoji")(["a red circle"])
    assert ids.shape == (1, 16)
    assert model.encode_text(ids).shape == (1, 16)
    assert model.encode_image(torch.zeros(1, 3, 16, 16)).shape == (1, 16)
