import shutil

import pytest
import torch

from attribution_course.model import SHIPPED_MODEL_DIR, ModelLoadError, head_labels, load_model


def test_default_model_is_the_shipped_one_in_eval_and_compatibility_mode(model):
    assert not model.training
    assert model.cfg.n_layers >= 2 and model.cfg.n_heads >= 2
    # legacy hook names resolve only in compatibility mode
    assert "blocks.0.attn.hook_z" in model.hook_dict
    assert head_labels(model)[:2] == ["L0H0", "L0H1"]


def test_shipped_model_is_small_and_in_hugging_face_format():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"):
        assert (SHIPPED_MODEL_DIR / name).is_file(), name
    size = sum(p.stat().st_size for p in SHIPPED_MODEL_DIR.iterdir())
    assert size < 8_000_000


def test_loading_the_same_directory_by_path_gives_the_same_logits(model, tmp_path, test_prompts):
    copy = tmp_path / "copied model"
    shutil.copytree(SHIPPED_MODEL_DIR, copy)
    for path in (copy, str(copy)):
        again = load_model(path)
        with torch.no_grad():
            torch.testing.assert_close(again(test_prompts.clean_tokens[:4]), model(test_prompts.clean_tokens[:4]))


def test_missing_directory_is_named_in_the_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model.*does not exist"):
        load_model(missing)


def test_directory_without_weights_is_named_in_the_error(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(SHIPPED_MODEL_DIR, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"broken is missing model\.safetensors"):
        load_model(broken)


def test_corrupt_weights_are_named_in_the_error(tmp_path):
    broken = tmp_path / "corrupt"
    shutil.copytree(SHIPPED_MODEL_DIR, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not load model directory .*corrupt"):
        load_model(broken)


def test_corrupt_config_is_named_in_the_error(tmp_path):
    broken = tmp_path / "badconfig"
    shutil.copytree(SHIPPED_MODEL_DIR, broken)
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="badconfig: config.json is not valid JSON"):
        load_model(broken)


def test_unknown_hub_id_fails_offline_with_its_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model")
