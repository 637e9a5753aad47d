"""Vision tower and M-RoPE positions against transformers."""

import pytest
import torch

from glm45v_npu.inputs.mrope import mrope_positions
from glm45v_npu.inputs.processor import preprocess_images
from tests.harness import build_prompt, rel_err
from tests.tiny import IMAGE_TOKEN, image_processor, random_image

SIZES = [[(56, 56)], [(90, 60)], [(20, 30)], [(140, 28), (17, 70)], [(112, 112), (40, 120), (33, 33)]]


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "+".join(f"{w}x{h}" for w, h in s))
def test_image_features_match_transformers(vl_ckpt, sizes):
    images = [random_image(w, h, i) for i, (w, h) in enumerate(sizes)]
    pixels, grids = preprocess_images(images, image_processor())
    ours = vl_ckpt.ours().encode_images(pixels, grids)
    with torch.inference_mode():
        theirs = vl_ckpt.ref.model.get_image_features(pixels, torch.tensor(grids)).pooler_output
    assert [o.shape for o in ours] == [t.shape for t in theirs]
    for o, t in zip(ours, theirs):
        assert rel_err(o, t) <= 1e-4


@pytest.mark.parametrize("n_images", [0, 1, 2, 3])
def test_mrope_positions_match_get_rope_index(vl_ckpt, n_images):
    sizes = [(90, 60), (20, 30), (140, 56)][:n_images]
    images = [random_image(w, h, i) for i, (w, h) in enumerate(sizes)]
    _, grids = preprocess_images(images, image_processor())
    ids = build_prompt([4] + [3] * n_images, grids, seed=n_images)
    ours, delta = mrope_positions(ids, IMAGE_TOKEN, grids, merge=2)
    theirs, deltas = vl_ckpt.ref.model.get_rope_index(
        torch.tensor([ids]),
        mm_token_type_ids=(torch.tensor([ids]) == IMAGE_TOKEN).int(),
        image_grid_thw=torch.tensor(grids) if grids else None,
    )
    assert torch.equal(ours, theirs[:, 0])
    assert delta == int(deltas[0, 0])


def test_positions_reject_grid_token_mismatch():
    with pytest.raises(ValueError, match="image"):
        mrope_positions([1, IMAGE_TOKEN, IMAGE_TOKEN, 2], IMAGE_TOKEN, [(1, 4, 4)], merge=2)
    with pytest.raises(ValueError, match="more image grids"):
        mrope_positions([1, 2], IMAGE_TOKEN, [(1, 2, 2)], merge=2)
