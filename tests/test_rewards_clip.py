"""CLIP-family rewards on a tiny random CLIP built here, saved to a temp folder and reloaded
through the same `from_pretrained` path users take with a hub id."""

import json
import string

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from flowgrpo.rewards import RewardError, make_reward
from flowgrpo.rewards.clip import convert_aesthetic_weights

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "text"]


def _char_tokenizer(folder):
    chars = sorted(set(string.ascii_lowercase + string.digits + ".,'!?-"))
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP whose projection is 768-d, so the aesthetic MLP fits it too."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    tok = _char_tokenizer(folder)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=768,
    )
    CLIPModel(cfg).save_pretrained(folder)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}),
                         tokenizer=tok)
    proc.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(len(PROMPTS), 48, 40, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "clip"])
def test_text_image_rewards_shape_determinism_batching(name, tiny_clip, images):
    reward = make_reward(name, model=tiny_clip, processor=tiny_clip, batch_size=3, device="cpu")
    out = reward(images, PROMPTS)
    assert out.scores.shape == (len(PROMPTS),) and np.isfinite(out.scores).all()
    assert np.ptp(out.scores) > 0  # different image/prompt pairs really get different scores
    # Deterministic across calls and across a fresh load of the same folder.
    np.testing.assert_array_equal(out.scores, reward(images, PROMPTS).scores)
    again = make_reward(name, model=tiny_clip, processor=tiny_clip, device="cpu")
    np.testing.assert_allclose(out.scores, again(images, PROMPTS).scores, rtol=0, atol=1e-6)
    # Batched (chunks of 3, padded text) equals one image at a time.
    one_by_one = np.concatenate([reward(images[i:i + 1], PROMPTS[i:i + 1]).scores for i in range(len(PROMPTS))])
    np.testing.assert_allclose(out.scores, one_by_one, rtol=0, atol=1e-5)


def test_clipscore_and_pickscore_follow_the_reference_formula(tiny_clip, images):
    """clipscore = diag(logits_per_image) / 30 from CLIPModel's own forward; pickscore the same / 26."""
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    proc = CLIPProcessor.from_pretrained(tiny_clip)
    inputs = proc(text=PROMPTS, images=[Image.fromarray(a) for a in images], padding="max_length",
                  truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits_per_image.diagonal().double().numpy()
    clip = make_reward("clipscore", model=tiny_clip, device="cpu")(images, PROMPTS)
    pick = make_reward("pickscore", model=tiny_clip, processor=tiny_clip, device="cpu")(images, PROMPTS)
    plain = make_reward("clip", model=tiny_clip, device="cpu")(images, PROMPTS)
    np.testing.assert_allclose(clip.scores, logits / 30, atol=1e-5)
    np.testing.assert_allclose(pick.scores, logits / 26, atol=1e-5)
    np.testing.assert_allclose(plain.scores, clip.components["clip_cosine"], atol=1e-12)
    assert np.all(np.abs(plain.scores) <= 1 + 1e-6)


def _mlp_state(seed=1):
    g = torch.Generator().manual_seed(seed)
    dims = [(768, 1024, 0), (1024, 128, 2), (128, 64, 4), (64, 16, 6), (16, 1, 7)]
    state = {}
    for i, o, idx in dims:
        state[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g) / i ** 0.5
        state[f"layers.{idx}.bias"] = torch.randn(o, generator=g)
    return state


def test_aesthetic_from_pth_and_safetensors(tiny_clip, images, tmp_path):
    state = _mlp_state()
    pth = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, pth)  # the published checkpoint's format: a plain state dict
    st = convert_aesthetic_weights(pth, tmp_path / "aesthetic.safetensors")
    a = make_reward("aesthetic", weights=str(pth), model=tiny_clip, device="cpu")(images, PROMPTS)
    b = make_reward("aesthetic", weights=str(st), model=tiny_clip, device="cpu", batch_size=1)(images, PROMPTS)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    # Independently: MLP on the normalised image embedding.
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    px = CLIPProcessor.from_pretrained(tiny_clip).image_processor(images=[Image.fromarray(x) for x in images],
                                                                  return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=px)
        emb = getattr(emb, "pooler_output", emb)
        x = emb / emb.norm(dim=-1, keepdim=True)
        for idx in (0, 2, 4, 6):
            x = x @ state[f"layers.{idx}.weight"].T + state[f"layers.{idx}.bias"]
        x = x @ state["layers.7.weight"].T + state["layers.7.bias"]
    np.testing.assert_allclose(a.scores, x.squeeze(-1).numpy(), atol=1e-4)


class Payload:  # a pickled object carrying code: weights_only=True must refuse it
    def __reduce__(self):
        return (print, ("this must never run",))


def test_aesthetic_refuses_pickled_code_and_missing_weights(tiny_clip, tmp_path):
    bad = tmp_path / "evil.pth"
    torch.save({"layers.0.weight": Payload()}, bad)
    with pytest.raises(RewardError, match="plain tensors"):
        make_reward("aesthetic", weights=str(bad), model=tiny_clip)
    with pytest.raises(RewardError, match="improved-aesthetic-predictor"):
        make_reward("aesthetic", model=tiny_clip)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"layers.0.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(RewardError, match="aesthetic MLP"):
        make_reward("aesthetic", weights=str(wrong), model=tiny_clip)


def test_image_similarity_to_references(tiny_clip, images, tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(2):
        Image.fromarray(images[i]).save(refs / f"{i}.png")
    (refs / "references.json").write_text(json.dumps({PROMPTS[0]: ["0.png"], PROMPTS[1]: ["0.png", "1.png"]}))
    reward = make_reward("image_similarity", references=str(refs / "references.json"), model=tiny_clip, device="cpu")
    out = reward(images[:2], PROMPTS[:2])
    assert out.scores[0] == pytest.approx(1.0, abs=1e-5)  # the image is its own reference
    assert out.scores[1] < 1.0 - 1e-4  # mean of itself (1.0) and another image
    # metadata overrides the JSON; max instead of mean
    best = make_reward("image_similarity", reduce="max", model=tiny_clip, device="cpu")
    meta = [{"reference_images": [str(refs / "0.png"), str(refs / "1.png")]}]
    assert best(images[1:2], ["anything"], meta).scores[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(RewardError, match="no reference images"):
        reward(images[2:3], PROMPTS[2:3])


def test_missing_models_and_packages_give_one_line_errors(tmp_path):
    with pytest.raises(RewardError, match="cannot load CLIP model"):
        make_reward("clipscore", model=str(tmp_path / "nowhere"))
    for name, extra in [("imagereward", "imagereward"), ("hpsv2", "hps")]:
        try:
            __import__("ImageReward" if name == "imagereward" else "hpsv2")
        except ModuleNotFoundError:
            with pytest.raises(RewardError, match=rf"pip install 'flowgrpo\[{extra}\]'"):
                make_reward(name)
    try:
        import open_clip  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(RewardError, match=r"flowgrpo\[openclip\]"):
            make_reward("clip", backend="open_clip", model="hf-hub:apple/DFN5B-CLIP-ViT-H-14-378")
