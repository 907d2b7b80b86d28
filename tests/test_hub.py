"""Hub ids as ``model.hf_path``: resolved through ``snapshot_download`` (replaced here by a copy
of a tiny checkpoint the test writes), and a one-line error when the hub cannot be reached."""

import fnmatch
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from flax import nnx
from huggingface_hub.errors import LocalEntryNotFoundError

from steppo_jax.cli import main
from steppo_jax.hub import HubError, is_hub_id, resolve_hf_path
from steppo_jax.models import Decoder, ModelConfig, load_hf_checkpoint, read_hf_config, save_hf_checkpoint
from steppo_jax.tokenizer import load_tokenizer
from steppo_jax.train.config import load_config

ROOT = Path(__file__).resolve().parent.parent
HUB_ID = "tiny-org/tiny-qwen3"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny HF checkpoint with its tokenizer, as it would sit on the hub; (directory, model)."""
    tokenizer = load_tokenizer()
    model = Decoder(ModelConfig.tiny(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id),
                    rngs=nnx.Rngs(0))
    src = tmp_path_factory.mktemp("hub") / "repo"
    save_hf_checkpoint(model, str(src))
    tokenizer.save_pretrained(src)
    (src / "pytorch_model.bin").write_bytes(b"weights the loader never needs")
    return src, model


@pytest.fixture
def hub(published, tmp_path, monkeypatch):
    """``snapshot_download`` copying the allowed files of the published checkpoint into a cache
    snapshot; returns the list of (repo_id, allow_patterns) it was called with."""
    calls = []

    def snapshot_download(repo_id, *, allow_patterns, **kwargs):
        calls.append((repo_id, tuple(allow_patterns)))
        snapshot = tmp_path / "cache" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abc"
        snapshot.mkdir(parents=True, exist_ok=True)
        for f in published[0].iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, snapshot / f.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_id_shape():
    assert is_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and is_hub_id("meta-llama/Llama-3.2-1B")
    for value in ("/models/qwen", "./org/name", "checkpoints/a/b", "qwen", "org/", "a--b/c", "a/b..c", "gs://b/x"):
        assert not is_hub_id(value), value


def test_hub_id_loads_the_checkpoint_and_its_tokenizer(published, hub):
    src, model = published
    loaded, config = load_hf_checkpoint(HUB_ID, "float32")
    assert config == model.config
    ids = np.array([[1, 5, 9, 2]], np.int32)
    np.testing.assert_allclose(np.asarray(loaded(ids)), np.asarray(model(ids)), rtol=1e-6, atol=1e-6)
    snapshot = Path(resolve_hf_path(HUB_ID))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in snapshot.iterdir()}
    assert not (snapshot / "pytorch_model.bin").exists()

    cfg = load_config(None, ["model.source=hf", f"model.hf_path={HUB_ID}"])
    tokenizer = load_tokenizer(cfg.model.tokenizer_path)  # what the trainer's Runtime loads
    assert tokenizer.get_vocab() == load_tokenizer(str(src)).get_vocab()
    assert {repo for repo, _ in hub} == {HUB_ID}


def test_reading_the_config_fetches_config_json_only(hub):
    assert read_hf_config(HUB_ID, "float32").d_model == ModelConfig.tiny(vocab_size=8).d_model
    assert hub == [(HUB_ID, ("config.json",))]


def test_a_local_directory_named_like_an_id_is_used_as_is(published, hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(published[0], tmp_path / "checkpoints" / "tiny")
    assert resolve_hf_path("checkpoints/tiny") == "checkpoints/tiny"
    assert read_hf_config("checkpoints/tiny").n_layers == published[1].config.n_layers
    assert hub == []


def test_unreachable_hub_is_one_clear_error(monkeypatch):
    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache\nand outgoing traffic "
                                      "has been disabled.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(HubError) as err:
        load_hf_checkpoint(HUB_ID)
    message = str(err.value)
    assert "\n" not in message and repr(HUB_ID) in message and "LocalEntryNotFoundError" in message
    assert f"hf download {HUB_ID}" in message and "local" in message


def test_cli_reports_an_unreachable_hub_id_in_one_line(tmp_path, monkeypatch, capsys):
    """The real download, offline with an empty cache: exit status 2 and one line naming the id."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    code = main(["train", "--config", str(ROOT / "configs/default.yaml"), "--run-dir", str(tmp_path / "run"),
                 "model.source=hf", "model.hf_path=nobody/no-model"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert lines[0].startswith("steppo train: error:") and "'nobody/no-model'" in lines[0]
    assert "hf download nobody/no-model" in lines[0]
