"""Videos: frame sampling, sizes, grids, prompt ids and pixels against transformers' own pieces; greedy parity
with transformers' model given pixel_values_videos; bad videos named; caption over a folder of videos."""

import io
import json
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from PIL import Image

from glm45v_npu import LLM, SamplingParams
from glm45v_npu.errors import Glm45vError
from glm45v_npu.inputs.processor import Processor
from glm45v_npu.inputs.video import load_video_config, read_video, write_test_video
from glm45v_npu.model.hf_config import load_config
from tests.tiny import IMAGE_TOKEN, image_processor, make_vl_checkpoint, random_image


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("video-ckpt")
    ref = make_vl_checkpoint(path, "gqa2-hd32-half-rope", seed=91)
    return path, ref


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {
        "1s": write_test_video(d / "one_second.mp4", 1.0, fps=10, size=(64, 48), seed=1),
        "3s": write_test_video(d / "three.mp4", 3.0, fps=10, size=(80, 60), seed=2),
        "odd": write_test_video(d / "odd.mp4", 1.5, fps=10, size=(64, 48), seed=3),  # 3 samples -> padded to 4
        "single": write_test_video(d / "single.mp4", 0.1, fps=10, size=(64, 48), seed=4),  # one frame
        "400s": write_test_video(d / "long.mp4", 400.0, fps=2, size=(32, 24), seed=5),  # past max_duration
    }


def _owner(cfg):
    return SimpleNamespace(fps=cfg.fps, max_duration=cfg.max_duration, temporal_patch_size=cfg.temporal_patch_size,
                           size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
                           patch_size=cfg.patch_size, merge_size=cfg.merge_size)


def _transformers_video(path, cfg):
    """transformers' reading and sampling of the video (read_video_pyav with the GLM-4V sampler)."""
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    from transformers.video_utils import read_video_pyav

    owner = _owner(cfg)
    frames, metadata = read_video_pyav(str(path), lambda metadata, **kw: Glm4vVideoProcessor.sample_frames(owner,
                                                                                                      metadata))
    return frames, metadata, owner


def _expected_video_text(video_grid, metadata) -> str:
    """transformers' Glm4vProcessor.replace_video_token (torchvision-free, called on a stand-in self)."""
    from transformers import Glm4vProcessor

    fake = SimpleNamespace(video_processor=SimpleNamespace(merge_size=2), image_token="<|image|>")
    fake.replace_frame_token_id = lambda ts, num_image_tokens: Glm4vProcessor.replace_frame_token_id(
        fake, ts, num_image_tokens)
    return Glm4vProcessor.replace_video_token(fake, {"video_grid_thw": torch.tensor([video_grid]),
                                                      "video_metadata": [metadata]}, 0)


