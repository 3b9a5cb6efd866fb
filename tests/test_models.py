"""Encoder, attention and decoders: shapes, frozen and fine-tuned stages, gradients, the Show-and-Tell fast path."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from torch import nn

from captioning.config import ConfigError, ModelConfig, load_config
from captioning.decoding import beam_search
from captioning.engine import caption_loss
from captioning.models import Captioner, build_model
from captioning.models import attention as attention_module
from captioning.models.attention import AdditiveAttention
from captioning.models.decoder import CaptionDecoder, ShowTellDecoder, build_decoder, load_word_vectors
from captioning.models.encoder import Encoder
from captioning.vocab import END_ID, PAD_ID, SPECIALS, START_ID, Vocabulary

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = Vocabulary([*SPECIALS, "a", "red", "blue", "circle", "square", "left", "of"])
FEATURES = 24  # channels of the fake encoder grid fed to decoders directly


def _model_cfg(**kw) -> ModelConfig:
    base = dict(encoder="resnet18", encoder_weights=None, embed_dim=12, hidden_dim=16, attention_dim=8, dropout=0.0)
    return ModelConfig(**{**base, **kw})


def _captions() -> torch.Tensor:
    """(3, 6) teacher-forcing captions with <start>, <end> and padding."""
    return torch.tensor([
        [START_ID, 4, 5, 7, END_ID, PAD_ID],
        [START_ID, 4, 6, 8, 9, END_ID],
        [START_ID, 10, END_ID, PAD_ID, PAD_ID, PAD_ID],
    ])


def _grid(batch: int = 3, n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.randn(batch, n, FEATURES, generator=torch.Generator().manual_seed(seed))  # (B, N, C)
    return grid, grid.mean(1)


# ---------------------------------------------------------------------------------------------------------- encoder

@pytest.mark.parametrize("name, channels", [("resnet18", 512), ("mobilenet_v2", 1280)])
def test_encoder_output_shapes(name, channels):
    torch.manual_seed(0)
    encoder = Encoder(name, weights=None)
    assert encoder.out_channels == channels
    grid, pooled = encoder(torch.randn(2, 3, 64, 64))
    assert grid.shape == (2, 4, channels)  # 64 px / stride 32 = a 2 x 2 grid
    assert pooled.shape == (2, channels)
    torch.testing.assert_close(pooled, grid.mean(1))
    assert torch.isfinite(grid).all()


@pytest.mark.parametrize("grid_size, n", [(1, 1), (2, 4), (0, 9)])
def test_encoder_grid_size_pools_the_grid(grid_size, n):
    torch.manual_seed(0)
    encoder = Encoder("resnet18", weights=None, grid_size=grid_size)
    grid, pooled = encoder(torch.randn(2, 3, 96, 96))  # a 3 x 3 backbone grid
    assert grid.shape == (2, n, 512)
    torch.testing.assert_close(pooled, grid.mean(1))


def test_encoder_pooling_to_one_cell_is_the_global_average():
    torch.manual_seed(0)
    full, one = Encoder("resnet18", None, grid_size=0), Encoder("resnet18", None, grid_size=1)
    one.load_state_dict(full.state_dict())
    x = torch.randn(2, 3, 96, 96)
    torch.testing.assert_close(one(x)[0][:, 0], full(x)[1], rtol=1e-5, atol=1e-6)


def _resnet18_trunk_file(tmp_path, seed: int = 1):
    torch.manual_seed(seed)
    reference = torchvision.models.resnet18()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "resnet18_trunk.pth"
    torch.save(state, path)
    return path, reference


def test_encoder_weights_from_a_local_state_dict(tmp_path):
    path, reference = _resnet18_trunk_file(tmp_path)
    cfg = load_config(None, ["model.encoder=resnet18", f"model.encoder_weights={path}", "model.embed_dim=8",
                             "model.hidden_dim=8", "model.attention_dim=8"])
    torch.manual_seed(99)  # a different seed: equal weights can only come from the file
    model = build_model(cfg, VOCAB)
    assert torch.equal(model.encoder.trunk[0][0].weight, reference.conv1.weight)
    assert torch.equal(model.encoder.trunk[4][1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(model.encoder.trunk[4][1].bn2.running_var, reference.layer4[1].bn2.running_var)
    reference.eval()
    x = torch.randn(1, 3, 64, 64)
    trunk_out = nn.Sequential(*list(reference.children())[:-2])(x)  # (1, 512, 2, 2)
    model.eval()
    torch.testing.assert_close(model.encoder(x)[0], trunk_out.flatten(2).transpose(1, 2))


def test_encoder_weights_file_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    with pytest.raises(ValueError, match=r"does not match torchvision's ResNet") as info:
        Encoder("resnet18", str(path))
    assert str(path) in str(info.value)


def test_encoder_weights_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="state_dict"):
        Encoder("resnet18", str(path))


def test_missing_encoder_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Encoder("resnet18", str(tmp_path / "missing.pth"))


def _few_training_steps(model: Captioner, steps: int = 2) -> None:
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    captions = _captions()
    model.train()
    for _ in range(steps):
        logits, alphas = model(torch.randn(3, 3, 32, 32) * 3 + 1, captions)  # far from ImageNet statistics
        loss = caption_loss(logits, captions, alphas, attention_penalty=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_frozen_encoder_weights_and_batchnorm_statistics_do_not_move():
    torch.manual_seed(0)
    model = Captioner(_model_cfg(), VOCAB)
    assert model.encoder.frozen
    assert not any(p.requires_grad for p in model.encoder.parameters())
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    decoder_before = model.decoder.out.weight.clone()
    _few_training_steps(model)
    after = model.encoder.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"frozen encoder tensor {key} changed"
    assert not torch.equal(decoder_before, model.decoder.out.weight)  # the decoder did train
    assert model.training and model.decoder.training
    assert not any(m.training for m in model.encoder.trunk.modules())  # the frozen trunk stays in eval mode


def test_trainable_layers_fine_tunes_only_the_last_stage():
    torch.manual_seed(0)
    model = Captioner(_model_cfg(trainable_layers=1), VOCAB)
    trunk = model.encoder.trunk  # stem, layer1, layer2, layer3, layer4
    assert not model.encoder.frozen
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    model.train()
    logits, alphas = model(torch.randn(2, 3, 32, 32), _captions()[:2])
    caption_loss(logits, _captions()[:2], alphas).backward()
    for name, p in trunk[4].named_parameters():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, f"layer4.{name} has no gradient"
    for stage in trunk[:4]:
        for p in stage.parameters():
            assert not p.requires_grad and p.grad is None
    assert not any(m.training for stage in trunk[:4] for m in stage.modules())
    # BatchNorm of the fine-tuned stage keeps its statistics (batches are too small to re-estimate them).
    _few_training_steps(model)
    after = trunk.state_dict()
    for key, value in before.items():
        if key.startswith("4.") and not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        assert torch.equal(value, after[key]), f"{key} changed"
    assert not torch.equal(before["4.1.conv2.weight"], after["4.1.conv2.weight"])  # layer4 did train


def test_encoder_settings_that_cannot_work_are_config_errors_naming_the_key(monkeypatch):
    with pytest.raises(ConfigError, match="model.trainable_layers is 6, but resnet18 has 5 stages"):
        Encoder("resnet18", None, trainable_layers=6)
    with pytest.raises(ConfigError, match="model.encoder 'resnet9000' is not a torchvision classification model"):
        Encoder("resnet9000", None)
    with pytest.raises(ConfigError, match="'IMAGENET1K_V9' is not a weights name of resnet18; use one of IMAGENET1K"):
        Encoder("resnet18", "IMAGENET1K_V9")

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError, match="without internet.*set model.encoder_weights to its path"):
        Encoder("resnet18", "DEFAULT")


def test_an_input_side_the_trunk_cannot_take_is_refused_naming_the_least_it_takes():
    encoder = Encoder("alexnet", None)
    encoder.check_input_size(63)  # AlexNet's strides and pools leave a 1 x 1 grid of a 63 px image
    for size in (62, 16):
        with pytest.raises(ConfigError, match=rf"data.image_size {size} is too small for model.encoder alexnet: .*"
                                              r"use at least 63, or 0"):
            encoder.check_input_size(size)
    assert encoder.training  # the probe leaves the mode as it was
    Encoder("alexnet", None, grid_size=4).check_input_size(160)  # AlexNet's grid at 160 px is 4 x 4
    with pytest.raises(ConfigError, match="model.grid_size 5 is larger than the 4x4 grid alexnet gives at "
                                          "data.image_size 160, .* use at most 4, or 0"):
        Encoder("alexnet", None, grid_size=5).check_input_size(160)


# --------------------------------------------------------------------------------------------------------- decoders

@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_decoder_logits_shapes(kind, cell, num_layers):
    torch.manual_seed(0)
    decoder = build_decoder(_model_cfg(decoder=kind, cell=cell, num_layers=num_layers), len(VOCAB), FEATURES)
    grid, pooled = _grid(n=5)
    captions = _captions()
    logits, alphas = decoder(grid, pooled, captions)
    assert logits.shape == (3, captions.size(1) - 1, len(VOCAB))
    assert torch.isfinite(logits).all()
    words = captions[:, 1:] != PAD_ID  # (3, T-1): positions with a word to predict
    assert (logits[~words] == 0).all() and (logits[words] != 0).any(-1).all()  # padding is never computed
    if kind == "attention":
        assert alphas.shape == (3, captions.size(1) - 1, 5)
        torch.testing.assert_close(alphas.sum(-1), words.float())
    else:
        assert alphas is None
    state, _ = decoder.init(grid, pooled)
    assert len(state) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (num_layers, 3, 16) for s in state)


@pytest.mark.parametrize("sample_prob", [0.0, 1.0])
@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_captions_sharing_an_image_equal_repeating_the_image(kind, sample_prob):
    torch.manual_seed(0)
    decoder = build_decoder(_model_cfg(decoder=kind, num_layers=2), len(VOCAB), FEATURES).eval()
    grid, pooled = _grid(batch=2)
    image_index = torch.tensor([1, 0, 1])  # three captions of two images
    shared = decoder(grid, pooled, _captions(), image_index, sample_prob=sample_prob)
    repeated = decoder(grid[image_index], pooled[image_index], _captions(), sample_prob=sample_prob)
    torch.testing.assert_close(shared[0], repeated[0], rtol=1e-5, atol=1e-6)
    if kind == "attention":
        torch.testing.assert_close(shared[1], repeated[1], rtol=1e-5, atol=1e-6)


def test_attention_weights_sum_to_one_and_ignore_masked_positions():
    torch.manual_seed(0)
    attention = AdditiveAttention(feature_dim=FEATURES, hidden_dim=16, attention_dim=8)
    features = torch.randn(3, 6, FEATURES)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] + [False] * 5])
    context, alpha = attention(attention.project_keys(features), features, torch.randn(3, 16), mask)
    assert alpha.shape == (3, 6) and context.shape == (3, FEATURES)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(3))
    assert (alpha[~mask] == 0).all()
    assert (alpha[mask] > 0).all()
    torch.testing.assert_close(alpha[2, 0], torch.tensor(1.0))
    torch.testing.assert_close(context, torch.einsum("bn,bnc->bc", alpha, features))
    # Padding must not influence the result: changing masked features changes nothing.
    noisy = features.clone()
    noisy[~mask] = 100.0
    context2, alpha2 = attention(attention.project_keys(noisy), noisy, torch.zeros(3, 16), mask)
    context1, alpha1 = attention(attention.project_keys(features), features, torch.zeros(3, 16), mask)
    torch.testing.assert_close(alpha1, alpha2)
    torch.testing.assert_close(context1, context2)


@pytest.mark.parametrize("images_per_block", [1, 3, 4])
def test_queries_sharing_an_image_equal_each_query_with_its_own_copy(monkeypatch, images_per_block):
    """K queries per image read one copy of its keys and features (beam search's beams): the same context, weights
    and gradients as every query with its own copy, however many images each block of the activation holds."""
    torch.manual_seed(0)
    attention = AdditiveAttention(feature_dim=FEATURES, hidden_dim=16, attention_dim=8)
    features, query = torch.randn(4, 6, FEATURES), torch.randn(12, 16)  # 4 images, K = 3 queries each

    def run(block: int, shared: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(attention_module, "BLOCK", block)
        attention.zero_grad()
        f = features.clone().requires_grad_()
        memory = f if shared else f.repeat_interleave(3, 0)  # (4 or 12, 6, C)
        context, alpha = attention(attention.project_keys(memory), memory, query)
        (context.square().sum() + alpha[:, 0].sum()).backward()
        return [context, alpha, f.grad, *(p.grad for p in attention.parameters())]

    blocked = run(images_per_block * 3 * 6 * 8, shared=True)
    for got, want in zip(blocked, run(1 << 20, shared=False)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert blocked[0].shape == (12, FEATURES) and blocked[1].shape == (12, 6)


def test_attention_is_the_additive_tanh_score_of_show_attend_and_tell():
    torch.manual_seed(0)
    attention = AdditiveAttention(feature_dim=FEATURES, hidden_dim=16, attention_dim=8)
    features, query = torch.randn(3, 6, FEATURES), torch.randn(3, 16)
    scores = attention.score(torch.tanh(attention.key(features) + attention.query(query).unsqueeze(1)))  # (3, 6, 1)
    expected = scores.squeeze(-1).softmax(-1)
    _, alpha = attention(attention.project_keys(features), features, query)
    torch.testing.assert_close(alpha, expected)


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_every_trainable_parameter_gets_a_gradient(kind):
    torch.manual_seed(0)
    model = Captioner(_model_cfg(decoder=kind, num_layers=2, dropout=0.1), VOCAB).train()
    captions = _captions()
    logits, alphas = model(torch.randn(3, 3, 64, 64), captions)
    caption_loss(logits, captions, alphas, attention_penalty=1.0).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("decoder.") for n in trainable)
    # A gradient at rounding-noise level (e.g. a bias a softmax cancels out) means the parameter cannot learn.
    dead = [n for n, p in trainable.items() if p.grad is None or p.grad.abs().max() < 1e-6]
    assert not dead, f"parameters without a gradient: {dead}"


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_show_tell_fast_path_equals_stepping(cell, num_layers):
    torch.manual_seed(0)
    decoder = build_decoder(_model_cfg(decoder="show_tell", cell=cell, num_layers=num_layers, dropout=0.3),
                            len(VOCAB), FEATURES).eval()
    assert isinstance(decoder, ShowTellDecoder)
    grid, pooled = _grid()
    captions = _captions()
    fast, _ = decoder(grid, pooled, captions)
    words = captions[:, 1:] != PAD_ID
    # Word by word through decoder.step, feeding the reference words (compared where there is a word to predict).
    state, memory = decoder.init(grid, pooled)
    stepped = []
    for t in range(captions.size(1) - 1):
        logits, state, alpha = decoder.step(captions[:, t], state, memory)
        assert alpha is None
        stepped.append(logits)
    torch.testing.assert_close(fast[words], torch.stack(stepped, 1)[words], rtol=1e-5, atol=1e-5)
    # ... and the generic teacher-forcing loop of the base class gives the same.
    torch.testing.assert_close(fast, CaptionDecoder.forward(decoder, grid, pooled, captions)[0], rtol=1e-5, atol=1e-5)


def test_compiled_step_gives_the_same_loss_gradients_and_captions():
    """train.compile: torch.compile of the one-word step, with the shrinking batch of teacher forcing (captions of
    different lengths) and beam search's beams going through one dynamic-shape graph."""
    def loss_and_grads(decoder):
        decoder.zero_grad()
        logits, alphas = decoder(grid, pooled, captions)
        loss = caption_loss(logits, captions, alphas, attention_penalty=1.0)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in decoder.parameters()]

    torch.manual_seed(0)
    decoder = build_decoder(_model_cfg(decoder="attention"), len(VOCAB), FEATURES)
    grid, pooled = _grid()
    captions = _captions()
    eager_loss, eager_grads = loss_and_grads(decoder)
    eager_beams = beam_search(decoder.eval(), grid, pooled, beam_size=3)
    decoder.compile_step()
    assert "hidden_step" in vars(decoder)  # the instance now steps through the compiled function
    compiled_loss, compiled_grads = loss_and_grads(decoder.train())
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for compiled, eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
    compiled_beams = beam_search(decoder.eval(), grid, pooled, beam_size=3)
    assert [h[0].tokens for h in compiled_beams] == [h[0].tokens for h in eager_beams]


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_scheduled_sampling_feeds_the_models_own_words(kind):
    torch.manual_seed(0)
    decoder = build_decoder(_model_cfg(decoder=kind), len(VOCAB), FEATURES).eval()
    grid, pooled = _grid()
    captions = _captions()
    forced, _ = decoder(grid, pooled, captions)
    torch.manual_seed(1)
    sampled, alphas = decoder(grid, pooled, captions, sample_prob=1.0)
    assert sampled.shape == forced.shape
    assert torch.isfinite(sampled).all()
    torch.testing.assert_close(sampled[:, 0], forced[:, 0])  # the first input is <start> either way
    assert not torch.allclose(sampled[:, 1:], forced[:, 1:])
    # With probability 1 every input after <start> is the previous argmax: the same as free-running greedy.
    state, memory = decoder.init(grid, pooled)
    words, free = captions[:, 0], []
    for _ in range(captions.size(1) - 1):
        logits, state, _ = decoder.step(words, state, memory)
        free.append(logits)
        words = logits.argmax(-1)
    words = captions[:, 1:] != PAD_ID
    torch.testing.assert_close(sampled[words], torch.stack(free, 1)[words])
    if kind == "attention":
        assert alphas.shape == (3, captions.size(1) - 1, 5)
    # A partial probability runs too and is reproducible for a fixed seed.
    torch.manual_seed(2)
    half1, _ = decoder(grid, pooled, captions, sample_prob=0.5)
    torch.manual_seed(2)
    half2, _ = decoder(grid, pooled, captions, sample_prob=0.5)
    assert torch.equal(half1, half2)


