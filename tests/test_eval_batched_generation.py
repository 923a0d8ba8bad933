"""Batched evaluation generation: per-image noise makes image k of a mixed-prompt batch the image of a batch of one
with its seed, for every sampler kind (deterministic and ancestral), for a pipeline and for a cascade."""
import numpy as np
import pytest
from helpers import stage_parts

from ldm.io.native_format import save_native
from ldm.pipeline.cascade import load_cascade
from ldm.pipeline.eval_images import generate_images, image_seed, plan_images
from ldm.pipeline.load import load_pipeline
from ldm.runtime import ImageGenerators, randn, seeded_generator

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red circle"]
SEEDS = [11, 22, 33, 44]


@pytest.fixture(scope="module")
def pipe(tiny_sd_folder):
    return load_pipeline(str(tiny_sd_folder), device="cpu")


def _arrays(images):
    return [np.asarray(image) for image in images]


def test_per_image_generators_draw_each_row_as_a_batch_of_one():
    drawn = randn((3, 2, 4, 4), ImageGenerators([5, 6, 7]))
    for k, seed in enumerate([5, 6, 7]):
        alone = randn((1, 2, 4, 4), seeded_generator(seed))[0]
        assert np.array_equal(drawn[k].numpy(), alone.numpy())
    assert not np.array_equal(drawn[0].numpy(), drawn[1].numpy())


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler", "euler_a"])  # deterministic; ancestral noise at every step
def test_a_mixed_prompt_batch_gives_each_image_its_own_single_image(pipe, sampler):
    kw = dict(sampler=sampler, steps=2, guidance=3.0, height=16, width=16)
    batched = _arrays(pipe.batch(PROMPTS, SEEDS, **kw))
    singles = [np.asarray(pipe(p, seed=s, **kw)[0]) for p, s in zip(PROMPTS, SEEDS)]
    for k in range(len(PROMPTS)):
        assert np.array_equal(batched[k], singles[k]), f"image {k} differs from its batch-of-one image"
    assert not np.array_equal(batched[0], batched[3])  # same prompt, other seed: another image
    assert batched[0].std() > 1.0  # the images are not blank


@pytest.mark.slow
def test_a_cascade_batch_equals_its_single_calls(tmp_path):
    base = stage_parts("base")
    save_native(base, tmp_path / "base")
    save_native(stage_parts("sr", base.text_encoder), tmp_path / "sr")
    cascade = load_cascade(str(tmp_path / "base"), [str(tmp_path / "sr")], device="cpu")
    kw = dict(sampler="ddim", steps=2, guidance=3.0)
    batched = _arrays(cascade.batch(PROMPTS[:3], SEEDS[:3], aug_level=0.2, **kw))
    for k in range(3):
        alone = np.asarray(cascade(PROMPTS[k], seed=SEEDS[k], aug_level=0.2, **kw)[0])
        assert batched[k].shape == (32, 32, 3)
        # The same noise; the SR network's float arithmetic may round differently in a batch of 3 than of 1
        # (a last-bit difference), which moves a pixel lying on a rounding boundary by one level.
        diff = np.abs(batched[k].astype(int) - alone.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"image {k}: {(diff > 0).sum()} pixels differ"


def test_image_seeds_depend_on_the_base_seed_and_index_only():
    planned = plan_images(["a", "b"], 2, seed=7)
    assert [(p.index, p.text) for p in planned] == [(0, "a"), (1, "a"), (2, "b"), (3, "b")]
    assert [p.seed for p in planned] == [image_seed(7, i) for i in range(4)]
    assert len({p.seed for p in planned} | {p.seed for p in plan_images(["a", "b"], 2, seed=8)}) == 8
    assert plan_images(["x", "y", "z"], 1, seed=7)[1].seed == planned[1].seed  # not a function of the prompt


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_batch_size_and_rank_split_give_the_same_files(pipe, tmp_path, world):
    planned = plan_images(PROMPTS[:3], 2, seed=0)
    gen = dict(sampler="euler_a", steps=2, guidance=3.0, height=16, width=16)
    settings = {"sampler": "euler_a"}
    generate_images(pipe, planned, tmp_path / "b1", gen, settings, batch_size=1, progress=False)
    for rank in range(world):
        generate_images(pipe, planned, tmp_path / "b4", gen, settings, batch_size=4, rank=rank, world=world,
                        progress=False)
    for p in planned:
        assert (tmp_path / "b1" / p.file_name).read_bytes() == (tmp_path / "b4" / p.file_name).read_bytes()