@pytest.mark.parametrize("which", ["1s", "3s", "odd", "single", "400s"])
@pytest.mark.parametrize("with_image", [False, True])
def test_sampling_sizes_grid_prompt_and_pixels_match_transformers(ckpt, clips, which, with_image):
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    path, _ = ckpt
    cfg = load_video_config(path)
    proc = Processor(path, load_config(path))
    frames, metadata, owner = _transformers_video(clips[which], cfg)
    ours = read_video(str(clips[which]), cfg, "v")
    assert ours.indices == [int(i) for i in metadata.frames_indices]  # sampled frame indices
    assert len(ours.indices) % 2 == 0
    t, h, w = ours.grid
    # pixels: transformers' frames, resized with PIL bicubic (its torchvision resize is not available here),
    # normalised, then transformers' own patchify
    resized = np.stack([np.asarray(Image.fromarray(f).resize((w * 14, h * 14), Image.BICUBIC)) for f in frames])
    x = torch.from_numpy(resized).permute(0, 3, 1, 2)[None].float() / 255
    mean, std = torch.tensor(cfg.image_mean).view(1, 1, 3, 1, 1), torch.tensor(cfg.image_std).view(1, 1, 3, 1, 1)
    ref, *grid = Glm4vVideoProcessor.patchify(None, (x - mean) / std, patch_size=14, merge_size=2,
                                              temporal_patch_size=2)
    assert tuple(int(g) for g in grid) == ours.grid
    assert torch.allclose(ours.pixels, ref[0], atol=1e-5)
    # prompt ids: the chat template's text with the video (and image) placeholders expanded as transformers does
    content = [{"type": "video", "video": str(clips[which])}, {"type": "text", "text": "what moves?"}]
    image = random_image(56, 42, 7)
    if with_image:
        content.insert(0, {"type": "image", "image": image})
    enc = proc.encode({"messages": [{"role": "user", "content": content}]})
    text = proc.tokenizer.apply_chat_template([{"role": "user", "content": [
        {"type": p["type"]} if p["type"] != "text" else p for p in content]}], tokenize=False, add_generation_prompt=True)
    text = text.replace("<|video|>", _expected_video_text(ours.grid, metadata))
    if with_image:
        grid = image_processor()(images=[image])["image_grid_thw"][0]
        text = text.replace("<|begin_of_image|><|image|><|end_of_image|>",
                            "<|begin_of_image|>" + "<|image|>" * int(grid.prod() // 4) + "<|end_of_image|>", 1)
    assert enc.token_ids == proc.tokenizer.encode(text, add_special_tokens=False)


def _transformers_glm46v_sampler():
    """transformers' GLM-4.6V sample_frames, lifted out of its module (which cannot import without torchvision)
    and run as it is written."""
    import ast
    import inspect
    import math
    import textwrap

    import transformers.models.glm4v.video_processing_glm4v as glm4v

    source = (Path(inspect.getfile(glm4v)).parent.parent / "glm46v" / "video_processing_glm46v.py").read_text()
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Glm46VVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "sample_frames")
    scope = {"np": np, "math": math, "VideoMetadata": object}
    exec(textwrap.dedent(ast.get_source_segment(source, fn)), scope)  # noqa: S102 - transformers' own code
    return scope["sample_frames"]


@pytest.mark.parametrize("seconds, fps", [(3.0, 10), (45.0, 4), (400.0, 1)])
def test_glm46v_frame_rule_equals_transformers(seconds, fps):
    from transformers.video_utils import VideoMetadata

    from glm45v_npu.inputs.video import glm46v_frame_indices

    sample = _transformers_glm46v_sampler()
    total = int(seconds * fps)
    metadata = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
    want = [int(i) for i in sample(SimpleNamespace(temporal_patch_size=2), metadata)]
    assert glm46v_frame_indices(metadata, 2) == want


def test_glm46v_checkpoints_take_their_own_sampler_and_timestamps(ckpt, clips, tmp_path):
    import shutil

    path, _ = ckpt
    copy = Path(shutil.copytree(path, tmp_path / "ckpt46"))
    raw = json.loads((copy / "video_preprocessor_config.json").read_text())
    raw["video_processor_type"] = "Glm46VVideoProcessor"
    (copy / "video_preprocessor_config.json").write_text(json.dumps(raw))
    cfg = load_video_config(copy)
    assert cfg.variant == "glm46v"
    from transformers.video_utils import read_video_pyav

    sample = _transformers_glm46v_sampler()
    _, metadata = read_video_pyav(str(clips["3s"]), lambda metadata, **kw: sample(_owner(cfg), metadata))
    ours = read_video(str(clips["3s"]), cfg, "v")
    assert ours.indices == [int(i) for i in metadata.frames_indices]
    assert ours.timestamp_text("glm46v", 1) == f"{ours.timestamps[1]:.1f} seconds"


def _reference_generate(ref, ids, video_pixels, video_grid, images, n):
    """transformers' greedy tokens and logprobs, its vision tower, rope index and decoder doing the math. The
    features are put in place here: transformers 5.24 cannot take an image and a video in one prompt (its
    placeholder masks for both are 'the image token'), so its forward is fed the merged embeddings."""
    m = ref.model
    types = torch.zeros(len(ids), dtype=torch.int)
    inside = False
    for i, t in enumerate(ids):
        inside = (inside or t == ref.config.video_start_token_id) and t != ref.config.video_end_token_id
        if t == IMAGE_TOKEN:
            types[i] = 2 if inside else 1
    image_grid = None
    with torch.inference_mode():
        embeds = m.get_input_embeddings()(torch.tensor(ids))
        vgrid = torch.tensor([video_grid])
        video = torch.cat(m.get_video_features(video_pixels, vgrid, return_dict=True).pooler_output)
        embeds[types == 2] = video.to(embeds.dtype)
        if images:
            px = image_processor()(images=images, return_tensors="pt")
            image_grid = px["image_grid_thw"]
            image = torch.cat(m.get_image_features(px["pixel_values"], image_grid, return_dict=True).pooler_output)
            embeds[types == 1] = image.to(embeds.dtype)
        tokens, logps = [], []
        seq = list(ids)
        for _ in range(n):
            kinds = torch.cat([types, torch.zeros(len(seq) - len(ids), dtype=torch.int)])[None]
            positions, _ = m.get_rope_index(torch.tensor([seq]), kinds, image_grid, vgrid)
            logits = ref(inputs_embeds=embeds[None], position_ids=positions).logits[0, -1].float()
            token = int(logits.argmax())
            tokens.append(token)
            logps.append(float(torch.log_softmax(logits, -1)[token]))
            seq.append(token)
            embeds = torch.cat([embeds, m.get_input_embeddings()(torch.tensor([token]))])
    return tokens, logps


@pytest.mark.parametrize("with_image", [False, True])
def test_greedy_equals_transformers_with_chunked_prefill_inside_the_video(ckpt, clips, with_image):
    path, ref = ckpt
    cfg = load_video_config(path)
    video = read_video(str(clips["3s"]), cfg, "v")
    image = random_image(56, 42, 8)
    content = [{"type": "video", "video": str(clips["3s"])}, {"type": "text", "text": "what moves?"}]
    if with_image:
        content.insert(0, {"type": "image", "image": image})
    llm = LLM(path, block_size=4, kv_cache_gib=0.004, max_num_batched_tokens=7)  # chunks split the video's runs
    out = llm.generate({"messages": [{"role": "user", "content": content}]},
                       SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0))[0]
    c = out.outputs[0]
    tokens, logps = _reference_generate(ref, out.prompt_token_ids, video.pixels, video.grid,
                                        [image] if with_image else [], 6)
    assert c.token_ids == tokens
    assert max(abs(d[t].logprob - lp) for d, t, lp in zip(c.logprobs, c.token_ids, logps)) <= 2e-3
    assert llm.stats().prefix_cache_hit_tokens == 0
    again = llm.generate({"messages": [{"role": "user", "content": content}]},
                         SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))[0]
    assert again.num_cached_tokens > 16  # the same frames are found in the prefix cache