# ------------------------------------------------------------------------------------------------------ word vectors

@pytest.mark.parametrize("header", [False, True], ids=["glove", "word2vec"])
def test_word_vectors_initialise_known_words(tmp_path, header):
    lines = ["red 0.5 -1 2 0.25", "unseenword 9 9 9 9", "circle 1e-1 0 0 -3"]
    if header:
        lines.insert(0, "3 4")
    path = tmp_path / "vectors.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf8")
    torch.manual_seed(0)
    decoder = build_decoder(_model_cfg(embed_dim=4), len(VOCAB), FEATURES)
    before = decoder.embed.weight.detach().clone()
    assert load_word_vectors(decoder.embed, path, VOCAB) == 2
    weight = decoder.embed.weight.detach()
    torch.testing.assert_close(weight[VOCAB.stoi["red"]], torch.tensor([0.5, -1.0, 2.0, 0.25]))
    torch.testing.assert_close(weight[VOCAB.stoi["circle"]], torch.tensor([0.1, 0.0, 0.0, -3.0]))
    others = [i for i in range(len(VOCAB)) if VOCAB.itos[i] not in ("red", "circle")]
    assert torch.equal(weight[others], before[others])


def test_word_vectors_of_the_wrong_dimension_or_without_a_known_word_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("red 0.5 -1 2 0.25\nblue 1 2 3\n", encoding="utf8")
    decoder = build_decoder(_model_cfg(embed_dim=4), len(VOCAB), FEATURES)
    with pytest.raises(ValueError, match=r"vectors\.txt:2: vector has 3 values but model\.embed_dim is 4"):
        load_word_vectors(decoder.embed, path, VOCAB)
    path.write_text("Red 0.5 -1 2 0.25\nrouge 1 2 3 4\n", encoding="utf8")
    with pytest.raises(ValueError, match=rf"vectors\.txt holds none of the {len(VOCAB)} vocabulary words"):
        load_word_vectors(decoder.embed, path, VOCAB)



