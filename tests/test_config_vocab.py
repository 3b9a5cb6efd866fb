"""Config loading (defaults <- YAML <- --set, strict keys and types) and the vocabulary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from captioning.config import Config, ConfigError, load_config, parse_overrides, save_config
from captioning.vocab import END_ID, PAD_ID, SPECIALS, START_ID, UNK_ID, Vocabulary, tokenize

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------------------- config

def test_defaults_without_file_or_overrides():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.encoder == "resnet101" and cfg.train.lr == 4e-4


def test_yaml_overrides_defaults_and_set_overrides_yaml(tmp_path):
    path = _yaml(tmp_path, "model:\n  cell: gru\n  hidden_dim: 64\ntrain:\n  epochs: 3\n  lr: 0.01\n")
    cfg = load_config(path, ["train.epochs=7", "model.decoder=show_tell"])
    assert cfg.model.cell == "gru" and cfg.model.hidden_dim == 64  # file over defaults
    assert cfg.train.lr == 0.01
    assert cfg.train.epochs == 7  # --set over file
    assert cfg.model.decoder == "show_tell"  # --set over defaults
    assert cfg.model.embed_dim == Config().model.embed_dim  # untouched keys keep their defaults


def test_base_config_is_overridden_by_file_and_set(tmp_path):
    base = Config().to_dict()
    base["train"]["epochs"], base["train"]["batch_size"], base["model"]["cell"] = 11, 7, "rnn"
    path = _yaml(tmp_path, "train:\n  batch_size: 9\n")
    cfg = load_config(path, ["model.cell=gru"], base=base)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.cell) == (11, 9, "gru")


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "model.encoder_weights=null", "data.root=/data/coco"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("item, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("trian.lr=1", "unknown config key 'trian'"),
    ("model.cell.size=3", "config key 'model.cell'"),
])
def test_unknown_key_names_the_key(item, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, [item])
    if "lrr" in item:
        assert "train.lr" in str(info.value)  # the valid keys are listed


@pytest.mark.parametrize("items, key", [(["train=1", "train.lr=1e-3"], "train"),
                                        (["data.root=x", "data.root.y=1"], "data.root")])
def test_a_key_set_both_as_a_value_and_as_a_section_names_it(items, key):
    with pytest.raises(ConfigError, match=f"config key '{key}' must be a mapping of its fields"):
        load_config(None, items)


def test_unknown_key_in_a_file_names_the_file_and_the_key(tmp_path):
    path = _yaml(tmp_path, "model:\n  hiden_dim: 64\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown config key 'model\.hiden_dim'"):
        load_config(path)


def test_a_config_saved_with_a_retired_key_still_loads():
    """train.log_every did nothing and was removed; the configs inside earlier checkpoints still hold it."""
    saved = Config().to_dict()
    saved["train"]["log_every"] = 50
    assert Config.from_dict(saved) == Config()
    assert load_config(None, ["train.lr=0.5"], base=saved).train.lr == 0.5  # a resumed run's saved config
    assert "log_every" not in Config().to_dict()["train"]
    with pytest.raises(ConfigError, match="unknown config key 'train.log_every'"):
        load_config(None, ["train.log_every=5"])


@pytest.mark.parametrize("item, message", [
    ("train.epochs=abc", r"config key 'train.epochs' must be int, got 'abc' \(str\)"),
    ("train.epochs=2.5", r"config key 'train.epochs' must be int, got 2.5 \(float\)"),
    ("train.epochs=true", r"config key 'train.epochs' must be int"),
    ("train.amp=3", r"config key 'train.amp' must be bool"),
    ("model.embed_dim=null", r"config key 'model.embed_dim' must be int"),
    ("train=3", r"config key 'train' must be a mapping"),
])
def test_wrong_type_is_an_error(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [item])


def test_wrong_type_in_a_file(tmp_path):
    path = _yaml(tmp_path, "data:\n  num_workers: four\n")
    with pytest.raises(ConfigError, match=r"'data.num_workers' must be int, got 'four'"):
        load_config(path)


@pytest.mark.parametrize("key, value", [("model.cell", "transformer"), ("model.decoder", "topdown"),
                                        ("data.dataset", "imagenet"), ("train.lr_schedule", "linear"),
                                        ("data.feature_dtype", "int8"),
                                        ("train.select_metric", "METEOR"),  # not computed per epoch
                                        ("data.year", 2015)])
def test_invalid_choice_lists_the_choices(key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}' is {value!r}; choose one of"):
        load_config(None, [f"{key}={value}"])


def test_self_critical_training_needs_two_samples_per_image():
    with pytest.raises(ConfigError, match="'train.scst_samples' must be at least 2"):
        load_config(None, ["train.scst_samples=1", "train.scst_epochs=1"])


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "'train.batch_size' is 0; it must be at least 1"),
    ("train.val_beam_size=0", "'train.val_beam_size' is 0; it must be at least 1"),
    ("data.num_workers=-1", "'data.num_workers' is -1; it must be at least 0"),
    ("model.dropout=1.5", "'model.dropout' is 1.5; it must be at least 0.0 and below 1.0"),
    ("train.scheduled_sampling=nan", "'train.scheduled_sampling' is nan; it must be at least 0.0 and at most 1.0"),
    ("train.lr=-0.001", "'train.lr' is -0.001; it must be a positive number"),
    ("train.lr=.inf", "'train.lr' is inf; it must be a positive number"),
    ("train.epochs=0", "must add up to at least 1 epoch"),
    ("data.captions_per_image=0", "'data.captions_per_image' is 0; it must be at least 1"),
    ("train.scst_bleu_weight=-1", "'train.scst_bleu_weight' is -1.0; it must be at least 0.0"),
    ("train.average_epochs=-1", "'train.average_epochs' is -1; it must be at least 0"),
])
def test_numbers_out_of_their_range_are_refused_before_any_work(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_int_is_accepted_for_float_and_null_for_optional():
    cfg = load_config(None, ["train.lr=1", "model.encoder_weights=null"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.encoder_weights is None


def test_scientific_notation_is_a_float_on_the_command_line():
    cfg = load_config(None, ["train.lr=1e-3", "train.encoder_lr=5E-5", "train.weight_decay=1.0e-4"])
    assert (cfg.train.lr, cfg.train.encoder_lr, cfg.train.weight_decay) == (1e-3, 5e-5, 1e-4)
    assert load_config(None, ["train.out_dir=1e3"]).train.out_dir == "1e3"  # a number-like string stays a string
    assert isinstance(cfg.train.lr, float)


def test_scientific_notation_is_a_float_in_a_yaml_file(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string; people write learning rates that way.
    path = _yaml(tmp_path, "train:\n  lr: 1e-3\n  encoder_lr: 5e-5\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1e-3 and cfg.train.encoder_lr == 5e-5


def test_override_values_are_yaml_scalars():
    parsed = parse_overrides(["model.encoder_weights=null", "train.amp=false", "data.root=/a/b=c", "data.image_dir="])
    assert parsed == {"model": {"encoder_weights": None}, "train": {"amp": False},
                      "data": {"root": "/a/b=c", "image_dir": ""}}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["train.lr"])


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_file_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(_yaml(tmp_path, "- a\n- b\n"))


def test_empty_config_file_gives_defaults(tmp_path):
    assert load_config(_yaml(tmp_path, "")) == Config()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():  # every key written in the file took effect
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"


def test_shipped_configs_exist():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


# ------------------------------------------------------------------------------------------------------- vocabulary

def test_specials_have_fixed_ids():
    assert SPECIALS == ("<pad>", "<start>", "<end>", "<unk>")
    assert (PAD_ID, START_ID, END_ID, UNK_ID) == (0, 1, 2, 3)
    vocab = Vocabulary.build([["a", "b"]])
    assert vocab.itos[:4] == list(SPECIALS)
    assert [vocab.stoi[s] for s in SPECIALS] == [0, 1, 2, 3]


def test_build_orders_by_frequency_then_alphabet_and_applies_min_count():
    captions = [["a", "red", "circle"], ["a", "blue", "circle"], ["a", "red", "square"], ["a", "green", "<end>"]]
    vocab = Vocabulary.build(captions, min_count=2)
    assert vocab.itos == [*SPECIALS, "a", "circle", "red"]
    assert len(Vocabulary.build(captions, min_count=1)) == 4 + 6  # a circle red blue green square
    assert Vocabulary.build(captions, min_count=1).itos[4:] == ["a", "circle", "red", "blue", "green", "square"]


def test_encode_decode_round_trip_with_unknown_words():
    vocab = Vocabulary.build([["a", "red", "circle"], ["a", "blue", "square"]])
    ids = vocab.encode(["a", "purple", "circle"])
    assert ids[0] == START_ID and ids[-1] == END_ID
    assert ids[2] == UNK_ID
    assert vocab.decode(ids) == ["a", "<unk>", "circle"]
    assert vocab.decode(vocab.encode(["a", "blue", "square"])) == ["a", "blue", "square"]
    assert vocab.encode(["a", "red", "circle"], max_len=2) == [START_ID, vocab.stoi["a"], vocab.stoi["red"], END_ID]
    # decode stops at <end> and skips <start>/<pad>
    assert vocab.decode([START_ID, vocab.stoi["a"], PAD_ID, vocab.stoi["red"], END_ID, vocab.stoi["blue"]]) == [
        "a", "red"]
    assert vocab.decode([]) == []


def test_json_save_load_equality(tmp_path):
    vocab = Vocabulary.build([["a", "red", "circle"], ["ein", "rotes", "quadrat", "é"]])
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.stoi == vocab.stoi
    assert json.loads((tmp_path / "vocab.json").read_text()) == {"itos": vocab.itos}
    assert Vocabulary.from_dict(vocab.to_dict()) == vocab
    assert vocab != Vocabulary([*SPECIALS, "a"])


def test_vocabulary_must_start_with_specials_and_have_no_duplicates():
    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary(["a", "<pad>", "<start>", "<end>", "<unk>"])
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary([*SPECIALS, "a", "a"])


@pytest.mark.parametrize("text, tokens", [
    ("A man riding a horse.", ["a", "man", "riding", "a", "horse"]),
    ("  Two   DOGS,\tplaying!\n", ["two", "dogs", "playing"]),
    ("A man's hat.", ["a", "man", "'s", "hat"]),
    ("a dog (brown) runs", ["a", "dog", "-lrb-", "brown", "-rrb-", "runs"]),
    ("", []),
])
def test_tokenize_basics(text, tokens):
    assert tokenize(text) == tokens


def test_a_config_path_that_is_a_checkpoint_an_image_or_a_folder_is_named(tmp_path):
    checkpoint = tmp_path / "last.pt"
    torch.save({"config": {}, "model": {"w": torch.zeros(3)}}, checkpoint)
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(image)
    for path in (checkpoint, image):
        with pytest.raises(ConfigError, match=rf"^config file {re.escape(str(path))} is not a YAML text file "
                                              r"\(for a checkpoint use train\.py --resume\)$"):
            load_config(path)
    with pytest.raises(ConfigError, match=rf"^config file {re.escape(str(tmp_path))} is a folder; name a YAML file"):
        load_config(tmp_path)


def test_a_key_written_twice_in_a_config_file_is_refused_naming_it(tmp_path):
    path = _yaml(tmp_path, "train:\n  epochs: 3\nmodel:\n  cell: gru\ntrain:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: line 5: key 'train' is written twice"):
        load_config(path)
    nested = _yaml(tmp_path, "train:\n  lr: 1.0e-3\n  epochs: 3\n  lr: 2.0e-3\n", "nested.yaml")
    with pytest.raises(ConfigError, match=r"nested\.yaml: line 4: key 'lr' is written twice"):
        load_config(nested)
    merged = _yaml(tmp_path, "train:\n  <<: {epochs: 3, lr: 1.0e-3}\n  epochs: 4\n", "merged.yaml")
    assert load_config(merged).train.epochs == 4  # a key overriding a YAML merge (<<) is no repetition