def _audio_only(path):
    with av.open(str(path), "w") as c:
        s = c.add_stream("mp2", rate=44100)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
        frame.sample_rate = 44100
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def _no_frames(path):
    """A container with a video stream and not one frame (AVI writes its header without any)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        c.start_encoding()
    return path


def _unknown_codec(path):
    with av.open(str(path.with_suffix(".webm")), "w") as c:
        s = c.add_stream("libvpx", rate=10)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(5):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 20, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = path.with_suffix(".webm").read_bytes().replace(b"V_VP8", b"V_ZZ9")  # a codec id FFmpeg has no decoder for
    path.with_suffix(".webm").unlink()
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory, clips):
    d = tmp_path_factory.mktemp("bad-videos")
    (d / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    _audio_only(d / "audio_only.mkv")
    _no_frames(d / "no_frames.avi")
    _unknown_codec(d / "unknown_codec.mkv")
    good = write_test_video(d / "good.mp4", 1.0, size=(64, 48), seed=9)
    huge = write_test_video(d / "huge.mp4", 0.5, size=(320, 240), seed=10)
    single = Path(clips["single"])
    return d, good, huge, single


def test_bad_videos_are_named(ckpt, bad_videos, monkeypatch):
    from glm45v_npu.inputs import video as video_module

    path, _ = ckpt
    cfg = load_video_config(path)
    d, good, huge, single = bad_videos
    expected = {"corrupt.mp4": "cannot be read as a video", "audio_only.mkv": "has no video stream",
                "no_frames.avi": "no decodable frames", "unknown_codec.mkv": "has no decoder"}
    for name, why in expected.items():
        with pytest.raises(Glm45vError) as e:
            read_video(str(d / name), cfg, f"video {d / name}")
        assert name in str(e.value) and why in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    monkeypatch.setattr(video_module, "MAX_FRAME_PIXELS", 200 * 200)  # a "huge" resolution, made small
    with pytest.raises(Glm45vError, match=r"huge.mp4: 320x240 frames are larger than 40000 pixels"):
        read_video(str(huge), cfg, f"video {huge}")
    assert read_video(str(single), cfg, "v").grid[0] == 1  # one frame, duplicated as transformers does
    assert read_video(str(good), cfg, "v").grid[0] >= 1


def test_caption_over_a_folder_of_good_and_bad_videos(ckpt, bad_videos, tmp_path):
    from rich.console import Console

    from glm45v_npu.apps.caption import collect_inputs, run_caption

    path, _ = ckpt
    d, *_ = bad_videos
    llm = LLM(path, block_size=4, kv_cache_gib=0.004)
    paths = collect_inputs([str(d)], recursive=False)
    out = tmp_path / "captions.jsonl"
    code = run_caption(llm, paths, out, "describe", SamplingParams(max_tokens=2, temperature=0), 3, False, False,
                       Console(file=io.StringIO()))
    lines = {Path(x["path"]).name: x for x in map(json.loads, out.read_text().splitlines())}
    assert code == 0 and set(lines) == {Path(p).name for p in paths} and len(lines) == 6
    assert {n for n, x in lines.items() if "answer" in x} == {"good.mp4", "huge.mp4"}
    for name in ("corrupt.mp4", "audio_only.mkv", "no_frames.avi", "unknown_codec.mkv"):
        assert name in lines[name]["error"]
    assert llm.stats().requests == 0