@pytest.mark.parametrize("keep", [1000, 5000, -100], ids=["header only", "cut at 5000 bytes", "end cut off"])
def test_a_truncated_encoder_weights_file_is_named(tmp_path, keep):
    path, _ = _resnet18_trunk_file(tmp_path)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ConfigError, match=rf"^model\.encoder_weights {re.escape(str(path))} is damaged or cut short "
                                          r"\(.+\); download or copy it again$"):
        Encoder("resnet18", str(path))


def test_a_damaged_download_in_torchs_cache_is_named_with_the_fix(tmp_path, monkeypatch):
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # torch.hub.get_dir(), as set_dir sets it
    cached = tmp_path / "hub" / "checkpoints" / Path(urlparse(weights.url).path).name  # where torch.hub keeps it
    cached.parent.mkdir(parents=True)
    path, _ = _resnet18_trunk_file(tmp_path)
    cached.write_bytes(path.read_bytes()[:-100])  # a download cut short; found in the cache, so not fetched again
    with pytest.raises(ConfigError, match=rf"^model\.encoder_weights 'DEFAULT': the downloaded weights file "
                                          rf"{re.escape(str(cached))} is damaged \(PytorchStreamReader failed reading "
                                          r"zip archive.*\); delete it and it is downloaded again$"):
        Encoder("resnet18", "DEFAULT")
